"""`make bench-dedup`: the de-duplication threshold curve on planted copies, and its throughput.

Demo downstream val images are the evaluation set; transformed copies of them
(`wsl.demo_data.planted_copy`: crops keeping 70-100% of the area, 0.5-2x, JPEG 30-95, colour
shifts, mirrors) are mixed into demo pretraining images. `wsl dedup` scores every sample; the
table gives, per threshold, the share of copies removed (recall) and of other images removed
(false positives). Throughput is images per second per core over the whole run (index, scoring,
writing) with one worker. The last line compares the descriptor's draft-mode JPEG decode with a
plain full-size decode of the same images.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wsl.data.demo import planted_duplicates
from wsl.dedup.run import DedupConfig, image_for_matching, run_dedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/dedup")
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--copies", type=int, default=2, help="planted copies of each evaluation image")
    parser.add_argument("--others", type=int, default=2000, help="other (non-copy) pretraining images")
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "ivf"], help="the evaluation window index")
    args = parser.parse_args()
    out = Path(args.out)
    truth = planted_duplicates(out / "data", args.eval_images, args.copies, args.others)
    config = DedupConfig(index=args.index)
    shutil.rmtree(out / f"filtered-{args.index}", ignore_errors=True)  # measure a whole run, not a resumed one
    started = time.time()
    report = run_dedup(
        str(out / "data" / "shards"),
        [str(out / "data" / "eval")],
        out / f"filtered-{args.index}",
        config,
        workers=1,
        threads=1,
    )
    seconds = time.time() - started
    scores, is_copy, verified = [], [], []
    for path in sorted((out / f"filtered-{args.index}" / "_dedup" / "decisions").glob("*.json")):
        for record in json.loads(path.read_text())["samples"]:
            scores.append(record.get("score", 0.0))
            is_copy.append(record["key"] in truth)
            verified.append(record.get("match") is not None)
    scores, is_copy = np.array(scores), np.array(is_copy)
    print(f"window index: {args.index}")
    print(
        f"{is_copy.sum()} planted copies of {args.eval_images} evaluation images among {(~is_copy).sum()} other images"
    )
    print(f"{'threshold':>10} {'copies removed':>15} {'others removed':>15}")
    for threshold in (0.65, 0.7, 0.73, 0.75, 0.77, 0.8, 0.85, 0.9):
        mark = "  <- default" if abs(threshold - config.threshold) < 1e-9 else ""
        print(
            f"{threshold:>10.2f} {np.mean(scores[is_copy] >= threshold):>15.1%} "
            f"{np.mean(scores[~is_copy] >= threshold):>15.2%}{mark}"
        )
    images = report["input_samples"]
    per_core = images / seconds
    print(
        f"throughput: {per_core:.0f} images/s on 1 core (index of {report['evaluation_images']} evaluation images "
        f"included); 1 billion images: {1e9 / per_core / 3600:,.0f} core-hours"
    )
    print(f"verified (retrieval similarity >= prefilter {config.prefilter}): {np.mean(verified):.1%} of the images")

    jpegs = [Path(p).read_bytes() for p in sorted((out / "data" / "eval").rglob("*.JPEG"))]
    jpegs = (jpegs * (2000 // len(jpegs) + 1))[:2000]
    timings = {}
    for name, decode in (
        ("plain full decode", lambda d: Image.open(io.BytesIO(d)).convert("RGB")),
        ("draft-mode decode", image_for_matching),
    ):
        tick = time.perf_counter()
        for data in jpegs:
            decode(data)
        timings[name] = len(jpegs) / (time.perf_counter() - tick)
        print(f"{name:>20}: {timings[name]:,.0f} images/s")
    print(f"draft-mode decode vs plain full decode: {timings['draft-mode decode'] / timings['plain full decode']:.2f}x")


if __name__ == "__main__":
    main()
