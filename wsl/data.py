"""Data pipelines over hashtag shards: the training stream and the exactly-once evaluation reader.

Training (`TrainLoader`), after OpenCLIP's `get_wds_dataset`: shards are drawn per rank and
worker (resampled with replacement by default, or shuffled and split by node and worker),
samples shuffled as bytes, labelled with the paper's 1/k target, resampled by hashtag
frequency, decoded in draft mode, batched in the workers. Every rank yields the same fixed
number of batches per epoch, so DDP never waits on a rank that ran out of shards. The stream
is seeded by (seed, epoch, step, rank, worker): a resumed run draws new samples rather than
replaying the ones it already saw (webdataset has no exact mid-epoch resume).

The same stream trains a classifier on labelled shards (`key.jpg` + `key.cls`, the layout of
the public ImageNet-1k WebDataset copies) when it is given no vocabulary.

Labelled image folders (`labelled_images`): ImageNet's class folders, or Kaggle's flat `val/`
with `LOC_val_solution.csv`; `LabelledImageFolder` is their map-style training set (Lightning's
DistributedSampler shards it).

Evaluation (`EvalDataset`): shards or an image folder, every sample yielded exactly once
across all ranks and workers, with its key.
"""

from __future__ import annotations

import collections
import csv
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from wsl.errors import WslError
from wsl.shards import expand_shard_spec, is_sample_member, read_sizes, sample_hashtags, sample_image_bytes
from wsl.transforms import EvalTransform, TrainTransform
from wsl.vocab import Vocabulary

log = logging.getLogger(__name__)

# Errors of bad data, skipped and counted. Anything else (TypeError, KeyError, ...) is a
# bug in code or config and propagates, as timm's webdataset handler does.
DATA_ERRORS = (OSError, ValueError, SyntaxError, EOFError, UnicodeDecodeError, Image.DecompressionBombError)


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size): torch.distributed's if initialised, else $RANK/$WORLD_SIZE, else (0, 1).

    Read when a dataset is built, in the main process: DataLoader workers started by spawn
    have no process group, so asking there would make every rank read everything.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def dataloader_worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker calling this; (0, 1) outside one."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass
class StreamSeed:
    """What seeds a training stream; set in the main process before each epoch (see module doc)."""

    seed: int = 0
    rank: int = 0
    epoch: int = 0
    step: int = 0

    def rng(self, purpose: str, per_worker: bool = True) -> random.Random:
        rank, worker = (self.rank, dataloader_worker()[0]) if per_worker else ("all", "all")
        return random.Random(f"{self.seed}/{self.epoch}/{self.step}/{rank}/{worker}/{purpose}")


class SkipCounter:
    """Counts skipped and dropped samples in one worker; logs the first and every `every`-th skip.

    Used as the webdataset `handler`: returns True (continue) for bad data, re-raises
    errors of code or config. Never sleeps (webdataset's `warn_and_continue` sleeps 0.5 s).
    """

    def __init__(self, every: int = 1000):
        self.every = every
        self.counts: collections.Counter = collections.Counter()

    def skip(self, reason: str, exn: BaseException | None = None, key: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n == 1 or n % self.every == 0:
            log.warning("skipped %s sample #%d %s: %s", reason, n, key, exn if exn is not None else "")

    def handler(self, exn: BaseException) -> bool:
        if not isinstance(exn, DATA_ERRORS):
            raise exn
        self.skip("unreadable", exn)
        return True


class ShardSource(IterableDataset):
    """Shard URLs for this rank and worker, forever: resampled, or shuffled and split."""

    def __init__(self, urls: list[str], seed: StreamSeed, resampled: bool = True, world_size: int = 1):
        self.urls = urls
        self.seed = seed
        self.resampled = resampled
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict]:
        rng = self.seed.rng("shards")
        if self.resampled:
            while True:
                yield {"url": rng.choice(self.urls)}
        rank, world_size = self.seed.rank, self.world_size
        worker, num_workers = dataloader_worker()
        order = list(self.urls)
        self.seed.rng("split", per_worker=False).shuffle(order)  # same order on every rank
        mine = order[rank::world_size][worker::num_workers]
        if not mine:
            raise WslError(
                f"{len(self.urls)} shards are too few for {world_size} ranks x {num_workers} workers "
                "without resampling: use resampled shards, fewer workers or more shards"
            )
        while True:  # a rank with fewer shards cycles them; the loader fixes the epoch length
            rng.shuffle(mine)
            for url in mine:
                yield {"url": url}


