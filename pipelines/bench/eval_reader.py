"""`make bench-eval-reader`: how many times the evaluation reader reads held-out shards, by
running the partition logic (`wsl.data.evalset.slot_share`) for every (rank, worker) slot, at
the pretraining configs' scale (20 held-out shards, 336 GPUs x 10 workers) and smaller. The
baseline is the rule it replaced: with fewer shards than slots, every slot read every shard and
kept every n-th sample. The last line is the headline ratio at the paper's scale."""

from __future__ import annotations

import argparse


def reads_per_epoch(shards: int, slots: int, samples_per_shard: int) -> tuple[int, int]:
    """(samples read by the replaced rule, samples read by `slot_share`) over all slots."""
    from wsl.data.evalset import slot_share

    before = slots * shards * samples_per_shard if shards < slots else shards * samples_per_shard
    after = sum(len(slot_share(shards, slot, slots)[0]) for slot in range(slots)) * samples_per_shard
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    args = parser.parse_args()
    cases = [(20, 8 * 10), (20, 64 * 10), (20, 336 * 10), (188_000, 336 * 10)]
    header = f"{'shards':>8} {'slots':>6} {'data':>13} {'read before':>15} {'read after':>13}"
    print(header + f" {'x data before':>14} {'x data after':>13}")
    for shards, slots in cases:
        data = shards * args.samples_per_shard
        before, after = reads_per_epoch(shards, slots, args.samples_per_shard)
        row = f"{shards:>8} {slots:>6} {data:>13,} {before:>15,} {after:>13,}"
        print(row + f" {before / data:>14.0f} {after / data:>13.0f}")
    before, after = reads_per_epoch(20, 3360, args.samples_per_shard)
    print(f"20 held-out shards on 336 GPUs x 10 workers: each validation reads {before / after:.0f}x less")


if __name__ == "__main__":
    main()
