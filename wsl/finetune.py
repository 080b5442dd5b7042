"""Fine-tuning a (hashtag-)pretrained backbone on a labelled image set, and validating one.

The released WSL models are hashtag-pretrained ResNeXts fine-tuned on ImageNet-1k; this is
that stage. Data: ImageNet's class folders, Kaggle's flat `val/` + `LOC_val_solution.csv`, or
labelled shards (`key.jpg` + `key.cls`), and any other labelled image folder the same way.
Starting weights come through `wsl.checkpoints.load_weights` (nothing is unpickled with code);
the checkpoint's head is dropped and a new one made for the dataset's classes. The loop, DDP,
resuming, W&B and CSV logging are `wsl.run`'s, as for pretraining. Validation counts every
image once on any number of processes (`wsl.data.EvalDataset`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from wsl.checkpoints import load_weights
from wsl.data import (EvalDataset, LabelledImageFolder, TrainDataConfig, TrainLoader, collate_labelled, is_image_folder,
                      labelled_images)
from wsl.errors import WslError
from wsl.optim import OptimConfig, configure_sgd
from wsl.pretrain import NetworkModule, TrainingMonitor
from wsl.run import TRAINER_DEFAULTS, WANDB_DEFAULTS, fit_and_report, make_trainer, resolve_hardware, resume_checkpoint
from wsl.transforms import EvalTransform, TrainTransform


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The `optim:` section of a fine-tuning config: pretraining's, plus the fine-tuning knobs."""

    nesterov: bool = False
    warmup_epochs: float = 0.0  # when > 0, sets warmup_steps from the epoch length
    label_smoothing: float = 0.0
    backbone_lr_scale: float = 1.0  # the backbone's lr = the head's x this (e.g. 0.1)


@dataclass
class FinetuneDataConfig:
    """The `data:` section of a fine-tuning config."""

    train: str | None = None  # class folders (ImageNet's train/) or labelled shards (key.jpg + key.cls)
    val: str | None = None  # class folders, a flat folder with a labels file, or labelled shards
    val_labels: str | None = None  # labels of a flat val folder; default: Kaggle's LOC_val_solution.csv, found
    num_classes: int | None = None  # labelled shards only (folders count their class folders)
    batch_size: int = 32  # per device
    num_workers: int = 4
    image_size: int = 224  # RandomResizedCrop size; eval: CenterCrop(image_size) of Resize(resize)
    resize: int = 256
    crop_scale: tuple[float, float] = (0.08, 1.0)
    samples_per_epoch: int | None = None  # labelled shards without sizes.json
    shuffle_buffer: int = 2000  # labelled shards
    resampled: bool = True  # labelled shards: draw shards with replacement


DEFAULTS = {
    "run_dir": "runs/finetune",
    "model": "resnext101_32x8d",
    "weights": None,  # .ckpt (wsl pretrain/finetune), .pth (WSL-Images, torchvision), .safetensors (timm, exported); null: random init
    "head": "new",  # new: a fresh classifier for the data's classes; keep: the checkpoint's (validating a fine-tuned model)
    "freeze_backbone": False,  # train the classifier only, batch-norm statistics frozen: the augmented linear probe
    "epochs": 30,
    "val_every_epochs": 1,
    "seed": 0,
    "channels_last": "auto",
    "compile": False,
    "data": asdict(FinetuneDataConfig()),
    "optim": asdict(FinetuneOptimConfig()),
    "trainer": TRAINER_DEFAULTS,
    "wandb": WANDB_DEFAULTS,
}