class HashtagTargets(wds.PipelineStage):
    """Sample -> {key, image bytes, class ids}, dropping images with no in-vocabulary hashtag and
    repeating each image by its resampling weight (Poisson-style: floor(w) + Bernoulli(frac(w))).

    An image's weight is the mean of n_c^-p over its classes c (n_c: images with class c),
    normalised so that the stream's rate stays that of the data. For single-class images the
    class frequencies in the stream are proportional to n_c^(1-p): p = 0 natural, 0.5 square
    root, 1 uniform.
    """

    def __init__(self, vocab: Vocabulary, exponent: float, seed: StreamSeed, counter: SkipCounter):
        counts = vocab.counts.clamp(min=1)
        self.class_weight = (counts**-exponent).tolist()
        self.normaliser = float((counts ** (1 - exponent)).sum() / counts.sum())
        self.vocab = vocab
        self.seed = seed
        self.counter = counter

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        rng = self.seed.rng("resample")
        for sample in src:
            key = sample.get("__key__", "")
            try:
                ids = self.vocab.class_ids(sample_hashtags(sample))
                image = sample_image_bytes(sample)
            except DATA_ERRORS as exn:
                self.counter.skip("bad_sample", exn, key)
                continue
            if not ids:
                self.counter.counts["dropped_no_vocab_hashtag"] += 1
                continue
            weight = sum(self.class_weight[i] for i in ids) / len(ids) / self.normaliser
            repeats = int(weight) + (rng.random() < weight - int(weight))
            for _ in range(repeats):
                yield {"__key__": key, "image": image, "class_ids": ids}

    def target(self, sample: dict) -> torch.Tensor:
        return self.vocab.soft_target(sample["class_ids"])


class ClassLabels(wds.PipelineStage):
    """Sample -> {key, image bytes, label} from a labelled shard's `.cls` member."""

    def __init__(self, num_classes: int, counter: SkipCounter):
        self.num_classes = num_classes
        self.counter = counter

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            key = sample.get("__key__", "")
            try:
                label = int(sample["cls"])
                image = sample_image_bytes(sample)
            except (KeyError, *DATA_ERRORS) as exn:  # a sample with no label is bad data here
                self.counter.skip("bad_sample", exn, key)
                continue
            if not 0 <= label < self.num_classes:
                raise WslError(f"sample {key} has label {label}, outside the {self.num_classes} classes: check data.num_classes")
            yield {"__key__": key, "image": image, "label": label}

    def target(self, sample: dict) -> torch.Tensor:
        return torch.tensor(sample["label"])


class DecodeAndBatch(wds.PipelineStage):
    """Decode + augment each image (skipping corrupt ones), then batch in the worker.

    Each batch carries its worker's cumulative skip counts, so the main process can
    report them without any side channel.
    """

    def __init__(self, target, transform, batch_size: int, counter: SkipCounter):
        self.target = target  # sample -> target tensor (the labelling stage's `target`)
        self.transform = transform
        self.batch_size = batch_size
        self.counter = counter

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        images, targets, keys = [], [], []
        for sample in src:
            try:
                images.append(self.transform(sample["image"]))
            except DATA_ERRORS as exn:
                self.counter.skip("corrupt_image", exn, sample["__key__"])
                continue
            targets.append(self.target(sample))
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield {
                    "image": torch.stack(images),
                    "target": torch.stack(targets),
                    "key": keys,
                    "worker": dataloader_worker()[0],
                    "counts": dict(self.counter.counts),
                }
                images, targets, keys = [], [], []


