"""`make bench-probe`: the linear probe at ImageNet size, on synthetic float16 features, on the
GPU when there is one (as `wsl eval`'s probe) or the CPU (`--device`).

For each size (default 100k, 300k and 1.28M x 2048, 1,000 classes), in a fresh process: make
the features (float16, as `wsl features` stores them), compute the train statistics, then
time SGD steps of the 9-head grid (3 lrs x 3 weight decays trained at once) and of one head
alone, the same batches. Reports the time per epoch (measured steps/s x steps an epoch: an
epoch itself at 1.28M is ~20 min on 2 cores), the peak RSS and its ratio to the features'
bytes. The last line is the headline: the grid's speed-up over training its 9 heads one after
another (9 x one head's step time / the grid's step time), at the largest size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MEASURE = """
import json, math, resource, sys, time
import numpy as np, torch
from wsl.eval.linear_probe import Heads, _Batches, _statistics

torch.set_num_threads(int(sys.argv[6]))
rows, dim, classes, batch, steps = (int(a) for a in sys.argv[1:6])
device = torch.device(sys.argv[7])
sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
rss_mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss_mib()
rng = np.random.default_rng(0)
features = np.empty((rows, dim), np.float16)
for start in range(0, rows, 8192):
    features[start:start + 8192] = rng.standard_normal((min(8192, rows - start), dim), dtype=np.float32)
labels = rng.integers(0, classes, rows)
everything = np.arange(rows)
started = time.time()
batches = _Batches(features, labels, *_statistics(features, everything), device)
statistics_seconds = time.time() - started
settings = [(lr, wd) for lr in (0.001, 0.01, 0.1) for wd in (0.0, 1e-4, 1e-3)]
seconds = {}
for name, grid in (("grid", settings), ("one", settings[:1])):
    heads = Heads(dim, classes, grid, device)
    order = rng.permutation(rows)
    heads.step(*batches(order[:batch]), 1.0)  # warm-up
    sync()
    started = time.time()
    for step in range(steps):
        heads.step(*batches(order[(step % (rows // batch)) * batch:][:batch]), 1.0)
    sync()
    seconds[name] = (time.time() - started) / steps
print(json.dumps({"rows": rows, "step_grid": seconds["grid"], "step_one": seconds["one"],
                  "epoch_grid": seconds["grid"] * math.ceil(rows / batch), "statistics": statistics_seconds,
                  "peak_mib": rss_mib(), "before_mib": before, "features_mib": features.nbytes / 2**20,
                  "gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_281_167])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, or auto: the probe's own choice (wsl.distributed.local_device)"
    )
    args = parser.parse_args()
    if args.device == "auto":
        from wsl.distributed import local_device

        args.device = str(local_device())
    results = []
    print(f"on {args.device}" + (f", {args.threads} CPU threads" if args.device == "cpu" else ""))
    for rows in args.sizes:
        command = [sys.executable, "-c", MEASURE, str(rows), str(args.dim), str(args.classes), str(args.batch_size)]
        run = subprocess.run(
            [*command, str(args.steps), str(args.threads), args.device], capture_output=True, text=True
        )
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(
        f"{'features':>10} {'float16 MiB':>12} {'peak RSS MiB':>13} {'peak / features':>16} "
        f"{'grid s/step':>12} {'1 head s/step':>14} {'grid s/epoch':>13} {'GPU peak MiB':>13}"
    )
    for r in results:
        ratio = r["peak_mib"] / r["features_mib"]
        print(
            f"{r['rows']:>10} {r['features_mib']:>12.0f} {r['peak_mib']:>13.0f} {ratio:>16.2f} "
            f"{r['step_grid']:>12.4f} {r['step_one']:>14.4f} {r['epoch_grid']:>13.1f} {r['gpu_mib']:>13.0f}"
        )
    last = results[-1]
    print(
        f"9-point grid at once vs its 9 heads one after another, {last['rows']:,} x {args.dim}: "
        f"{9 * last['step_one'] / last['step_grid']:.2f}x"
    )


if __name__ == "__main__":
    main()
