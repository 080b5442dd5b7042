"""Fine-tuning a (hashtag-)pretrained backbone on a labelled image set, and validating one.

The released WSL models are hashtag-pretrained ResNeXts fine-tuned on ImageNet-1k; this is
that stage. Data: ImageNet's class folders, Kaggle's flat `val/` + `LOC_val_solution.csv`, or
labelled shards (`key.jpg` + `key.cls`), and any other labelled image folder the same way.
Starting weights come through `wsl.checkpoints.load_weights` (nothing is unpickled with code);
the checkpoint's head is dropped and a new one made for the dataset's classes. The loop, DDP,
resuming, W&B and CSV logging are `wsl.train.runner`'s, as for pretraining. Validation counts every
image once on any number of processes (`wsl.data.EvalDataset`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from wsl.config import WandbConfig, option, require_file, section, to_dict
from wsl.data.evalset import EvalDataset
from wsl.data.folders import LabelledImageFolder, collate_labelled, is_image_folder, labelled_images
from wsl.data.shards import expand_shard_spec
from wsl.data.stream import TrainDataConfig, TrainLoader, crop_scale_problem
from wsl.data.transforms import EvalTransform, TrainTransform
from wsl.errors import WslError
from wsl.eval.accounting import Accounting
from wsl.models import model_name_problem
from wsl.release.checkpoints import load_weights
from wsl.train.module import NetworkModule, StreamDataModule, TrainingMonitor
from wsl.train.optim import OptimConfig, configure_sgd
from wsl.train.runner import (
    TrainerConfig,
    fit_and_report,
    make_trainer,
    resolve_hardware,
    resume_checkpoint,
    run_summary,
    start_run,
)


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The `optim:` section of a fine-tuning config: pretraining's, plus the fine-tuning knobs."""

    nesterov: bool = option(False, "Nesterov momentum")
    warmup_epochs: float = option(0.0, "when > 0, sets warmup_steps from the epoch length", minimum=0)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", minimum=0)
    backbone_lr_scale: float = option(1.0, "the backbone's lr = the head's x this (e.g. 0.1)", minimum=0)


@dataclass
class FinetuneDataConfig:
    """The `data:` section of a fine-tuning config."""

    train: str | None = option(None, "class folders (ImageNet's train/) or labelled shards (key.jpg + key.cls)")
    val: str | None = option(None, "class folders, a flat folder with a labels file, or labelled shards")
    val_labels: str | None = option(None, "labels of a flat val folder; null: Kaggle's LOC_val_solution.csv, found")
    num_classes: int | None = option(None, "labelled shards only (folders count their class folders)", minimum=1)
    batch_size: int = option(32, "images per device and step", minimum=1)
    num_workers: int = option(4, "DataLoader workers per device", minimum=0)
    image_size: int = option(224, "RandomResizedCrop size; eval: CenterCrop(image_size) of Resize(resize)", minimum=8)
    resize: int = option(256, "eval: the shorter side before the center crop", minimum=8)
    crop_scale: tuple[float, float] = option((0.08, 1.0), "RandomResizedCrop's area range", check=crop_scale_problem)
    samples_per_epoch: int | None = option(None, "labelled shards without sizes.json: samples an epoch", minimum=1)
    shuffle_buffer: int = option(2000, "labelled shards: samples in each worker's shuffle buffer", minimum=0)
    resampled: bool = option(True, "labelled shards: draw shards with replacement")


@dataclass
class Config:
    """`wsl finetune`: fine-tune a backbone on a labelled image set, or (validate=true) only validate one."""

    run_dir: str = option("runs/finetune", "run directory: config.yaml, checkpoints, metrics, W&B files")
    model: str = option("resnext101_32x8d", "registry model (wsl.models)", check=model_name_problem)
    weights: str | None = option(
        None,
        ".ckpt (wsl pretrain/finetune), .pth (WSL-Images, torchvision), .safetensors "
        "(timm, exported); null: random initialisation",
    )
    dedup_reports: list[str] = option(
        [], "`wsl dedup` reports: val images found copied in pretraining count as errors (val/top1_lower_bound)"
    )
    check_hash: bool = option(
        False, "check the hash prefix of any weights file name (the published WSL-Images/torchvision ones always are)"
    )
    head: str = option(
        "new", "new: a fresh classifier for the data's classes; keep: the checkpoint's", choices=("new", "keep")
    )
    validate: bool = option(False, "only print val top-1/top-5 of `weights` with its own classifier; nothing trained")
    freeze_backbone: bool = option(False, "train the classifier only, batch-norm statistics frozen (augmented probe)")
    epochs: int = option(30, "epochs of the whole run", minimum=1)
    val_every_epochs: int = option(1, "epochs between validations", minimum=1)
    seed: int = option(0, "seed of the initialisation and the data order")
    channels_last: str | bool = option(
        "auto", "NHWC memory layout: auto (on with a GPU), true or false", choices=("auto", True, False)
    )
    compile: bool = option(False, "torch.compile the network")
    restart: bool = option(False, "set an existing run in run_dir aside (renamed RUN_DIR.N) and start over")
    data: FinetuneDataConfig = section(FinetuneDataConfig, "labelled train and val data")
    optim: FinetuneOptimConfig = section(FinetuneOptimConfig, "SGD and the lr schedule")
    trainer: TrainerConfig = section(TrainerConfig, "pytorch_lightning.Trainer arguments")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases logging")