@dataclass
class TrainDataConfig:
    """The training data section of a config (`data:` in configs/pretrain/*.yaml)."""

    shards: str
    vocab: str | None = None  # hashtag vocabulary; None: labelled shards (`.cls`) of `num_classes` classes
    num_classes: int | None = None
    batch_size: int = 32
    num_workers: int = 4
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range (torchvision's default)
    resample_exponent: float = 0.5  # 0 natural, 0.5 square-root, 1 uniform per hashtag
    resampled: bool = True  # draw shards with replacement (OpenCLIP's default at scale)
    shuffle_buffer: int = 2000
    samples_per_epoch: int | None = None  # default: the shards' total from sizes.json
    seed: int = 0


class TrainLoader:
    """The training stream for one rank: `len(self)` batches an epoch on every rank.

    With a vocabulary, batches hold the hashtag targets; without one, the `.cls` labels.

    Call `set_epoch(epoch, step)` before iterating (the pretraining loop does) so that each
    epoch, and a resumed run, draws a fresh stream. `skip_counts` sums the workers' counters.
    """

    def __init__(self, config: TrainDataConfig, vocab: Vocabulary | None, rank: int | None = None,
                 world_size: int | None = None):
        self.config = config
        urls = expand_shard_spec(config.shards)
        if vocab is not None:
            vocab.check_matches(urls)
        elif not config.num_classes:
            raise WslError("labelled shards need data.num_classes")
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        samples = config.samples_per_epoch
        if samples is None:
            sizes = read_sizes(urls)
            if sizes is None:
                raise WslError(
                    f"the sample count of {config.shards} is unknown (no sizes.json beside the shards): "
                    "set data.samples_per_epoch"
                )
            samples = sum(sizes.values())
        self.num_batches = max(1, math.ceil(samples / (config.batch_size * world_size)))
        self.seed = StreamSeed(config.seed, rank)
        counter = SkipCounter()
        if vocab is not None:
            labelling = HashtagTargets(vocab, config.resample_exponent, self.seed, counter)
        else:
            labelling = ClassLabels(config.num_classes, counter)
        self.pipeline = wds.DataPipeline(
            ShardSource(urls, self.seed, config.resampled, world_size),
            wds.tarfile_to_samples(handler=counter.handler, select_files=is_sample_member),
            labelling,
            _SeededShuffle(config.shuffle_buffer, self.seed),
            DecodeAndBatch(labelling.target, TrainTransform(config.image_size, tuple(config.crop_scale)), config.batch_size, counter),
        )
        self._worker_counts: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        self.seed.epoch, self.seed.step = epoch, step

    def __iter__(self) -> Iterator[dict]:
        loader = wds.WebLoader(
            self.pipeline,
            batch_size=None,
            num_workers=self.config.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.config.num_workers else None,
        ).with_epoch(self.num_batches)
        for batch in loader:
            self._worker_counts[batch.pop("worker")] = batch.pop("counts")
            yield batch

    @property
    def skip_counts(self) -> dict[str, int]:
        """Samples skipped or dropped so far this epoch, summed over workers, by reason."""
        total: collections.Counter = collections.Counter()
        for counts in self._worker_counts.values():
            total.update(counts)
        return dict(total)


class _SeededShuffle(wds.PipelineStage):
    """webdataset's shuffle buffer, with an rng seeded per worker by the stream seed."""

    def __init__(self, bufsize: int, seed: StreamSeed):
        self.bufsize = bufsize
        self.seed = seed

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        return wds.shuffle(self.bufsize, initial=self.bufsize // 2, rng=self.seed.rng("shuffle"))(src)


LABELS_FILE = "LOC_val_solution.csv"  # Kaggle's ImageNet: labels of the flat val/ folder


def read_labels_file(path: Path) -> dict[str, str]:
    """Image name (no extension) -> class name, from Kaggle's `LOC_val_solution.csv`
    (`ImageId,PredictionString`; the class is the string's first token) or any `image,class` CSV."""
    labels = {}
    with open(path, newline="") as rows:
        for line, row in enumerate(csv.reader(rows), 1):
            if line == 1 and row[:1] == ["ImageId"]:
                continue
            if len(row) < 2 or not row[1].split():
                raise WslError(f"{path}:{line}: expected 'image,class ...', got {','.join(row)!r}")
            labels[Path(row[0]).stem] = row[1].split()[0]
    return labels


def _find_labels_file(folder: Path) -> Path | None:
    """`LOC_val_solution.csv` in the folder or up to four levels above it, where Kaggle puts it
    (`<root>/LOC_val_solution.csv` beside `<root>/ILSVRC/Data/CLS-LOC/val/`)."""
    return next((p / LABELS_FILE for p in [folder, *folder.parents][:5] if (p / LABELS_FILE).is_file()), None)


def labelled_images(root: str | Path, classes: list[str] | None = None,
                    labels_file: str | Path | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, class index)]) of a labelled image folder.

    Class folders (`root/<class>/*.JPEG`, torchvision's ImageFolder layout), or flat images
    with a labels file (given, or Kaggle's found beside the folder). `classes` (the training
    set's) fixes the class indices; a folder whose classes differ from them is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise WslError(f"image folder not found: {root}")
    if any(entry.is_dir() for entry in root.iterdir()):
        found, _ = find_classes(str(root))
        if classes is not None and found != list(classes):
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise WslError(f"the classes of {root} differ from training's: {len(missing)} missing {missing[:3]}, "
                           f"{len(extra)} not in training {extra[:3]}")
        classes = found
        try:
            items = make_dataset(str(root), {name: i for i, name in enumerate(classes)}, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exn:  # a class folder without images
            raise WslError(f"no images in {root}: {str(exn).splitlines()[0]}") from None
    else:
        labels_path = Path(labels_file) if labels_file else _find_labels_file(root)
        if labels_path is None or not labels_path.is_file():
            raise WslError(f"{root} has no class folders and no labels file ({labels_file or LABELS_FILE} not found): "
                           "set data.val_labels")
        labels = read_labels_file(labels_path)
        classes = list(classes) if classes is not None else sorted(set(labels.values()))
        index = {name: i for i, name in enumerate(classes)}
        items = []
        for path in sorted(root.iterdir()):
            if not has_file_allowed_extension(path.name, IMG_EXTENSIONS):
                continue
            name = labels.get(path.stem)
            if name is None:
                raise WslError(f"{path.name} has no label in {labels_path}")
            if name not in index:
                raise WslError(f"{labels_path}: class '{name}' of {path.name} is not one of training's classes")
            items.append((str(path), index[name]))
    if not items:
        raise WslError(f"no images in {root}")
    return classes, items


def is_image_folder(source: str | Path) -> bool:
    """A folder of images (not of shards, not a shard spec)."""
    path = Path(str(source))
    return path.is_dir() and not any(path.glob("*.tar"))


def image_key(path: str, root: Path) -> str:
    """A folder image's key: its path under the folder, without extension (`n01440764/x`)."""
    return str(Path(path).relative_to(root).with_suffix(""))


class LabelledImageFolder(torch.utils.data.Dataset):
    """Map-style training set of a labelled folder: {"key", "image", "label"}, or None for a
    corrupt image (`collate_labelled` drops and counts it)."""

    def __init__(self, root: str | Path, items: list[tuple[str, int]], transform):
        self.root = Path(root)
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict | None:
        path, label = self.items[index]
        try:
            return {"key": image_key(path, self.root), "image": self.transform(Path(path).read_bytes()), "label": label}
        except DATA_ERRORS as exn:
            log.warning("skipped corrupt image %s: %s", path, exn)
            return None


def collate_labelled(samples: list[dict | None]) -> dict:
    """Batch of labelled samples; `skipped` counts the corrupt images left out."""
    kept = [s for s in samples if s is not None]
    return {
        "image": torch.stack([s["image"] for s in kept]) if kept else torch.empty(0, 3, 1, 1),
        "target": torch.tensor([s["label"] for s in kept], dtype=torch.long),
        "key": [s["key"] for s in kept],
        "skipped": len(samples) - len(kept),
    }


class EvalDataset(IterableDataset):
    """Every sample of shards or an image folder exactly once across ranks and workers.

    Yields {"key", "image", "label"}: an image folder's class index (see `labelled_images`
    for the layouts, `classes` and `labels_file`); for shards the `.cls` member if present,
    else -1 and the hashtags (newline-joined) under "hashtags". Shards are divided among the
    (rank, worker) slots when there are at least as many shards as slots, otherwise every slot
    reads all shards and keeps every n-th sample. Corrupt images are skipped and logged (so
    each is counted, by being absent, once).
    """

    def __init__(self, source: str | Path, transform=None, rank: int | None = None, world_size: int | None = None,
                 classes: list[str] | None = None, labels_file: str | Path | None = None):
        self.transform = transform or EvalTransform()
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        self.rank, self.world_size = rank, world_size
        path = Path(str(source))
        self.folder_items: list[tuple[str, int]] | None = None
        if is_image_folder(path):
            self.classes, self.folder_items = labelled_images(path, classes, labels_file)
            self.root = path
        else:
            self.urls = expand_shard_spec(source)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = dataloader_worker()
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        counter = SkipCounter(every=1)
        if self.folder_items is not None:
            for path, label in self.folder_items[slot::slots]:
                key = image_key(path, self.root)
                try:
                    yield {"key": key, "image": self.transform(Path(path).read_bytes()), "label": label}
                except DATA_ERRORS as exn:
                    counter.skip("corrupt_image", exn, key)
            return
        split_shards = len(self.urls) >= slots
        urls = self.urls[slot::slots] if split_shards else self.urls
        samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(select_files=is_sample_member))
        for index, sample in enumerate(samples):
            if not split_shards and index % slots != slot:
                continue
            key = sample["__key__"]
            try:
                image = self.transform(sample_image_bytes(sample))
                hashtags = sample_hashtags(sample)
                label = int(sample["cls"]) if "cls" in sample else -1
            except DATA_ERRORS as exn:
                counter.skip("corrupt_image", exn, key)
                continue
            yield {"key": key, "image": image, "label": label, "hashtags": "\n".join(hashtags)}
