"""`make bench-scale`: how each stage's cost grows with its input, measured at three sizes
spanning 10x or more, and what that says about the paper's sizes.

Every (stage, size) runs in a fresh process on data made here (photo-like JPEGs, synthetic
hashtag shards, planted copies, synthetic decisions or features), on one core where the stage
has a worker count (shards, vocab, dedup) and on all cores otherwise (torch, FAISS); it records
wall time and peak RSS. For each stage the table gives the log-log slope of time and of memory
against size (1: linear; below 1 at these sizes: fixed costs still show), and the estimate at
the paper's size: the marginal cost per unit between the two largest sizes times the paper's
units (a slope above 1.1 is flagged, and extrapolated along the fitted power law instead), in
core-hours, and the memory there (the largest measured when its slope is below 0.2: bounded).
Checkpoint and release sizes per width come from parameter counts (exact, nothing built).
The figures are this machine's; the slopes and which stage is the next limit carry over.

    make bench-scale                      # ~15 min on 2 cores; table + bench/scale/scale.png
    python pipelines/bench/scale.py --quick   # the smallest sizes, for a test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PAPER_IMAGES = 3_500_000_000
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
PROBE_EPOCHS = 100

# stage: (sizes, quick sizes, unit, paper units, what the paper figure means, cores the measurement uses)
STAGES = {
    "shards": ([100, 300, 1000], [20, 60, 200], "images", PAPER_IMAGES, "3.5B images into shards", 1),
    "vocab": ([10_000, 30_000, 100_000], [1_000, 3_000, 10_000], "samples", PAPER_IMAGES, "count 3.5B", 1),
    "dedup": ([100, 300, 1000], [20, 60, 200], "images", PAPER_IMAGES, "3.5B images vs the val set", 1),
    "dedup-decisions": (
        [100_000, 300_000, 1_000_000],
        [10_000, 30_000, 100_000],
        "samples",
        PAPER_IMAGES,
        "decision step over 3.5B",
        1,
    ),
    "features-resnext14_8x4d": ([16, 48, 160], [4, 12, 40], "images", IMAGENET_TRAIN + IMAGENET_VAL, "ImageNet", 0),
    "features-resnext101_32x8d": ([4, 12, 40], [2, 6, 20], "images", IMAGENET_TRAIN + IMAGENET_VAL, "ImageNet", 0),
    "knn": ([100_000, 300_000, 1_000_000], [2_000, 6_000, 20_000], "database rows", IMAGENET_TRAIN, "1.28M x 50k", 0),
    "probe": ([100_000, 300_000, 1_281_167], [2_000, 6_000, 20_000], "features", IMAGENET_TRAIN, "100 epochs", 0),
}
KNN_QUERIES = 1000
WIDTHS = (4, 8, 16, 32, 48)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- one measurement, in its own process


def measure(stage: str, size: int, work: Path) -> dict:
    """Make the input of `size` units, then time the stage on it. Returns seconds (and extras)."""
    work.mkdir(parents=True, exist_ok=True)
    if stage == "shards":
        from data import make_images  # pipelines/bench/data.py: photo-like JPEGs at 800-1600 px

        from wsl.data.shards import read_jsonl, write_shards

        annotations = make_images(work / "images", size, quality=80)
        samples, problems = read_jsonl(annotations)
        started = time.time()
        write_shards(samples, work / "shards", shard_size=100, workers=1, input_problems=problems)
        return {"seconds": time.time() - started}
    if stage == "vocab":
        from wsl.data.vocab import count_hashtags

        urls = _hashtag_shards(work, size)
        started = time.time()
        count_hashtags(urls, workers=1)
        return {"seconds": time.time() - started}
    if stage == "dedup":
        from wsl.data.demo import planted_duplicates
        from wsl.dedup.run import run_dedup

        evaluation = max(2, min(20, size // 5))  # evaluation images (the index), and a planted copy of each
        planted_duplicates(work / "data", evaluation, copies_per_image=1, num_others=size - evaluation, shard_size=100)
        started = time.time()
        run_dedup(str(work / "data" / "shards"), [str(work / "data" / "eval")], work / "out", workers=1)
        return {"seconds": time.time() - started}
    if stage == "dedup-decisions":
        from wsl.data.demo import synthetic_decisions
        from wsl.dedup.run import classify_decisions

        files = synthetic_decisions(work / "decisions", size)
        started = time.time()
        for _ in classify_decisions(files, 0.77, work / "work"):
            pass
        return {"seconds": time.time() - started}
    if stage.startswith("features-"):
        from wsl.eval.features import extract_features

        folder = _image_folder(work / "images", size)
        started = time.time()
        model = stage.split("-", 1)[1]  # batches of 4: every size holds whole batches, so memory is the data's
        extract_features(str(folder), work / "features", model, None, batch_size=4, num_workers=0, progress=False)
        return {"seconds": time.time() - started}
    if stage == "knn":
        import numpy as np

        from wsl.eval.knn import knn_classify

        database = _random_features(size)
        queries = _random_features(KNN_QUERIES, seed=1)
        labels = np.random.default_rng(0).integers(0, 1000, size)
        started = time.time()
        knn_classify(database, labels, queries, labels[:KNN_QUERIES], 1000, ks=(20,))
        return {"seconds": time.time() - started}
    if stage == "probe":
        import numpy as np
        import torch

        from wsl.eval.linear_probe import Heads, _Batches, _statistics

        features = _random_features(size)
        labels = np.random.default_rng(0).integers(0, 1000, size)
        started = time.time()
        batches = _Batches(features, labels, *_statistics(features, np.arange(size)), torch.device("cpu"))
        settings = [(lr, wd) for lr in (0.001, 0.01, 0.1) for wd in (0.0, 1e-4, 1e-3)]
        heads = Heads(features.shape[1], 1000, settings, torch.device("cpu"))
        order = np.random.default_rng(1).permutation(size)
        steps = 10
        heads.step(*batches(order[:1024]), 1.0)  # warm-up
        step_started = time.time()
        for step in range(steps):
            heads.step(*batches(order[(step * 1024) % max(1, size - 1024) :][:1024]), 1.0)
        per_step = (time.time() - step_started) / steps
        epoch = per_step * math.ceil(size / 1024) + (step_started - started)  # an epoch of the 9-head grid
        return {"seconds": epoch, "measured_seconds": time.time() - started}
    raise SystemExit(f"unknown stage {stage}")


def _random_features(rows: int, dim: int = 2048, seed: int = 0):
    """float16 features, as `wsl features` stores them, made 8,192 rows at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    features = np.empty((rows, dim), np.float16)
    for start in range(0, rows, 8192):
        features[start : start + 8192] = rng.standard_normal((min(8192, rows - start), dim), dtype=np.float32)
    return features


