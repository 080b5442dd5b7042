"""Hashtag pretraining: the LightningModule (the paper's loss and schedule), its data module and
training monitor. `wsl.run` builds the run from a config.

Loss: softmax cross-entropy against the 1/k target (Mahajan et al.); the optimiser is
`wsl.optim`'s (SGD, Nesterov momentum 0.9, linear scaling, warm-up, cosine or step). The run
stops at `max_steps` optimizer steps, so a run killed and resumed from its newest checkpoint
takes the same number of steps as one that was not.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from wsl.data import EvalDataset, TrainDataConfig, TrainLoader
from wsl.models import build_model
from wsl.optim import OptimConfig, configure_sgd
from wsl.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's loss: cross-entropy between softmax(logits) and the 1/k target distribution."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class NetworkModule(pl.LightningModule):
    """A registry network (`self.net`, torchvision's keys) with the speed switches both stages use."""

    def build_network(self, model: str, num_classes: int, channels_last: bool, compile: bool) -> None:
        self.net = build_model(model, num_classes)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        if compile:
            self.net.compile()  # in place: state-dict keys stay torchvision's

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)


class HashtagPretraining(NetworkModule):
    """ResNeXt + hashtag head, trained with the paper's loss; logs what a user watches."""

    def __init__(self, model: str, num_classes: int, batch_size: int, max_steps: int, optim: dict | None = None,
                 channels_last: bool = False, vocab_sha256: str = "", compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.optim = OptimConfig(**(optim or {}))
        self.build_network(model, num_classes, channels_last, compile)
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
        # The baseline: always predict the most frequent hashtag (class 0 of the vocabulary).
        self.val_precision["most_frequent_p1"].update(positive[:, 0].float())

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
            "target": torch.stack([self.vocab.soft_target(ids) for _, ids in kept]) if kept else torch.empty(0, len(self.vocab)),
            "key": [s["key"] for s, _ in kept],
        }


class HashtagShards(pl.LightningDataModule):
    """Training stream and held-out shards. Loaders are built in the hooks, in each rank's
    process after the process group exists, so they see their rank (torchrun, SLURM or
    Lightning's own launcher alike)."""

    def __init__(self, data: dict, vocab):
        super().__init__()
        self.train_config = TrainDataConfig(**{k: v for k, v in data.items() if k not in ("val_shards", "val_batches")})
        self.val_shards = data.get("val_shards")
        self.vocab = vocab
        self.train_loader: TrainLoader | None = None

    def train_dataloader(self) -> TrainLoader:
        self.train_loader = TrainLoader(self.train_config, self.vocab)
        # Lightning creates the first epoch's iterator (and pickles the stream into the
        # workers) before `on_train_epoch_start`; the restored step is already known here.
        self.train_loader.set_epoch(self.trainer.current_epoch, self.trainer.global_step)
        return self.train_loader

    def val_dataloader(self):
        if not self.val_shards:
            return []
        size = self.train_config.image_size
        return torch.utils.data.DataLoader(
            EvalDataset(self.val_shards, EvalTransform(size, round(size * 256 / 224))),
            batch_size=self.train_config.batch_size, num_workers=self.train_config.num_workers,
            collate_fn=HashtagTargetsCollate(self.vocab),
        )


class TrainingMonitor(pl.Callback):
    """Re-seeds a shard training stream by (epoch, step) at each epoch start (resumed runs
    included) and logs what a user watches: images/s overall and per device, the share of step
    time spent waiting for data, skipped-sample counters, and, given the hashtag vocabulary,
    every `table_every` steps a W&B table of sample images with their hashtags and the model's
    top-5 predicted hashtags."""

    def __init__(self, vocab=None, log_every: int = 10, table_every: int = 500, table_images: int = 8):
        self.vocab = vocab
        self.log_every = log_every
        self.table_every = table_every
        self.table_images = table_images
        self._last_end: float | None = None
        self._batch_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Later epochs' iterators are created after this hook (the first one: see HashtagShards).
        loader = getattr(trainer.datamodule, "train_loader", None)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(trainer.current_epoch, trainer.global_step)
        self._last_end = None  # the first batch of an epoch waits for worker start-up

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        size = batch["image"].shape[0]
        if self._last_end is not None:
            step_time = now - self._last_end
            module.log("train/images_per_sec_per_device", size / step_time, batch_size=size)
            module.log("train/images_per_sec", size * trainer.world_size / step_time, batch_size=size, prog_bar=True)
            module.log("train/data_wait_share", (self._batch_start - self._last_end) / step_time, batch_size=size)
        self._last_end = now
        if trainer.global_step % self.log_every == 0:
            for reason, count in getattr(trainer.datamodule.train_loader, "skip_counts", {}).items():
                module.log(f"data/skipped_{reason}", float(count), batch_size=size)
        if self.vocab is not None and self.table_every and trainer.global_step % self.table_every == 0:
            self._log_sample_table(trainer, module, batch)

    def _log_sample_table(self, trainer, module, batch) -> None:
        loggers = [lg for lg in trainer.loggers if lg.__class__.__name__ == "WandbLogger"]
        if not loggers or trainer.global_rank != 0:
            return
        import wandb

        images = batch["image"][: self.table_images]
        was_training = module.training
        module.eval()
        with torch.no_grad():
            top5 = module(images).float().topk(min(5, len(self.vocab)), dim=1).indices.cpu()
        module.train(was_training)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        rows = []
        for image, target, predicted in zip(images.float().cpu(), batch["target"].cpu(), top5):
            pixels = ((image * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            tags = " ".join(f"#{self.vocab.tags[i]}" for i in target.nonzero().flatten().tolist())
            guesses = " ".join(f"#{self.vocab.tags[i]}" for i in predicted.tolist())
            rows.append([wandb.Image(pixels), tags, guesses])
        loggers[0].log_table("samples", columns=["image", "hashtags", "top-5 predicted"], data=rows,
                             step=trainer.global_step)