class ImageClassifier(NetworkModule):
    """ResNeXt + a classifier for the data's classes: cross-entropy (optionally label-smoothed),
    val top-1/top-5 with torchmetrics, a lower backbone lr if asked. With `freeze_backbone`
    only the classifier learns and the backbone stays in eval mode (torchvision's / SWAG's
    linear probe on the frozen network, with augmentation)."""

    def __init__(self, model: str, num_classes: int, batch_size: int, epochs: int, optim: dict | None = None,
                 channels_last: bool = False, compile: bool = False, classes: list[str] | None = None,
                 freeze_backbone: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.optim = FinetuneOptimConfig(**(optim or {}))
        self.build_network(model, num_classes, channels_last, compile)
        if freeze_backbone:
            for name, param in self.net.named_parameters():
                param.requires_grad_(name.startswith("fc."))
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.val_images = SumMetric()
        self.skipped_images = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hparams.freeze_backbone:  # batch-norm statistics frozen too (Lightning restores train mode per loop)
            for name, child in self.net.named_children():
                child.train(name == "fc")
        logits = self(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["target"], label_smoothing=self.optim.label_smoothing)
        size = batch["image"].shape[0]
        self.skipped_images += batch.get("skipped", 0)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/top1", (logits.argmax(1) == batch["target"]).float().mean(), batch_size=size)
        self.log("train/lr", max(group["lr"] for group in self.optimizers().param_groups), batch_size=size)
        if self.skipped_images:
            self.log("data/skipped_corrupt_image", float(self.skipped_images), batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if (batch["target"] < 0).any():
            raise WslError("validation samples without a label (shards with no .cls member)")
        logits = self(batch["image"]).float()
        self.val_top1.update(logits, batch["target"])
        self.val_top5.update(logits, batch["target"])
        self.val_images.update(torch.tensor(float(len(batch["target"]))))

    def on_validation_epoch_end(self) -> None:
        # compute() sums the states over ranks; each image was seen by exactly one rank.
        self.log("val/top1", self.val_top1.compute())
        self.log("val/top5", self.val_top5.compute())
        self.log("val/images", self.val_images.compute())
        for metric in (self.val_top1, self.val_top5, self.val_images):
            metric.reset()

    def configure_optimizers(self):
        steps = int(self.trainer.estimated_stepping_batches)
        optim = self.optim
        if optim.warmup_epochs > 0:
            optim = replace(optim, warmup_steps=round(optim.warmup_epochs * steps / max(1, self.hparams.epochs)))
        global_batch = self.hparams.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        return configure_sgd(self.net, optim, global_batch, steps, lr_scales={"fc.": 1.0, "": optim.backbone_lr_scale})


class LabelledImages(pl.LightningDataModule):
    """Train and val sets of a fine-tuning config. The class list comes from the training
    folder (or, for validation alone, the val folder or its labels file) and is checked against
    the val set at construction, before any run starts. Loaders are built in the hooks, in each
    rank's process, so that they see their rank."""

    def __init__(self, data: FinetuneDataConfig, seed: int = 0, train: bool = True):
        super().__init__()
        self.config = data
        self.seed = seed
        self.classes: list[str] | None = None
        self.train_items: list[tuple[str, int]] | None = None
        self.train_loader = None
        if train:
            if not data.train:
                raise WslError("the config needs data.train")
            if is_image_folder(data.train):
                self.classes, self.train_items = labelled_images(data.train)
        if not data.val:
            raise WslError("the config needs data.val")
        if is_image_folder(data.val):
            self.classes, _ = labelled_images(data.val, self.classes, data.val_labels)
        self.num_classes = len(self.classes) if self.classes else data.num_classes
        if not self.num_classes:
            raise WslError("labelled shards need data.num_classes (folders count their class folders)")
        if self.classes and data.num_classes and data.num_classes != len(self.classes):
            raise WslError(f"data.num_classes is {data.num_classes} but the folders hold {len(self.classes)} classes")

    def train_dataloader(self):
        data = self.config
        transform = TrainTransform(data.image_size, tuple(data.crop_scale))
        if self.train_items is not None:  # Lightning adds the DistributedSampler and sets its epoch
            if len(self.train_items) < data.batch_size:  # drop_last would leave no batch at all
                raise WslError(f"data.batch_size {data.batch_size} is more than the {len(self.train_items)} "
                               f"images of {data.train}")
            self.train_loader = torch.utils.data.DataLoader(
                LabelledImageFolder(data.train, self.train_items, transform), batch_size=data.batch_size, shuffle=True,
                drop_last=True, num_workers=data.num_workers, collate_fn=collate_labelled,
                pin_memory=torch.cuda.is_available(), persistent_workers=data.num_workers > 0,
            )
            return self.train_loader
        shards = TrainDataConfig(shards=data.train, num_classes=self.num_classes, batch_size=data.batch_size,
                                 num_workers=data.num_workers, image_size=data.image_size, crop_scale=data.crop_scale,
                                 resampled=data.resampled, shuffle_buffer=data.shuffle_buffer,
                                 samples_per_epoch=data.samples_per_epoch, seed=self.seed)
        self.train_loader = TrainLoader(shards, vocab=None)
        if self.trainer is not None:  # see HashtagShards
            self.train_loader.set_epoch(self.trainer.current_epoch, self.trainer.global_step)
        return self.train_loader

    def val_dataloader(self):
        data = self.config
        dataset = EvalDataset(data.val, EvalTransform(data.image_size, data.resize), classes=self.classes,
                              labels_file=data.val_labels)
        return torch.utils.data.DataLoader(dataset, batch_size=data.batch_size, num_workers=data.num_workers,
                                           collate_fn=collate_labelled, pin_memory=torch.cuda.is_available())


def _data_config(config: dict) -> FinetuneDataConfig:
    return FinetuneDataConfig(**{f.name: config["data"][f.name] for f in fields(FinetuneDataConfig)})


def run_finetuning(config: dict, callbacks: list[pl.Callback] | None = None) -> dict:
    """Fine-tune (or resume) as `config` says; returns the final step, metrics, paths and the
    one-line report of the starting weights."""
    run_dir = Path(config["run_dir"])
    pl.seed_everything(config["seed"], workers=True, verbose=False)
    datamodule = LabelledImages(_data_config(config), config["seed"])
    trainer_args, channels_last = resolve_hardware(config)
    module = ImageClassifier(config["model"], datamodule.num_classes, datamodule.config.batch_size, config["epochs"],
                             config["optim"], channels_last, config["compile"], datamodule.classes, config["freeze_backbone"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_checkpoint(run_dir) is not None:
        start = "resumed (weights from the run's checkpoint)"
    elif config["weights"]:
        start = load_weights(module.net, config["weights"], config["model"], head=config["head"])
    else:
        start = "random initialisation"
    rank_zero_only(print)(f"start: {start}")
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-epoch{epoch:03d}",
                                  auto_insert_metric_name=False, monitor="val/top1", mode="max", save_top_k=1,
                                  save_last=True)
    trainer = make_trainer(
        config, trainer_args, checkpoints, [TrainingMonitor(), *(callbacks or [])],
        config | {"num_classes": datamodule.num_classes},
        max_epochs=config["epochs"], check_val_every_n_epoch=config["val_every_epochs"], num_sanity_val_steps=0,
    )
    return fit_and_report(trainer, module, datamodule, run_dir, {"start": start})


def run_validation(config: dict) -> dict:
    """Top-1/top-5 of `config["weights"]`, with the checkpoint's own classifier, on data.val.
    The class order is the val set's own (sorted class folders or labels-file classes: the
    order of ImageNet's released 1000-class heads); the training set is not read."""
    if not config["weights"]:
        raise WslError("validation needs weights=PATH (a fine-tuned checkpoint or released .pth/.safetensors)")
    datamodule = LabelledImages(_data_config(config), config["seed"], train=False)
    trainer_args, channels_last = resolve_hardware(config)
    module = ImageClassifier(config["model"], datamodule.num_classes, datamodule.config.batch_size, 1, config["optim"],
                             channels_last, False, datamodule.classes)
    start = load_weights(module.net, config["weights"], config["model"], head="keep")
    rank_zero_only(print)(f"weights: {start}")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **trainer_args)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "start": start}
