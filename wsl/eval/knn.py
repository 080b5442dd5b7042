"""kNN classification of frozen features (Wu et al. 2018, as in DINO's `eval_knn.py`).

Features are L2-normalised, so inner product is cosine similarity; the train features are the
database, the val features the queries. Each of the k nearest neighbours votes for its class
with weight exp(similarity / T), T = 0.07. Search is FAISS: exact by default, the database
added block by block (`faiss.contrib.exhaustive_search.knn_ground_truth`, which keeps a
result heap), so memory stays bounded by one block; an IVF index is the option for a
database that does not fit. FAISS uses every GPU when it is built with GPU support. Queries
go in large blocks: faiss-cpu's exact search only switches to BLAS for >= 20 queries at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from wsl.errors import WslError


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _blocks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield np.ascontiguousarray(x[start : start + size])


def search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    index: str = "flat",
    database_block: int = 1_000_000,
    query_block: int = 16_384,
    nlist: int = 1024,
    nprobe: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, database ids), each [queries, k], best first, of L2-normalised inputs."""
    if k > len(database):
        raise WslError(f"k = {k} is more than the {len(database)} database features")
    if index == "flat":
        results = [
            knn_ground_truth(q, _blocks(database, database_block), k, faiss.METRIC_INNER_PRODUCT)
            for q in _blocks(queries, query_block)
        ]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
    if index != "ivf":
        raise WslError(f"knn.index must be 'flat' or 'ivf', not '{index}'")
    dim = database.shape[1]
    nlist = max(1, min(nlist, len(database) // 39))  # FAISS wants >= 39 training points per list
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.nprobe = nprobe
    sample = np.random.default_rng(0).choice(len(database), min(len(database), nlist * 256), replace=False)
    ivf.train(np.ascontiguousarray(database[np.sort(sample)]))
    for block in _blocks(database, database_block):
        ivf.add(block)
    if faiss.get_num_gpus() > 0:
        ivf = faiss.index_cpu_to_all_gpus(ivf)  # keeps nprobe
    results = [ivf.search(q, k) for q in _blocks(queries, query_block)]
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def weighted_vote(
    similarities: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, temperature: float = 0.07
) -> np.ndarray:
    """Class scores [queries, classes]: the sum of exp(similarity / T) over the neighbours of each class."""
    scores = np.zeros((len(similarities), num_classes), np.float64)
    rows = np.repeat(np.arange(len(similarities)), similarities.shape[1])
    np.add.at(scores, (rows, neighbour_labels.ravel()), np.exp(similarities.astype(np.float64) / temperature).ravel())
    return scores


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k best scores (ties broken by class index)."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((best == labels[:, None]).any(axis=1).mean())


def knn_classify(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    ks: tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    account: Callable[[np.ndarray], dict[str, float]] | None = None,
    **search_options,
) -> tuple[dict[int, dict[str, float]], np.ndarray]:
    """Top-1/top-5 for each k (k larger than the database is left out), and the neighbour ids.
    `account` maps the top-1 predictions to more numbers for each k's row (lower-bound, ReaL)."""
    database, queries = l2_normalise(train_features), l2_normalise(val_features)
    usable = [k for k in ks if k <= len(database)]
    if not usable:
        raise WslError(f"every k in {list(ks)} is more than the {len(database)} train features")
    similarities, ids = search(database, queries, max(usable), **search_options)
    results = {}
    found = ids >= 0  # IVF returns id -1 when the probed lists hold fewer than k vectors: no vote
    similarities = np.where(found, similarities, -np.inf)  # exp(-inf / T) = 0
    labels = train_labels[np.where(found, ids, 0)]
    for k in usable:
        scores = weighted_vote(similarities[:, :k], labels[:, :k], num_classes, temperature)
        results[k] = {
            "top1": topk_accuracy(scores, val_labels, 1),
            "top5": topk_accuracy(scores, val_labels, min(5, num_classes)),
        }
        if account is not None:
            results[k] |= account(np.argmax(scores, axis=1))
    return results, ids
