"""`wsl pretrain`: hashtag pretraining, the paper's stage. The LightningModule (the paper's loss
and schedule), its data module, the config schema and the command.

Loss: softmax cross-entropy against the 1/k target (Mahajan et al.); the optimiser is
`wsl.train.optim`'s (SGD, Nesterov momentum 0.9, linear scaling, warm-up, cosine or step). The
run stops at `max_steps` optimizer steps, so a run killed and resumed from its newest
checkpoint takes the same number of steps as one that was not. Re-running in the same
run_dir resumes; a different config there is refused (see `wsl.train.runner`).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from torchmetrics import MeanMetric

from wsl.config import WandbConfig, option, require_file, section, to_dict
from wsl.data.evalset import EvalDataset
from wsl.data.shards import expand_shard_spec, shard_preparation
from wsl.data.stream import TrainDataConfig, TrainLoader
from wsl.data.transforms import EvalTransform
from wsl.data.vocab import Vocabulary
from wsl.models import model_name_problem
from wsl.train.module import NetworkModule, StreamDataModule, TrainingMonitor
from wsl.train.optim import OptimConfig, configure_sgd
from wsl.train.runner import (
    CheckpointRetention,
    TrainerConfig,
    fit_and_report,
    make_trainer,
    resolve_hardware,
    run_summary,
    start_run,
)


@dataclass
class PretrainDataConfig(TrainDataConfig):
    """The `data:` section of a pretraining config: the training stream, and held-out shards."""

    val_shards: str | None = option(None, "held-out shards for precision@k (null: no validation)")
    val_batches: int | None = option(None, "cap on held-out batches per validation (null: all)", minimum=1)


@dataclass
class PretrainWandbConfig(WandbConfig):
    table_every: int = option(500, "steps between W&B tables of sample images with their predicted hashtags", minimum=0)


@dataclass
class Config:
    """`wsl pretrain`: hashtag pretraining of a registry ResNeXt on shards."""

    run_dir: str = option("runs/pretrain", "run directory: config.yaml, checkpoints, metrics, W&B files")
    model: str = option("resnext101_32x8d", "registry model (wsl.models)", check=model_name_problem)
    max_steps: int = option(1000, "optimizer steps of the whole run", minimum=1)
    val_every_steps: int = option(500, "steps between held-out validations", minimum=1)
    checkpoint_every_steps: int = option(500, "steps between checkpoints", minimum=1)
    keep_last_checkpoints: int = option(2, "step checkpoints kept: the newest this many ...", minimum=1)
    keep_checkpoint_every_steps: int | None = option(
        50_000, "... and those of every this-many-th step (null: no others); last.ckpt is always kept", minimum=1
    )
    seed: int = option(0, "seed of the initialisation")
    channels_last: str | bool = option(
        "auto", "NHWC memory layout: auto (on with a GPU), true or false", choices=("auto", True, False)
    )
    compile: bool = option(False, "torch.compile the network (minutes of compile time; pays off on long GPU runs)")
    zero_init_residual: bool = option(
        True, "the last batch-norm gamma of every residual block starts at zero (Goyal et al.; the paper's recipe)"
    )
    restart: bool = option(False, "set an existing run in run_dir aside (renamed RUN_DIR.N) and start over")
    stop_after_step: int | None = option(
        None,
        "fault injection for tests: the process kills itself (SIGKILL) right "
        "after the checkpoint of this step is written",
        minimum=1,
    )
    data: PretrainDataConfig = section(PretrainDataConfig, "training and held-out data")
    optim: OptimConfig = section(OptimConfig, "SGD and the lr schedule")
    trainer: TrainerConfig = section(TrainerConfig, "pytorch_lightning.Trainer arguments")
    wandb: PretrainWandbConfig = section(PretrainWandbConfig, "Weights & Biases logging")


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's loss: cross-entropy between softmax(logits) and the 1/k target distribution."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class HashtagPretraining(NetworkModule):
    """ResNeXt + hashtag head, trained with the paper's loss; logs what a user watches."""

    def __init__(
        self,
        model: str,
        num_classes: int,
        batch_size: int,
        max_steps: int,
        optim: dict | None = None,
        channels_last: bool = False,
        vocab_sha256: str = "",
        compile: bool = False,
        config: dict | None = None,
        zero_init_residual: bool = False,
        most_frequent_class: int = 0,
        shards_prepared: dict | None = None,
    ):
        super().__init__()
        # `config`: the whole run config, kept in every checkpoint and release; `shards_prepared`:
        # how the shards were written (`wsl.data.shards.shard_preparation`: stored resized or not)
        self.save_hyperparameters()
        self.optim = OptimConfig(**(optim or {}))
        self.build_network(model, num_classes, channels_last, compile, zero_init_residual)
        self.val_precision = torch.nn.ModuleDict({k: MeanMetric() for k in ("p1", "p5", "most_frequent_p1")})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = soft_target_cross_entropy(self(batch["image"]), batch["target"])
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        positive = batch["target"] > 0
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.val_precision["p1"].update(positive.gather(1, top5[:, :1]).float().mean(1))
        self.val_precision["p5"].update(positive.gather(1, top5).float().mean(1))
        # The baseline: always predict the most frequent class (not class 0: synset vocabularies are in wnid order).
        self.val_precision["most_frequent_p1"].update(positive[:, self.hparams.most_frequent_class].float())

    def on_validation_epoch_end(self) -> None:
        names = {"p1": "val/precision@1", "p5": "val/precision@5", "most_frequent_p1": "val/precision@1_most_frequent"}
        for name, metric in self.val_precision.items():
            self.log(names[name], metric.compute())  # MeanMetric.compute() already reduces over ranks
            metric.reset()

    def configure_optimizers(self):
        global_batch = self.hparams.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        return configure_sgd(self.net, self.optim, global_batch, self.hparams.max_steps)


