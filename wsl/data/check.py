"""`wsl check-data`: run the training data pipeline for a few batches, a dry run before a job:
the vocabulary matches the shards, the epoch length, the images/s and the skipped samples."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from wsl.config import REQUIRED, option, require_file
from wsl.data.stream import TrainDataConfig, TrainLoader
from wsl.data.vocab import Vocabulary


@dataclass
class Config:
    """`wsl check-data`: the training data pipeline for a few batches."""

    shards: str = option(REQUIRED, "training shards: paths, a directory, {a..b} patterns, URLs")
    vocab: str = option(REQUIRED, "vocabulary JSON from `wsl vocab`")
    batches: int = option(10, "batches to read", minimum=1)
    batch_size: int = option(32, "images a batch", minimum=1)
    image_size: int = option(224, "training crop side", minimum=8)
    resample_exponent: float = option(0.5, "0 natural, 0.5 square root, 1 uniform", minimum=0)
    workers: int = option(min(os.cpu_count() or 1, 8), "DataLoader workers", minimum=0)


def main(config: Config) -> str:
    require_file(config.vocab, "vocab", "vocabulary file")
    vocab = Vocabulary.load(config.vocab)
    data = TrainDataConfig(
        shards=config.shards,
        vocab=config.vocab,
        batch_size=config.batch_size,
        num_workers=config.workers,
        image_size=config.image_size,
        resample_exponent=config.resample_exponent,
    )
    loader = TrainLoader(data, vocab)
    started, images = time.time(), 0
    for batch_index, batch in enumerate(loader):
        images += len(batch["key"])
        if batch_index + 1 == config.batches:
            break
    seconds = time.time() - started
    return "\n".join(
        [
            f"vocabulary {vocab.short_hash} ({len(vocab)} classes) matches {config.shards}; "
            f"{len(loader)} batches an epoch of {config.batch_size}",
            f"read {images} images in {seconds:.1f} s ({images / seconds:.0f} images/s with {config.workers} workers)",
            f"skipped or dropped: {json.dumps(loader.skip_counts) if loader.skip_counts else 'none'}",
        ]
    )
