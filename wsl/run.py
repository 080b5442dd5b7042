"""Running a stage from a config: defaults, YAML + KEY=VALUE overrides, the Trainer with its
loggers (CSV and W&B, offline by default) and checkpoints, resuming, and the result file.
Pretraining (`run_pretraining`, here) and fine-tuning (`wsl.finetune`) share all of it.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from wsl.data import TrainDataConfig
from wsl.errors import WslError
from wsl.optim import OptimConfig
from wsl.pretrain import HashtagPretraining, HashtagShards, TrainingMonitor
from wsl.vocab import Vocabulary

TRAINER_DEFAULTS = {"accelerator": "auto", "devices": "auto", "num_nodes": 1, "precision": None, "strategy": "auto",
                    "accumulate_grad_batches": 1, "log_every_n_steps": 10}
WANDB_DEFAULTS = {"project": "wsl", "mode": "offline"}  # mode: offline (wandb sync later), online, disabled
FREE_FORM = {"backbones"}  # config mappings whose keys are the user's names, not options

DEFAULTS = {
    "run_dir": "runs/pretrain",
    "model": "resnext101_32x8d",
    "max_steps": 1000,
    "val_every_steps": 500,
    "checkpoint_every_steps": 500,
    "seed": 0,
    "channels_last": "auto",  # auto: on with a GPU (NHWC + bf16 is faster for ResNeXt there), off on CPU
    "compile": False,  # torch.compile the network (minutes of compile time; pays off on long GPU runs)
    "data": {
        **{f.name: None if f.default is MISSING else f.default for f in fields(TrainDataConfig) if f.name != "num_classes"},
        "val_shards": None,  # held-out shards for precision@k
        "val_batches": None,  # cap on held-out batches per validation
    },
    "optim": asdict(OptimConfig()),
    "trainer": TRAINER_DEFAULTS,
    "wandb": {**WANDB_DEFAULTS, "table_every": 500},
}


def describe_config(defaults: dict = DEFAULTS) -> str:
    """Every config key and its default, for a stage's `--help`."""
    lines = []
    for key, value in defaults.items():
        if isinstance(value, dict):
            extra = " (and any other pytorch_lightning.Trainer argument)" if key == "trainer" else ""
            lines.append(f"{key}.*{extra}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            lines.append(f"{key}={value}")
    return "\n".join(lines)


def merge(base: dict, override: dict, where: str = "") -> dict:
    """`override` on top of `base`, recursively; keys `base` does not know are an error, except
    in `trainer` (the Trainer checks its own arguments). A free-form mapping (eval's
    `backbones`: name -> weights) is replaced whole."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out and where != "trainer.":
            raise WslError(f"unknown config key '{where}{key}'")
        if isinstance(out.get(key), dict) and isinstance(value, dict) and f"{where}{key}" not in FREE_FORM:
            out[key] = merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def load_config(path: str | None, overrides: list[str], defaults: dict = DEFAULTS) -> dict:
    """The config file over the defaults, then `key.sub=value` overrides (values parsed as YAML)."""
    config = copy.deepcopy(defaults)  # never hand out the module's own dict
    if path:
        if not Path(path).is_file():
            raise WslError(f"config file not found: {path}")
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    for item in overrides:
        if "=" not in item:
            raise WslError(f"override '{item}' is not key=value")
        key, value = item.split("=", 1)
        mapping, _, name = key.partition(".")
        if mapping in FREE_FORM and name:  # one entry of a free-form mapping; the others stay
            config[mapping] = {**(config.get(mapping) or {}), name: yaml.safe_load(value)}
            continue
        nested: dict = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
        config = merge(config, nested)
    return config


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run: `checkpoints/*.ckpt` (a kill between the periodic
    checkpoint and `last.ckpt` leaves the periodic one newer) or the one Lightning writes on a
    SLURM pre-emption signal (`hpc_ckpt_N.ckpt`). Lightning writes each atomically."""
    found = [p for p in [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_hardware(config: dict) -> tuple[dict, bool]:
    """(Trainer arguments with the precision chosen, channels_last): bf16 and NHWC on a GPU,
    fp32 and NCHW on a CPU, unless the config says otherwise."""
    trainer_args = dict(config["trainer"])
    gpu = torch.cuda.is_available() and trainer_args["accelerator"] in ("auto", "gpu", "cuda")
    trainer_args["precision"] = trainer_args["precision"] or ("bf16-mixed" if gpu else "32-true")
    if gpu:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    channels_last = gpu if config["channels_last"] == "auto" else bool(config["channels_last"])
    return trainer_args, channels_last


def make_trainer(config: dict, trainer_args: dict, checkpoints: ModelCheckpoint, callbacks: list[pl.Callback],
                 logged_config: dict, **loop) -> pl.Trainer:
    """The Trainer of a run: CSV metrics in run_dir/metrics.csv, W&B (offline unless the config
    says online) under run_dir/wandb with one run id per run directory, so that a resumed or
    requeued job continues the same W&B run. `loop` holds the stage's own Trainer arguments."""
    run_dir = Path(config["run_dir"])
    id_file = run_dir / "wandb_run_id"
    # Only the global rank 0 (before any launcher starts the others) writes the id.
    if not id_file.exists() and int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:
        id_file.write_text(secrets.token_hex(4))
    loggers = [CSVLogger(run_dir, name="", version="")]
    wandb_cfg = config["wandb"]
    if wandb_cfg["mode"] != "disabled":
        loggers.append(WandbLogger(project=wandb_cfg["project"], save_dir=str(run_dir),
                                   id=id_file.read_text().strip() if id_file.exists() else None,
                                   offline=wandb_cfg["mode"] == "offline", mode=wandb_cfg["mode"],  # explicit: wandb
                                   resume="allow", config=logged_config))  # caches its settings at the first init
    return pl.Trainer(logger=loggers, callbacks=[checkpoints, *callbacks], default_root_dir=run_dir, **loop, **trainer_args)


def fit_and_report(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                   run_dir: Path, extra: dict | None = None) -> dict:
    """Fit, resuming from the run's newest checkpoint if there is one; write run_dir/result.json
    (with `extra` in it)."""
    resume = resume_checkpoint(run_dir)
    if resume is not None:
        print(f"resuming from {resume}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()  # close this run's files, so that a next run in the same process starts its own
    result_file = run_dir / "result.json"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not metrics and result_file.is_file():  # re-run of a finished run: nothing trained, keep its numbers
        metrics = json.loads(result_file.read_text())["metrics"]
    result = {
        "global_step": trainer.global_step,
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "metrics": metrics,
        "wandb_dir": str(max(run_dir.glob("wandb/offline-run-*"), default="")),  # names sort by start time
        **(extra or {}),
    }
    if trainer.global_rank == 0:
        result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_pretraining(config: dict, callbacks: list[pl.Callback] | None = None) -> dict:
    """Train (or resume) as `config` says; returns the final step, metrics and paths.
    `callbacks` are added to the Trainer's (yours, e.g. for extra logging)."""
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(config["seed"], workers=True, verbose=False)
    if not config["data"]["vocab"] or not config["data"]["shards"]:
        raise WslError("the config needs data.shards and data.vocab")
    vocab = Vocabulary.load(config["data"]["vocab"])
    trainer_args, channels_last = resolve_hardware(config)
    datamodule = HashtagShards(config["data"], vocab)
    module = HashtagPretraining(config["model"], len(vocab), datamodule.train_config.batch_size, config["max_steps"],
                                config["optim"], channels_last, vocab.sha256, config["compile"])
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                                  every_n_train_steps=config["checkpoint_every_steps"], save_top_k=-1, save_last=True)
    trainer = make_trainer(
        config, trainer_args, checkpoints,
        [TrainingMonitor(vocab, table_every=config["wandb"]["table_every"]), *(callbacks or [])],
        config | {"vocab_sha256": vocab.sha256},
        max_steps=config["max_steps"], max_epochs=-1, val_check_interval=config["val_every_steps"],
        check_val_every_n_epoch=None, num_sanity_val_steps=0, limit_val_batches=config["data"]["val_batches"] or 1.0,
    )
    return fit_and_report(trainer, module, datamodule, run_dir)
