"""`make bench-data`: images per second per core of the training data pipeline vs. a plain baseline.

Baseline: `Image.open(path).convert("RGB")` (a full decode) + torchvision's
RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize, over the same JPEG files.
Pipeline: `wsl.data.TrainLoader` on shards of those files (tar reading, JSON, targets,
shuffle buffer, draft-mode decode, augmentation, batching), in one process; then the same on
shards that `wsl shards resize.mode=shorter resize.size=S` stored pre-resized (S = 256, 320,
400; JPEG quality 90), as large runs store their data.
Both run on one core (torch.set_num_threads(1), no DataLoader workers), in the same run.
The images are photo-like JPEGs at phone-photo sizes, all at least 800x600, saved at
`--quality` (default 80: Instagram re-encodes uploads at about that quality; the cost that
draft mode cannot cut, entropy decoding, grows with the file size, so say which you ran).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from wsl.data.demo import draw_object, random_object, scene_background
from wsl.data.shards import ResizeConfig, read_jsonl, write_shards
from wsl.data.stream import TrainDataConfig, TrainLoader
from wsl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsl.data.vocab import build_vocab

SIZES = [(800, 600), (1080, 1080), (1280, 960), (1600, 1200)]
RESIZED = (256, 320, 400)  # shorter sides of the pre-resized shards


def make_images(folder: Path, count: int, quality: int) -> Path:
    """`count` photo-like JPEGs cycling through SIZES, and their annotations."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        rng = np.random.default_rng([7, i])
        width, height = SIZES[i % len(SIZES)]
        img = scene_background(rng, ["sky", "grass", "sand", "brick"][i % 4], width, height)
        for _ in range(3):
            draw_object(rng, img, *random_object(rng))
        path = folder / "images" / f"{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=quality)
        lines.append(json.dumps({"path": f"images/{path.name}", "hashtags": ["photo"]}))
    (folder / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "annotations.jsonl"


def bench_baseline(paths: list[Path], images: int) -> float:
    transform = T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    started = time.perf_counter()
    for i in range(images):
        with Image.open(paths[i % len(paths)]) as image:
            transform(image.convert("RGB"))
    return images / (time.perf_counter() - started)


def bench_pipeline(shards: Path, images: int, batch_size: int = 32) -> float:
    vocab = build_vocab(collections.Counter({"photo": 1}))
    config = TrainDataConfig(
        shards=str(shards),
        vocab="",
        batch_size=batch_size,
        num_workers=0,
        resample_exponent=0.0,
        samples_per_epoch=images,
        shuffle_buffer=256,
    )
    loader = TrainLoader(config, vocab, rank=0, world_size=1)
    started, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["key"])
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/data", help="working folder (default: %(default)s)")
    parser.add_argument("--files", type=int, default=128, help="distinct JPEG files (default: %(default)s)")
    parser.add_argument("--images", type=int, default=768, help="images timed per method (default: %(default)s)")
    parser.add_argument(
        "--quality", type=int, default=80, help="JPEG quality of the test images (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per method; the best counts (default: %(default)s)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out) / f"q{args.quality}"
    annotations = out / "annotations.jsonl"
    fresh = not annotations.is_file() or sum(1 for _ in open(annotations)) != args.files
    if fresh:
        print(
            f"writing {args.files} JPEGs ({', '.join(f'{w}x{h}' for w, h in SIZES)}, quality {args.quality}) to {out}"
        )
        annotations = make_images(out, args.files, args.quality)
    for folder, resize in [("shards", None)] + [
        (f"shards-short{side}", ResizeConfig(mode="shorter", size=side, quality=90)) for side in RESIZED
    ]:
        if fresh or not (out / folder / "stats.json").is_file():
            samples, problems = read_jsonl(annotations)
            write_shards(samples, out / folder, prefix="bench", shard_size=32, input_problems=problems, resize=resize)
    paths = sorted((out / "images").glob("*.jpg"))
    mean_bytes = sum(p.stat().st_size for p in paths) / len(paths)
    bench_baseline(paths, 32), bench_pipeline(out / "shards", 64)  # warm the page cache and imports
    baseline = max(bench_baseline(paths, args.images) for _ in range(args.repeats))
    pipeline = max(bench_pipeline(out / "shards", args.images) for _ in range(args.repeats))
    resized = {
        side: max(bench_pipeline(out / f"shards-short{side}", args.images) for _ in range(args.repeats))
        for side in RESIZED
    }
    rows = [
        ("baseline: full Pillow decode + torchvision transforms", baseline),
        ("wsl TrainLoader (shards, draft decode, targets, batching)", pipeline),
    ] + [(f"wsl TrainLoader, shards pre-resized: shorter side {side}", rate) for side, rate in resized.items()]
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 core, "
        f"{len(paths)} JPEGs at quality {args.quality} averaging {mean_bytes / 1024:.0f} KiB, "
        f"best of {args.repeats} x {args.images} images"
    )
    print(f"{'method':60s} {'images/s/core':>14s}")
    for name, rate in rows:
        print(f"{name:60s} {rate:14.1f}")
    print(f"training pipeline on the original images / baseline = {pipeline / baseline:.2f}x")
    print(f"headline: training pipeline on shards pre-resized to 320 / baseline = {resized[320] / baseline:.2f}x")


if __name__ == "__main__":
    main()
