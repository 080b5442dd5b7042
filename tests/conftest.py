"""Shared fixtures: a small real demo dataset, written to real tar shards once per session."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsl.data.demo import generate
from wsl.data.shards import read_jsonl, write_shards
from wsl.data.vocab import build_vocab_from_shards


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    """600 demo images (+ the broken entries) in shards of 100, and their vocabulary."""
    root = tmp_path_factory.mktemp("demo")
    summary = generate(
        root / "data", num_images=600, downstream_train_per_class=4, downstream_val_per_class=3, workers=2
    )
    samples, problems = read_jsonl(Path(summary["annotations"]))
    stats = write_shards(samples, root / "shards", prefix="demo", shard_size=100, workers=2, input_problems=problems)
    vocab = build_vocab_from_shards(str(root / "shards"), synonyms_file=summary["synonyms"], min_count=5, workers=2)
    vocab_path = vocab.save(root / "shards" / "vocab.json")
    return {
        "root": root,
        "summary": summary,
        "stats": stats,
        "shards": root / "shards",
        "vocab": vocab,
        "vocab_path": vocab_path,
    }


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar file with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def hashtag_shards(
    folder: Path, tags_per_sample: list[list[str]], per_shard: int, image: bytes | None = None
) -> list[Path]:
    """Shards of `key.jpg` + `key.json` samples with the given hashtags, plus sizes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    image = image or jpeg_bytes()
    paths, sizes = [], {}
    for start in range(0, len(tags_per_sample), per_shard):
        chunk = tags_per_sample[start : start + per_shard]
        members = []
        for offset, tags in enumerate(chunk):
            key = f"{start + offset:07d}"
            members += [(f"{key}.jpg", image), (f"{key}.json", json.dumps({"hashtags": tags}).encode())]
        path = write_tar(folder / f"s-{start // per_shard:06d}.tar", members)
        paths.append(path)
        sizes[path.name] = len(chunk)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return paths


def random_sscd_weights(path: Path) -> Path:
    """A randomly initialised SSCD network saved in SSCD's torchvision key layout (`backbone.*`),
    its batch-norm statistics set on noise so that different images get different descriptors."""
    import torch

    from wsl.dedup.sscd import sscd_model

    torch.manual_seed(0)
    model = sscd_model().train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 64, 64))
    torch.save({f"backbone.{k}": v for k, v in model.state_dict().items()}, path)
    return path