def _hashtag_shards(folder: Path, samples: int) -> list[str]:
    """Shards of 1,000 samples with a small JPEG and 1-5 Zipf-distributed hashtags each."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, format="JPEG")
    rng = np.random.default_rng(0)
    urls = []
    for shard, start in enumerate(range(0, samples, 1000)):
        path = folder / f"tags-{shard:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for index in range(start, min(samples, start + 1000)):
                tags = [f"tag{int(t)}" for t in rng.zipf(1.3, int(rng.integers(1, 6))) % 20_000]
                meta = json.dumps({"hashtags": tags}).encode()
                writer.write({"__key__": f"{index:09d}", "jpg": buffer.getvalue(), "json": meta})
        urls.append(str(path))
    return urls


def _image_folder(folder: Path, images: int) -> Path:
    """`images` photo-like 640x480 JPEGs in 4 class folders."""
    import numpy as np
    from PIL import Image

    from wsl.data.demo import draw_object, random_object, scene_background

    for index in range(images):
        rng = np.random.default_rng([11, index])
        pixels = scene_background(rng, ["sky", "grass", "sand", "brick"][index % 4], 640, 480)
        draw_object(rng, pixels, *random_object(rng))
        path = folder / f"c{index % 4}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=85)
    return folder


# ---------------------------------------------------------------- the sweep, the fit, the table


def run_one(stage: str, size: int, work: Path) -> dict:
    """One measurement in a fresh process: its time and its peak RSS."""
    command = [sys.executable, __file__, "--measure", stage, str(size), "--work", str(work / f"{stage}-{size}")]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{stage} at {size}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fit(sizes: list[int], values: list[float]) -> float:
    """The log-log slope of `values` against `sizes` (least squares)."""
    import numpy as np

    return float(np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-9)), 1)[0])


def estimate(sizes: list[int], seconds: list[float], slope: float, units: int) -> float:
    """Seconds at `units`: the marginal cost between the two largest sizes, or the power law when
    the growth is faster than linear."""
    if slope > 1.1:
        return seconds[-1] * (units / sizes[-1]) ** slope
    marginal = max((seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2]), seconds[-1] / sizes[-1] * 0.5)
    return seconds[-1] + marginal * (units - sizes[-1])


def release_sizes() -> list[tuple[str, int]]:
    from wsl.models import count_parameters

    return [(f"resnext101_32x{w}d", count_parameters(f"resnext101_32x{w}d", 17_000)) for w in WIDTHS]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench/scale", help="working folder (inputs, outputs, the picture)")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes (a test of the benchmark)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of " + ", ".join(STAGES))
    parser.add_argument("--measure", nargs=2, metavar=("STAGE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work)
    if args.measure:  # the child process
        result = measure(args.measure[0], int(args.measure[1]), work)
        print(json.dumps(result | {"peak_mib": peak_mib()}))
        return []
    stages = args.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {sorted(unknown)}")
    cores = os.cpu_count() or 1
    rows = []
    for stage in stages:
        sizes_full, sizes_quick, unit, paper_units, paper_meaning, stage_cores = STAGES[stage]
        sizes = sizes_quick if args.quick else sizes_full
        runs = [run_one(stage, size, work) for size in sizes]
        seconds, memory = [r["seconds"] for r in runs], [r["peak_mib"] for r in runs]
        time_slope, memory_slope = fit(sizes, seconds), fit(sizes, memory)
        paper_seconds = estimate(sizes, seconds, time_slope, paper_units)
        if stage == "knn":
            paper_seconds *= IMAGENET_VAL / KNN_QUERIES  # search time grows with the queries, linearly
        if stage == "probe":
            paper_seconds *= PROBE_EPOCHS
        used_cores = stage_cores or cores
        per_unit = max(memory[-1] - memory[-2], 0) / (sizes[-1] - sizes[-2])
        paper_mib = memory[-1] if memory_slope < 0.2 else memory[-1] + per_unit * (paper_units - sizes[-1])
        notes = []
        if time_slope > 1.1:
            notes.append("time grows faster than linear")
        if memory_slope >= 0.2:
            notes.append("memory grows with the data")
        rows.append(
            {
                "stage": stage,
                "unit": unit,
                "sizes": sizes,
                "seconds": seconds,
                "peak_mib": memory,
                "time_slope": time_slope,
                "memory_slope": memory_slope,
                "paper": paper_meaning,
                "core_hours": paper_seconds * used_cores / 3600,
                "paper_gb": paper_mib * 2**20 / 1e9,
                "units_per_core_second": sizes[-1] / seconds[-1] / used_cores,
                "note": "; ".join(notes),
            }
        )
        print(f"{stage}: {', '.join(f'{s:,} in {t:.1f} s, {m:.0f} MiB' for s, t, m in zip(sizes, seconds, memory))}")
    print_table(rows)
    picture = plot(rows, work / "scale.png")
    (work / "scale.json").write_text(json.dumps(rows, indent=1))
    print(f"picture: {picture}; figures: {work / 'scale.json'}")
    costliest = max(rows, key=lambda row: row["core_hours"])
    steepest = max(rows, key=lambda row: row["time_slope"])
    print(
        f"headline: costliest at the paper's size: {costliest['stage']} ({costliest['core_hours']:,.0f} core-hours); "
        f"steepest growth: {steepest['stage']} (time slope {steepest['time_slope']:.2f})"
    )
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'stage':<27}{'sizes':>24}{'/s/core at max':>15}{'time slope':>11}{'mem slope':>10}"
        f"{'paper size':>28}{'core-hours':>13}{'GB there':>10}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        sizes = "/".join(_short(s) for s in r["sizes"])
        print(
            f"{r['stage']:<27}{sizes:>24}{r['units_per_core_second']:>15.1f}{r['time_slope']:>11.2f}"
            f"{r['memory_slope']:>10.2f}{r['paper']:>28}{r['core_hours']:>13,.1f}{r['paper_gb']:>10.1f}  {r['note']}"
        )
    print("release and checkpoint sizes with a 17k-class head (fp32 weights; a checkpoint adds SGD momentum):")
    for name, params in release_sizes():
        sizes = f"release {params * 4 / 1e9:>5.2f} GB  checkpoint {params * 8 / 1e9:>5.2f} GB"
        print(f"  {name:<22}{params / 1e6:>8.0f}M parameters  {sizes}")


def _short(value: int) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return str(value)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, memory) = plt.subplots(1, 2, figsize=(12, 5))
    for row in rows:
        times.loglog(row["sizes"], row["seconds"], "o-", label=f"{row['stage']} ({row['time_slope']:.2f})")
        memory.loglog(row["sizes"], row["peak_mib"], "o-", label=f"{row['stage']} ({row['memory_slope']:.2f})")
    times.set(xlabel="input units", ylabel="seconds", title="time (log-log slope)")
    memory.set(xlabel="input units", ylabel="peak RSS (MiB)", title="memory (log-log slope)")
    for axes in (times, memory):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    main()
