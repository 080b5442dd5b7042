"""What both training stages share: the network module base, the data module base that
seeds the training stream, and the training monitor."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from wsl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsl.models import build_model


class NetworkModule(pl.LightningModule):
    """A registry network (`self.net`, torchvision's keys) with the speed switches both stages use."""

    def build_network(
        self, model: str, num_classes: int, channels_last: bool, compile: bool, zero_init_residual: bool = False
    ) -> None:
        self.net = build_model(model, num_classes, zero_init_residual=zero_init_residual)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        if compile:
            self.net.compile()  # in place: state-dict keys stay torchvision's

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)


class StreamDataModule(pl.LightningDataModule):
    """A data module whose training stream is seeded by the loop's (epoch, optimizer step),
    read when each epoch's iteration starts: every epoch, and a resumed run, draws a fresh
    stream (`wsl.data.stream.TrainLoader`). Loaders are built in the hooks, in each rank's
    process after the process group exists, so they see their rank."""

    def stream_position(self) -> tuple[int, int]:
        return (self.trainer.current_epoch, self.trainer.global_step) if self.trainer is not None else (0, 0)


class TrainingMonitor(pl.Callback):
    """Logs what a user watches: images/s overall and per device, the share of step
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
        loggers[0].log_table(
            "samples", columns=["image", "hashtags", "top-5 predicted"], data=rows, step=trainer.global_step
        )
