"""`make bench-knn`: queries per second of the kNN stage vs. scikit-learn's brute-force kNN.

Same data for both, in the same run: a database of `--database` clustered random features of
2048 dims (`--classes` clusters, float32) and `--queries` queries from the same clusters.
Ours: `wsl.knn.knn_classify` (L2-normalise, FAISS exact inner-product search with the
database added in blocks, the exp(cos / 0.07)-weighted vote), at k = 20. Baseline:
`sklearn.neighbors.KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute")`
fit on the same database, `predict` on the same queries. Both use every core of the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import faiss
import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from wsl.eval.knn import knn_classify


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), count)
    return (centres[labels] + rng.normal(size=(count, centres.shape[1])).astype(np.float32)), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = (rng.normal(size=(args.classes, args.dim)) * 0.3).astype(np.float32)
    database, database_labels = clustered(rng, centres, args.database)
    queries, query_labels = clustered(rng, centres, args.queries)
    print(
        f"database {args.database:,} x {args.dim}, {args.queries:,} queries, {args.classes} classes, k = 20; "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), faiss {faiss.__version__}, "
        f"{faiss.get_num_gpus()} GPUs"
    )

    started = time.perf_counter()
    ours, _ = knn_classify(database, database_labels, queries, query_labels, args.classes, ks=(20,))
    ours_seconds = time.perf_counter() - started

    baseline = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute", n_jobs=-1)
    started = time.perf_counter()
    baseline.fit(database, database_labels)
    baseline_top1 = float((baseline.predict(queries) == query_labels).mean())
    baseline_seconds = time.perf_counter() - started

    rows = [
        ("scikit-learn KNeighborsClassifier (brute, cosine)", baseline_seconds, baseline_top1),
        ("wsl.eval.knn (FAISS exact, blocked, weighted vote)", ours_seconds, ours[20]["top1"]),
    ]
    print(f"{'method':<52}{'seconds':>9}{'queries/s':>11}{'top-1':>8}")
    for name, seconds, top1 in rows:
        print(f"{name:<52}{seconds:>9.2f}{args.queries / seconds:>11.0f}{top1:>8.3f}")
    print(f"ratio (queries/s, wsl.eval.knn / scikit-learn): {baseline_seconds / ours_seconds:.2f}x")


if __name__ == "__main__":
    main()