class ImageClassifier(NetworkModule):
    """ResNeXt + a classifier for the data's classes: cross-entropy (optionally label-smoothed),
    val top-1/top-5 with torchmetrics, a lower backbone lr if asked. With `freeze_backbone`
    only the classifier learns and the backbone stays in eval mode (torchvision's / SWAG's
    linear probe on the frozen network, with augmentation)."""

    def __init__(
        self,
        model: str,
        num_classes: int,
        batch_size: int,
        epochs: int,
        optim: dict | None = None,
        channels_last: bool = False,
        compile: bool = False,
        classes: list[str] | None = None,
        freeze_backbone: bool = False,
        config: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()  # `config`: the whole run config, kept in every checkpoint and release
        self.optim = FinetuneOptimConfig(**(optim or {}))
        self.build_network(model, num_classes, channels_last, compile)
        if freeze_backbone:
            for name, param in self.net.named_parameters():
                param.requires_grad_(name.startswith("fc."))
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.val_images = SumMetric()
        # Lower-bound accuracy (the paper's: images copied in the pretraining data count as errors) and ReaL.
        self.accounting = Accounting()
        self.val_counts = torch.nn.ModuleDict({name: SumMetric() for name in Accounting.COUNTS})
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
        counts = self.accounting.counts(logits.argmax(1).tolist(), batch["target"].tolist(), batch["key"])
        for name, count in counts.items():
            self.val_counts[name].update(torch.tensor(count))

    def on_validation_epoch_end(self) -> None:
        # compute() sums the states over ranks; each image was seen by exactly one rank.
        self.log("val/top1", self.val_top1.compute())
        self.log("val/top5", self.val_top5.compute())
        images = self.val_images.compute()
        self.log("val/images", images)
        counts = {name: float(metric.compute()) for name, metric in self.val_counts.items()}
        for name, value in self.accounting.rates(counts, float(images)).items():
            self.log(f"val/{name}", value)
        for metric in (self.val_top1, self.val_top5, self.val_images, *self.val_counts.values()):
            metric.reset()

    def configure_optimizers(self):
        steps = int(self.trainer.estimated_stepping_batches)
        optim = self.optim
        if optim.warmup_epochs > 0:
            optim = replace(optim, warmup_steps=round(optim.warmup_epochs * steps / max(1, self.hparams.epochs)))
        global_batch = self.hparams.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        return configure_sgd(self.net, optim, global_batch, steps, lr_scales={"fc.": 1.0, "": optim.backbone_lr_scale})


class LabelledImages(StreamDataModule):
    """Train and val sets of a fine-tuning config. The class list comes from the training
    folder (or, for validation alone, the val folder or its labels file) and is checked against
    the val set at construction, before any run starts."""

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
                raise WslError(
                    f"data.batch_size {data.batch_size} is more than the {len(self.train_items)} images of {data.train}"
                )
            self.train_loader = torch.utils.data.DataLoader(
                LabelledImageFolder(data.train, self.train_items, transform),
                batch_size=data.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=data.num_workers,
                collate_fn=collate_labelled,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=data.num_workers > 0,
            )
            return self.train_loader
        shards = TrainDataConfig(
            shards=data.train,
            num_classes=self.num_classes,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            image_size=data.image_size,
            crop_scale=data.crop_scale,
            resampled=data.resampled,
            shuffle_buffer=data.shuffle_buffer,
            samples_per_epoch=data.samples_per_epoch,
            seed=self.seed,
        )
        self.train_loader = TrainLoader(shards, vocab=None, position=self.stream_position)
        return self.train_loader

    def val_dataloader(self):
        data = self.config
        dataset = EvalDataset(
            data.val, EvalTransform(data.image_size, data.resize), classes=self.classes, labels_file=data.val_labels
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            collate_fn=collate_labelled,
            pin_memory=torch.cuda.is_available(),
        )


def _check_inputs(config: Config, train: bool) -> None:
    """Every input path, before a model, a run directory or a W&B run is made."""
    for key, value in (("data.train", config.data.train if train else None), ("data.val", config.data.val)):
        if value is None:
            continue
        if Path(value).is_dir():
            continue
        if "{" not in value and "::" not in value and "://" not in value and not Path(value).exists():
            raise WslError(f"{key} not found: {value}")
        expand_shard_spec(value)  # names a missing shard of a pattern
    if config.data.val_labels:
        require_file(config.data.val_labels, "data.val_labels", "labels file")
    if config.weights:
        require_file(config.weights, "weights", "weights file")
    for index, report in enumerate(config.dedup_reports):
        require_file(report, f"dedup_reports[{index}]", "dedup report")


def run_finetuning(config: Config, callbacks: list[pl.Callback] | None = None) -> dict:
    """Fine-tune (or resume) as `config` says; returns the final step, metrics, paths and the
    one-line report of the starting weights."""
    _check_inputs(config, train=True)
    datamodule = LabelledImages(config.data, config.seed)
    run_dir = Path(config.run_dir)
    start_run(run_dir, config, "finetune", config.restart)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    trainer_args, channels_last = resolve_hardware(config.trainer, config.channels_last)
    logged = to_dict(config)
    module = ImageClassifier(
        config.model,
        datamodule.num_classes,
        config.data.batch_size,
        config.epochs,
        to_dict(config.optim),
        channels_last,
        config.compile,
        datamodule.classes,
        config.freeze_backbone,
        logged,
    )
    module.accounting = Accounting(config.dedup_reports, datamodule.classes)  # lower-bound and ReaL top-1
    if resume_checkpoint(run_dir) is not None:
        start = "resumed (weights from the run's checkpoint)"
    elif config.weights:
        start = load_weights(module.net, config.weights, config.model, head=config.head, check_hash=config.check_hash)
    else:
        start = "random initialisation"
    rank_zero_only(print)(f"start: {start}")
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor="val/top1",
        mode="max",
        save_top_k=1,
        save_last=True,
    )
    trainer = make_trainer(
        run_dir,
        config.wandb,
        trainer_args,
        checkpoints,
        [TrainingMonitor(), *(callbacks or [])],
        logged | {"num_classes": datamodule.num_classes},
        max_epochs=config.epochs,
        check_val_every_n_epoch=config.val_every_epochs,
        num_sanity_val_steps=0,
    )
    return fit_and_report(trainer, module, datamodule, run_dir, {"start": start})


