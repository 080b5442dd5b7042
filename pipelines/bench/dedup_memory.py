"""`make bench-dedup-memory`: peak memory (RSS) of `wsl dedup`'s decision step (byte duplicates,
copies, what each shard keeps) on synthetic decisions at growing sizes, each size in a fresh
process. The step streams shard by shard and sorts digests in bounded buckets on disk, so its
memory should not grow with the data; the last line is the ratio between the largest and the
smallest size."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import json, resource, sys, time
from pathlib import Path
from wsl.dedup.run import classify_decisions

folder = Path(sys.argv[1])
files = sorted((folder / "decisions").glob("*.json"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.time()
kept = removed = 0
for name, entry in classify_decisions(files, 0.77, folder / "work"):
    kept += len(entry["keep"])
    removed += entry["samples"] - len(entry["keep"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kept": kept, "removed": removed, "seconds": time.time() - started, "peak_mib": peak / 1024,
                  "before_mib": before / 1024}))
"""


def measure(samples: int) -> dict:
    """Run the decision step on `samples` synthetic decisions (made here) in a fresh process that
    does nothing else: its peak RSS, and its RSS once its modules are imported."""
    from wsl.data.demo import synthetic_decisions

    with tempfile.TemporaryDirectory() as folder:
        synthetic_decisions(Path(folder) / "decisions", samples)
        result = subprocess.run([sys.executable, "-c", MEASURE, folder], capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    rows = {size: measure(size) for size in args.sizes}
    print(f"{'samples':>10} {'removed':>9} {'seconds':>8} {'RSS imported (MiB)':>19} {'peak RSS (MiB)':>15}")
    for size, row in rows.items():
        before, peak = row["before_mib"], row["peak_mib"]
        print(f"{size:>10} {row['removed']:>9} {row['seconds']:>8.1f} {before:>19.0f} {peak:>15.0f}")
    small, large = rows[min(rows)], rows[max(rows)]
    print(f"peak memory at {max(rows):,} vs {min(rows):,} samples: {large['peak_mib'] / small['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