class HashtagTargetsCollate:
    """Eval batches with the 1/k target; images with no in-vocabulary hashtag are left out."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, samples: list[dict]) -> dict:
        kept = [(s, ids) for s in samples if (ids := self.vocab.class_ids(s["hashtags"].split("\n")))]
        return {
            "image": torch.stack([s["image"] for s, _ in kept]) if kept else torch.empty(0, 3, 1, 1),
            "target": torch.stack([self.vocab.soft_target(ids) for _, ids in kept])
            if kept
            else torch.empty(0, len(self.vocab)),
            "key": [s["key"] for s, _ in kept],
        }


class HashtagShards(StreamDataModule):
    """Training stream and held-out shards of a pretraining config."""

    def __init__(self, data: PretrainDataConfig, vocab: Vocabulary):
        super().__init__()
        self.data = data
        self.vocab = vocab
        self.train_loader: TrainLoader | None = None

    def train_dataloader(self) -> TrainLoader:
        self.train_loader = TrainLoader(self.data, self.vocab, position=self.stream_position)
        return self.train_loader

    def val_dataloader(self):
        if not self.data.val_shards:
            return []
        size = self.data.image_size
        return torch.utils.data.DataLoader(
            EvalDataset(self.data.val_shards, EvalTransform(size, round(size * 256 / 224))),
            batch_size=self.data.batch_size,
            num_workers=self.data.num_workers,
            collate_fn=HashtagTargetsCollate(self.vocab),
        )


class StopAfterStep(Checkpoint):
    """Fault injection (`stop_after_step`): SIGKILL this process right after the checkpoints of
    a step are on disk, so a kill-and-resume test knows exactly where the run died. A
    `Checkpoint` callback, so Lightning runs it after the ModelCheckpoint listed before it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def run_pretraining(config: Config, callbacks: list[pl.Callback] | None = None) -> dict:
    """Train (or resume) as `config` says; returns the final step, metrics and paths.
    `callbacks` are added to the Trainer's (yours, e.g. for extra logging). Every input is
    checked before the run directory, the model or a W&B run is made."""
    data = config.data
    require_file(data.vocab, "data.vocab", "vocabulary file")
    vocab = Vocabulary.load(data.vocab)
    train_urls = expand_shard_spec(data.shards)
    vocab.check_matches(train_urls)
    val_urls = expand_shard_spec(data.val_shards) if data.val_shards else []
    run_dir = Path(config.run_dir)
    start_run(run_dir, config, "pretrain", config.restart)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    trainer_args, channels_last = resolve_hardware(config.trainer, config.channels_last)
    datamodule = HashtagShards(data, vocab)
    logged = to_dict(config)
    prepared = shard_preparation(train_urls + val_urls)  # with the config, into W&B and every checkpoint
    module = HashtagPretraining(
        config.model,
        len(vocab),
        data.batch_size,
        config.max_steps,
        to_dict(config.optim),
        channels_last,
        vocab.sha256,
        config.compile,
        logged,
        config.zero_init_residual,
        int(vocab.counts.argmax()),
        prepared,
    )
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=config.checkpoint_every_steps,
        save_top_k=-1,
        save_last=True,
    )
    retention = CheckpointRetention(
        run_dir / "checkpoints", config.keep_last_checkpoints, config.keep_checkpoint_every_steps
    )
    extra = [retention, *([StopAfterStep(config.stop_after_step)] if config.stop_after_step else [])]
    trainer = make_trainer(
        run_dir,
        config.wandb,
        trainer_args,
        checkpoints,
        [TrainingMonitor(vocab, table_every=config.wandb.table_every), *extra, *(callbacks or [])],
        logged | {"vocab_sha256": vocab.sha256, "shards_prepared": prepared},
        max_steps=config.max_steps,
        max_epochs=-1,
        val_check_interval=config.val_every_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=data.val_batches or 1.0,
    )
    return fit_and_report(trainer, module, datamodule, run_dir)


def main(config: Config) -> str:
    result = run_pretraining(config)
    metrics = result["metrics"]
    headline = (
        f"held-out hashtag precision@1: {metrics['val/precision@1']:.3f}  (always predicting the most frequent "
        f"hashtag: {metrics['val/precision@1_most_frequent']:.3f})"
        if "val/precision@1" in metrics
        else None
    )
    return run_summary(result, headline)