def run_validation(config: Config) -> dict:
    """Top-1/top-5 of `config.weights`, with the checkpoint's own classifier, on data.val.
    The class order is the val set's own (sorted class folders or labels-file classes: the
    order of ImageNet's released 1000-class heads); the training set is not read."""
    if not config.weights:
        raise WslError("validation needs weights=PATH (a fine-tuned checkpoint or released .pth/.safetensors)")
    _check_inputs(config, train=False)
    datamodule = LabelledImages(config.data, config.seed, train=False)
    trainer_args, channels_last = resolve_hardware(config.trainer, config.channels_last)
    module = ImageClassifier(
        config.model,
        datamodule.num_classes,
        config.data.batch_size,
        1,
        to_dict(config.optim),
        channels_last,
        False,
        datamodule.classes,
    )
    module.accounting = Accounting(config.dedup_reports, datamodule.classes)  # lower-bound and ReaL top-1
    start = load_weights(module.net, config.weights, config.model, head="keep", check_hash=config.check_hash)
    rank_zero_only(print)(f"weights: {start}")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **trainer_args)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "start": start}


def _accuracy(metrics: dict) -> str:
    extra = ""
    if "val/top1_lower_bound" in metrics:
        extra += (
            f"  lower-bound top-1 {100 * metrics['val/top1_lower_bound']:.2f} "
            f"({metrics['val/copied_in_pretraining']:.0f} copied in pretraining count as errors)"
        )
    if "val/real_top1" in metrics:
        extra += (
            f"  ReaL top-1 {100 * metrics['val/real_top1']:.2f} ({metrics['val/real_images']:.0f} with ReaL labels)"
        )
    return (
        f"val top-1 {100 * metrics['val/top1']:.2f}  top-5 {100 * metrics['val/top5']:.2f}{extra}  "
        f"({metrics['val/images']:.0f} images"
    )


def main(config: Config) -> str:
    if config.validate:
        metrics = run_validation(config)["metrics"]
        return f"{_accuracy(metrics)} of {config.data.val})" if rank_zero_only.rank == 0 else ""
    result = run_finetuning(config)
    metrics = result["metrics"]
    headline = (
        f"{_accuracy(metrics)}; start: {config.weights or 'random initialisation'})" if "val/top1" in metrics else None
    )
    return run_summary(result, headline)
