"""The training stream over shards (`TrainLoader`), after OpenCLIP's `get_wds_dataset`.

Shards are drawn per rank and worker (resampled with replacement by default, or shuffled and
split by node and worker), samples shuffled as bytes, labelled with the paper's 1/k target,
resampled by hashtag frequency, decoded in draft mode, batched in the workers. Every rank
yields the same fixed number of batches per epoch, so DDP never waits on a rank that ran out
of shards. The stream is seeded by (seed, epoch, step, rank, worker): a resumed run draws new
samples rather than replaying the ones it already saw (webdataset has no exact mid-epoch
resume). Without a vocabulary the same stream trains a classifier on labelled shards
(`key.jpg` + `key.cls`, the layout of the public ImageNet-1k WebDataset copies).
"""

from __future__ import annotations

import collections
import functools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from wsl.config import REQUIRED, option
from wsl.data.bad_samples import DATA_ERRORS, SkipCounter
from wsl.data.shards import expand_shard_spec, is_sample_member, read_sizes, sample_hashtags, sample_image_bytes
from wsl.data.transforms import TrainTransform
from wsl.data.vocab import Vocabulary
from wsl.distributed import dataloader_worker, distributed_rank
from wsl.errors import WslError


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


def seed_augmentation(seed: StreamSeed, worker_id: int = 0) -> None:
    """Seed the RNGs the augmentations draw from (torch, random, numpy) in a DataLoader worker,
    or in the main process when there are none, by (seed, epoch, step, rank, worker): torch's
    own worker seeds come from the main process's RNG, which `seed_everything` makes the same
    on every rank, so every rank would draw the same crops and flips."""
    value = seed.rng("augmentation").getrandbits(63)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


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
        mine = order[rank::world_size][worker::num_workers]  # never empty: TrainLoader checks the counts
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
                raise WslError(
                    f"sample {key} has label {label}, outside the {self.num_classes} classes: check data.num_classes"
                )
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


def crop_scale_problem(scale: tuple[float, float]) -> str | None:
    """What a RandomResizedCrop area range must be, if `scale` is not that."""
    low, high = scale
    return None if 0 < low <= high <= 1 else "0 < low <= high <= 1"


@dataclass
class TrainDataConfig:
    """The training data section of a config (`data:` in configs/pretrain/*.yaml)."""

    shards: str = option(REQUIRED, "training shards: paths, a folder, {a..b} patterns, URLs; '::' joins")
    vocab: str | None = option(None, "hashtag vocabulary (wsl vocab); null: labelled shards (.cls) of num_classes")
    num_classes: int | None = option(None, "classes of labelled shards (when vocab is null)", minimum=1)
    batch_size: int = option(32, "images per device and step", minimum=1)
    num_workers: int = option(4, "DataLoader workers per device", minimum=0)
    image_size: int = option(224, "training crop side in pixels", minimum=8)
    crop_scale: tuple[float, float] = option((0.08, 1.0), "RandomResizedCrop's area range", check=crop_scale_problem)
    resample_exponent: float = option(0.5, "hashtag resampling: 0 natural, 0.5 square root, 1 uniform", minimum=0)
    resampled: bool = option(True, "draw shards with replacement (OpenCLIP's default at scale)")
    shuffle_buffer: int = option(2000, "samples in the shuffle buffer of each worker", minimum=0)
    samples_per_epoch: int | None = option(None, "samples an epoch; null: the shards' total from sizes.json", minimum=1)
    seed: int = option(0, "seed of the data stream")


class TrainLoader:
    """The training stream for one rank: `len(self)` batches an epoch on every rank.

    With a vocabulary, batches hold the hashtag targets; without one, the `.cls` labels.

    Each epoch, and a resumed run, draws a fresh stream: `position()` (the training loop's
    (epoch, optimizer step), given by `wsl.train.module.StreamDataModule`) is read each time
    an epoch's iteration starts, in the main process before the workers receive the stream;
    without it, `set_epoch(epoch, step)` sets them. `skip_counts` sums the workers' counters.
    """

    def __init__(
        self,
        config: TrainDataConfig,
        vocab: Vocabulary | None,
        rank: int | None = None,
        world_size: int | None = None,
        position: Callable[[], tuple[int, int]] | None = None,
    ):
        self.config = config
        self.position = position
        urls = expand_shard_spec(config.shards)
        if vocab is not None:
            vocab.check_matches(urls)
        elif not config.num_classes:
            raise WslError("labelled shards need data.num_classes")
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        slots = world_size * max(1, config.num_workers)
        if not config.resampled and len(urls) < slots:  # here, in every rank's main process: a worker
            # without a shard would fail alone and leave the other ranks hanging in their first all-reduce
            raise WslError(
                f"{len(urls)} shards are too few for {world_size} ranks x {max(1, config.num_workers)} workers "
                "without resampling (data.resampled=false): use resampled shards, fewer workers or more shards"
            )
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
            DecodeAndBatch(
                labelling.target,
                TrainTransform(config.image_size, tuple(config.crop_scale)),
                config.batch_size,
                counter,
            ),
        )
        self._worker_counts: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        self.seed.epoch, self.seed.step = epoch, step

    def __iter__(self) -> Iterator[dict]:
        if self.position is not None:
            self.set_epoch(*self.position())
        if not self.config.num_workers:
            seed_augmentation(self.seed)
        loader = wds.WebLoader(
            self.pipeline,
            batch_size=None,
            num_workers=self.config.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.config.num_workers else None,
            worker_init_fn=functools.partial(seed_augmentation, self.seed) if self.config.num_workers else None,
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
