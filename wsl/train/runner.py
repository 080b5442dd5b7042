"""The generic Lightning runner both training stages use: the Trainer and W&B sections of a
config, the run directory (its `config.yaml`, refusing another config), hardware defaults,
loggers (CSV and W&B, offline by default), checkpoints, resuming and the result file.
It knows no stage: `wsl.train.pretrain` and `wsl.train.finetune` call it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from wsl.config import WandbConfig, check_same_run, option, set_aside, to_dict
from wsl.distributed import launcher_rank
from wsl.files import write_json

# Keys that may change when a run is continued in the same run_dir: how long it runs, on how
# many devices and workers, and how it reports. Anything else changes what the run computes.
MAY_CHANGE_ON_RESUME = (
    "max_steps",
    "epochs",
    "restart",
    "data.num_workers",
    "data.val_batches",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "wandb.",
    "val_every_steps",
    "val_every_epochs",
    "checkpoint_every_steps",
    "stop_after_step",
    "dedup_reports",
    "check_hash",
)


@dataclass
class TrainerConfig:
    """The `trainer:` section: pytorch_lightning.Trainer arguments."""

    accelerator: str = option("auto", "cpu, gpu, auto, ...")
    devices: Any = option("auto", "devices per node: a number, a list of ids, or auto")
    num_nodes: int = option(1, "machines (SLURM --nodes)", minimum=1)
    precision: str | None = option(None, "null: bf16-mixed on a GPU, 32-true on a CPU")
    strategy: str = option("auto", "auto, ddp, ...")
    accumulate_grad_batches: int = option(1, "batches per optimizer step", minimum=1)
    log_every_n_steps: int = option(10, "metrics logged every n steps", minimum=1)
    enable_progress_bar: bool = option(True, "show the progress bar")
    enable_model_summary: bool = option(True, "print the model summary at start")
    gradient_clip_val: float | None = option(None, "clip gradients to this norm (null: no clipping)", minimum=0)


def start_run(run_dir: Path, config: Any, command: str, restart: bool) -> None:
    """Claim `run_dir` for this config before anything is built: set an old run aside when
    asked (`restart`), refuse a run of another config, write `config.yaml`. Only the launching
    process (global rank 0) does it; the others follow its folder."""
    if launcher_rank() != 0:
        return
    if restart:
        moved = set_aside(run_dir)
        if moved:
            print(f"restart: the previous run in {run_dir} is now {moved}")
    check_same_run(run_dir, config, MAY_CHANGE_ON_RESUME, command)


class CheckpointRetention(Checkpoint):
    """Keep the newest `keep_last` step checkpoints (`step{N}.ckpt`) and those of every
    `keep_every`-th step; delete the others as new ones are written (global rank 0). A 32x48d
    checkpoint with SGD momentum is ~6.6 GB: keeping every one of a 246k-step run would fill
    ~800 GB. A `Checkpoint` callback, so Lightning runs it after the ModelCheckpoint before it."""

    def __init__(self, folder: Path, keep_last: int, keep_every: int | None):
        self.folder, self.keep_last, self.keep_every = folder, keep_last, keep_every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0:
            return
        steps = sorted((int(m.group(1)), p) for p in self.folder.glob("step*.ckpt") if (m := _STEP.fullmatch(p.name)))
        for index, (step, path) in enumerate(steps):
            newest = index >= len(steps) - self.keep_last
            if not newest and not (self.keep_every and step % self.keep_every == 0):
                path.unlink(missing_ok=True)


_STEP = re.compile(r"step(\d+)\.ckpt")


def checkpoint_disk_use(run_dir: Path) -> tuple[int, float]:
    """(files, GB) under run_dir/checkpoints."""
    files = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files) / 1e9


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run: `checkpoints/*.ckpt` (a kill between the periodic
    checkpoint and `last.ckpt` leaves the periodic one newer) or the one Lightning writes on a
    SLURM pre-emption signal (`hpc_ckpt_N.ckpt`). Lightning writes each atomically."""
    found = [p for p in [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_hardware(trainer: TrainerConfig, channels_last: str | bool) -> tuple[dict, bool]:
    """(Trainer arguments with the precision chosen, channels_last): bf16 and NHWC on a GPU,
    fp32 and NCHW on a CPU, unless the config says otherwise."""
    trainer_args = to_dict(trainer)
    gpu = torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda")
    trainer_args["precision"] = trainer.precision or ("bf16-mixed" if gpu else "32-true")
    if gpu:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    return trainer_args, gpu if channels_last == "auto" else bool(channels_last)


def make_trainer(
    run_dir: Path,
    wandb: WandbConfig,
    trainer_args: dict,
    checkpoints: ModelCheckpoint,
    callbacks: list[pl.Callback],
    logged_config: dict,
    **loop,
) -> pl.Trainer:
    """The Trainer of a run: CSV metrics in run_dir/metrics.csv, W&B (offline unless the config
    says online) under run_dir/wandb with one run id per run directory, so that a resumed or
    requeued job continues the same W&B run. `loop` holds the stage's own Trainer arguments."""
    id_file = run_dir / "wandb_run_id"
    if not id_file.exists() and launcher_rank() == 0:  # before any launcher starts the other ranks
        id_file.write_text(secrets.token_hex(4))
    loggers = [CSVLogger(run_dir, name="", version="")]
    if wandb.mode != "disabled":
        loggers.append(
            WandbLogger(
                project=wandb.project,
                save_dir=str(run_dir),
                id=id_file.read_text().strip() if id_file.exists() else None,
                offline=wandb.mode == "offline",
                mode=wandb.mode,  # explicit: wandb caches
                resume="allow",
                config=logged_config,
            )
        )  # its settings at the first init
    return pl.Trainer(
        logger=loggers, callbacks=[checkpoints, *callbacks], default_root_dir=run_dir, **loop, **trainer_args
    )


def fit_and_report(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    run_dir: Path,
    extra: dict | None = None,
) -> dict:
    """Fit, resuming from the run's newest checkpoint if there is one; write run_dir/result.json
    (with `extra` in it)."""
    resume = resume_checkpoint(run_dir)
    if resume is not None and trainer.global_rank == 0:
        print(f"resuming from {resume}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()  # close this run's files, so that a next run in the same process starts its own
    result_file = run_dir / "result.json"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not metrics and result_file.is_file():  # re-run of a finished run (same config): nothing trained
        metrics = json.loads(result_file.read_text())["metrics"]
    result = {
        "global_step": trainer.global_step,
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "metrics": metrics,
        "wandb_dir": str(max(run_dir.glob("wandb/offline-run-*"), default="")),  # names sort by start time
        "checkpoints": dict(zip(("files", "gigabytes"), checkpoint_disk_use(run_dir))),
        **(extra or {}),
    }
    if trainer.global_rank == 0:
        write_json(result_file, result)
    return result


def run_summary(result: dict, headline: str | None) -> str:
    """What a finished training run prints (rank 0 only; other ranks print nothing)."""
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return ""
    lines = [headline] if headline else []
    lines.append(f"optimizer steps: {result['global_step']}; checkpoint: {result['checkpoint']}")
    disk = result["checkpoints"]
    lines.append(f"checkpoints kept: {disk['files']} files, {disk['gigabytes']:.2f} GB")
    if result["wandb_dir"]:
        lines.append(f"W&B offline run: {result['wandb_dir']}  (upload with `wandb sync {result['wandb_dir']}`)")
    return "\n".join(lines)
