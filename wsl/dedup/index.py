"""The evaluation-side index of `wsl dedup` and its descriptors: see `wsl.dedup` for the method."""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsl.config import option
from wsl.data.folders import image_files, is_image_folder
from wsl.data.shards import expand_shard_spec, read_shard_samples, sample_image_bytes
from wsl.errors import WslError
from wsl.files import write_atomic, write_json

if TYPE_CHECKING:
    from wsl.dedup.sscd import SscdIndex

COARSE = 16  # retrieval thumbnail side
FINE = 48  # verification thumbnail side
STORE = 96  # evaluation images kept as STORE x STORE RGB for verification (windows are fractions)
FORMAT = "wsl-dedup-1"
# Workers are spawned, not forked: a fork after FAISS's OpenMP threads have run (building the
# IVF index) deadlocks the child's first OpenMP call.
RERANK = 64  # IVF hits re-ranked by exact similarity
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError)


PIXELS_THRESHOLD = 0.77  # chosen on `make bench-dedup`'s curve (BENCHMARKS.md)
SSCD_THRESHOLD = 0.75  # SSCD's authors: 90% precision on DISC2021


@dataclass
class DedupConfig:
    """The settings that decide what is a copy (stored with the decisions: changing one starts over)."""

    threshold: float = option(
        0.0,
        "score at or above which a sample is a copy; 0: the descriptor's own (pixels: verified detail "
        f"correlation {PIXELS_THRESHOLD}, SSCD: cosine {SSCD_THRESHOLD}; BENCHMARKS.md)",
        minimum=0,
    )
    prefilter: float = option(0.6, "retrieval similarity below which a sample is not verified at all")
    candidates: int = option(1, "nearest evaluation images verified per sample: verification is the cost", minimum=1)
    min_area: float = option(0.68, "smallest crop (fraction of the area) the windows cover", above=0)
    min_side: float = option(0.7, "smallest crop side (fraction) the windows cover", above=0)
    window_step: float = option(0.05, "grid of the windows' edges (fraction)", above=0)
    descriptor: str = option(
        "pixels", "pixels (no weights needed), or sscd:PATH (SSCD copy-detection weights, torchvision format)"
    )
    index: str = option(
        "auto",
        "window index: flat (exact, ~3 KB a window), ivf (PCA + IVF + 8-bit codes, ~130 B "
        "a window), auto: ivf above ivf_above windows (~4,000 images)",
        choices=("auto", "flat", "ivf"),
    )
    ivf_above: int = option(2_000_000, "windows above which `auto` compresses", minimum=1)
    nlist: int = option(0, "IVF lists (0: 4 sqrt(windows))", minimum=0)
    nprobe: int = option(64, "IVF lists searched per query", minimum=1)
    pca_dim: int = option(128, "IVF: PCA dimensions", minimum=1)

    def __post_init__(self) -> None:
        if self.descriptor != "pixels" and not self.descriptor.startswith("sscd:"):
            raise WslError(f"descriptor={self.descriptor}: expected pixels or sscd:PATH (an SSCD .torchvision.pt file)")

    @property
    def copy_threshold(self) -> float:
        """`threshold`, or the descriptor's own where it is 0."""
        return self.threshold or (PIXELS_THRESHOLD if self.descriptor == "pixels" else SSCD_THRESHOLD)


def decode_small(data: bytes, short_side: int) -> Image.Image:
    """RGB image with its shorter side at least `short_side`, decoded at 1/2..1/8 scale when JPEG."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (short_side, short_side))
        return image.convert("RGB")


def normalised(thumbnail: np.ndarray) -> np.ndarray:
    """A thumbnail (H x W x 3) as a unit vector, blind to its mean colour and its contrast."""
    t = thumbnail.astype(np.float32)
    t -= t.mean(axis=(0, 1))
    t /= t.std() + 4.0  # + 4: flat images stay near zero instead of amplifying JPEG noise
    flat = t.ravel()
    return flat / max(float(np.linalg.norm(flat)), 1e-6)


def detail(pixels: np.ndarray, block: int = 4) -> np.ndarray:
    """What a thumbnail holds beyond its block x block averages (texture, edges), as a unit vector."""
    t = pixels.astype(np.float32)
    n = t.shape[0] // block
    low = t.reshape(n, block, n, block, 3).mean(axis=(1, 3))
    t -= np.repeat(np.repeat(low, block, axis=0), block, axis=1)
    flat = t.ravel()
    return flat / max(float(np.linalg.norm(flat)), 1e-6)


def thumbnail(image: Image.Image, size: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The normalised descriptor of `box` (pixels) of `image`, area-averaged to size x size."""
    return normalised(np.asarray(image.resize((size, size), Image.BOX, box=box, reducing_gap=None)))


def crop_windows(config: DedupConfig) -> np.ndarray:
    """(x0, y0, x1, y1) fractions of every crop window on the grid: [W, 4]."""
    step = config.window_step
    sides = np.round(np.arange(config.min_side, 1.0 + 1e-9, step), 6)
    windows = []
    for fw in sides:
        for fh in sides:
            if fw * fh < config.min_area - 1e-9:
                continue
            for x0 in np.linspace(0, 1 - fw, max(1, round((1 - fw) / step) + 1)):
                for y0 in np.linspace(0, 1 - fh, max(1, round((1 - fh) / step) + 1)):
                    windows.append((x0, y0, x0 + fw, y0 + fh))
    return np.array(windows, dtype=np.float64)


def _pixel_box(window: np.ndarray, size: int) -> tuple[float, float, float, float]:
    return tuple(float(v) * size for v in window)  # type: ignore[return-value]


def evaluation_images(source: str) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of every image of an evaluation set: a folder (searched recursively) or shards."""
    if is_image_folder(source):
        root = Path(source)
        for path in image_files(root):
            yield f"{root.name}/{path.relative_to(root).with_suffix('')}", path.read_bytes()
        return
    for sample in read_shard_samples(expand_shard_spec(source)):
        yield f"{Path(sample['__url__']).name}:{sample['__key__']}", sample_image_bytes(sample)


def read_evaluation(
    sources: list[str], short_side: int, on_image: Callable[[Image.Image], None] | None = None
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(keys, STORE x STORE RGB images, skipped (key, reason)) of every image of
    `sources`, each decoded with its shorter side at least `short_side` and handed to `on_image`."""
    keys, pixels, skipped = [], [], []
    for source in sources:
        if not Path(source).exists() and "{" not in source and "://" not in source:
            raise WslError(f"evaluation set not found: {source}")
        for key, data in tqdm(evaluation_images(source), desc=f"reading {source}", unit=" images", dynamic_ncols=True):
            try:
                image = decode_small(data, short_side)
            except DECODE_ERRORS as exn:
                skipped.append((key, f"corrupt image: {exn}"))
                continue
            keys.append(key)
            pixels.append(np.asarray(image.resize((STORE, STORE), Image.BOX, reducing_gap=None)))
            if on_image is not None:
                on_image(image)
    if not keys:
        raise WslError(f"no evaluation images in {', '.join(sources)}")
    return keys, np.stack(pixels), skipped


def write_evaluation(folder: Path, keys: list[str], store: np.ndarray, skipped: list) -> None:
    """The evaluation images' thumbnails and keys; the keys file last, as it marks the index complete."""

    def write_store(tmp: Path) -> None:
        with open(tmp, "wb") as stream:  # a file object: np.save would add ".npy" to a name
            np.save(stream, store)

    write_atomic(folder / "eval-store.npy", write_store)
    write_json(folder / "eval-keys.json", {"keys": keys, "skipped": skipped})


def build_index(sources: list[str], config: DedupConfig, folder: Path) -> EvalIndex | SscdIndex:
    """The evaluation index of `config.descriptor` (pixels: `EvalIndex`, sscd:PATH: `SscdIndex`) built into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if config.descriptor == "pixels":
        return EvalIndex.build(sources, config, folder)
    from wsl.dedup.sscd import SscdIndex

    return SscdIndex.build(sources, config.descriptor, folder)


def open_index(folder: Path, config: DedupConfig, threads: int | None = None) -> EvalIndex | SscdIndex:
    """The evaluation index built into `folder`, memory-mapped where it can be; a network, if the
    descriptor has one, runs on `threads` CPU threads (default: torch's)."""
    if config.descriptor == "pixels":
        return EvalIndex.open(folder, config)
    from wsl.dedup.sscd import SscdIndex

    return SscdIndex.open(folder, config.descriptor, threads)


def exact_search(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of the `k` rows of `database` with the largest inner product with each
    query, best first: a matrix product and a partial sort, a few queries at a time (at most ~32M
    similarities held). On this project's CPUs it ran 17x faster than `faiss.knn` (BENCHMARKS.md)."""
    similarity = np.zeros((len(queries), k), np.float32)
    rows = np.zeros((len(queries), k), np.int64)
    chunk = max(1, 32_000_000 // len(database))
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ database.T
        top = (
            np.argpartition(-scores, k - 1, axis=1)[:, :k]
            if k < len(database)
            else np.tile(np.arange(k), (len(scores), 1))
        )
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        rows[start : start + chunk] = np.take_along_axis(top, order, axis=1)
        similarity[start : start + chunk] = np.take_along_axis(top_scores, order, axis=1)
    return similarity, rows


class EvalIndex:
    """The evaluation images: every window's coarse descriptor, searched with FAISS, and the
    images at STORE x STORE for verification. Both live in .npy files that worker processes
    map into memory, so a machine holds them once. `match` scores pretraining images."""

    def __init__(self, keys: list[str], store: np.ndarray, windows_index, config: DedupConfig):
        self.keys, self.store, self.config = keys, store, config
        self.windows_index = windows_index  # a memory-mapped [windows, D] array (exact search) or a FAISS IVF index
        self.windows = crop_windows(config)
        self.per_image = 2 * len(self.windows)

    @staticmethod
    def _views(pixels: np.ndarray) -> tuple[Image.Image, Image.Image]:
        image = Image.fromarray(pixels)
        return image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    @classmethod
    def build(cls, sources: list[str], config: DedupConfig, folder: Path) -> EvalIndex:
        """Index every image of `sources` into `folder` (undecodable ones are skipped, listed in the keys file)."""
        keys, store, skipped = read_evaluation(sources, STORE)
        windows = crop_windows(config)
        total = len(keys) * 2 * len(windows)
        if config.index == "ivf" or (config.index == "auto" and total > config.ivf_above):
            cls._build_ivf(store, windows, config, folder / "eval-windows.faiss")
        else:

            def write_windows(tmp: Path) -> None:
                descriptors = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.float32, shape=(total, 3 * COARSE * COARSE)
                )
                per_image = 2 * len(windows)
                for i, image_pixels in enumerate(
                    tqdm(store, desc="indexing evaluation windows", unit=" images", dynamic_ncols=True)
                ):
                    descriptors[i * per_image : (i + 1) * per_image] = cls._window_descriptors(image_pixels, windows)
                descriptors.flush()

            write_atomic(folder / "eval-windows.npy", write_windows)

        write_evaluation(folder, keys, store, skipped)
        return cls.open(folder, config)

    @classmethod
    def _window_descriptors(cls, pixels: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """The coarse descriptors of every window of an image, then of its mirror: [2W, D]."""
        return np.stack(
            [thumbnail(view, COARSE, _pixel_box(window, STORE)) for view in cls._views(pixels) for window in windows]
        )

    @classmethod
    def _build_ivf(cls, store: np.ndarray, windows: np.ndarray, config: DedupConfig, path: Path) -> None:
        """A compressed window index (PCA, IVF, 8-bit codes), trained on evenly spaced images, written atomically."""
        import faiss

        per_image = 2 * len(windows)
        total = len(store) * per_image
        nlist = config.nlist or max(1, int(4 * math.sqrt(total)))
        train_images = min(len(store), max(1, -(-max(64 * nlist, 100_000) // per_image)))
        sample = np.unique(np.linspace(0, len(store) - 1, train_images).astype(int))
        index = faiss.index_factory(
            3 * COARSE * COARSE, f"PCA{config.pca_dim},IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT
        )
        index.train(np.concatenate([cls._window_descriptors(store[i], windows) for i in sample]))
        for start in tqdm(
            range(0, len(store), 256), desc="indexing evaluation windows (IVF)", unit=" x256 images", dynamic_ncols=True
        ):
            index.add(np.concatenate([cls._window_descriptors(p, windows) for p in store[start : start + 256]]))
        write_atomic(path, lambda tmp: faiss.write_index(index, str(tmp)))

    @classmethod
    def open(cls, folder: Path, config: DedupConfig) -> EvalIndex:
        """The index of `folder`, memory-mapped: worker processes on a machine share one copy."""
        keys = json.loads((folder / "eval-keys.json").read_text())["keys"]
        store = np.load(folder / "eval-store.npy", mmap_mode="r")
        if (folder / "eval-windows.faiss").is_file():
            import faiss

            search_index = faiss.read_index(
                str(folder / "eval-windows.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
            )
            faiss.extract_index_ivf(search_index).nprobe = config.nprobe
            return cls(keys, store, search_index, config)
        return cls(keys, store, np.load(folder / "eval-windows.npy", mmap_mode="r"), config)

    @staticmethod
    def decode(data: bytes) -> Image.Image:
        """A pretraining image as `match` takes it: decoded small enough to be cheap (JPEG draft mode)."""
        return decode_small(data, 2 * FINE)

    def coarse_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest windows by inner product: exact over the memory-mapped descriptors, or through the IVF index.

        The exact search is `exact_search`."""
        if not isinstance(self.windows_index, np.ndarray):
            return self.windows_index.search(queries, k)
        return exact_search(queries, self.windows_index, k)

    def _verify(self, query: Image.Image, row: int) -> float:
        """Detail correlation of `query` with the window near index row `row` that fits it best.

        Coordinate ascent over the window's edges, position and size: first on the whole
        FINE thumbnail (brings the objects into line), then on its detail (lines up the texture)."""
        image, window = self._window(row)
        whole = thumbnail(query, FINE)
        query_detail = detail(np.asarray(query.resize((FINE, FINE), Image.BOX, reducing_gap=None)))

        def whole_correlation(w: np.ndarray) -> float:
            return float(whole @ thumbnail(image, FINE, _pixel_box(w, STORE)))

        def detail_correlation(w: np.ndarray) -> float:
            pixels = np.asarray(image.resize((FINE, FINE), Image.BOX, box=_pixel_box(w, STORE), reducing_gap=None))
            return float(query_detail @ detail(pixels))

        window, _ = _ascend(whole_correlation, window, (0.02, 0.01, 0.005))
        _, best = _ascend(detail_correlation, window, (0.005, 0.0025))
        return best

    def _exact_order(self, query: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The IVF index's hits re-ranked by their exact similarity, recomputed from the stored images:
        PCA and 8-bit codes change the similarities, and the prefilter is defined on exact ones."""
        exact = np.array([query @ self._window_thumbnail(int(row), COARSE) for row in rows], dtype=np.float32)
        order = np.argsort(-exact, kind="stable")
        return exact[order], rows[order]

    def _window(self, row: int) -> tuple[Image.Image, np.ndarray]:
        """What index row `row` stands for: the evaluation image (or its mirror) and the window's fractions."""
        owner, rest = divmod(int(row), self.per_image)
        flip, window_id = divmod(rest, len(self.windows))
        return self._views(np.asarray(self.store[owner]))[flip], self.windows[window_id].copy()

    def _window_thumbnail(self, row: int, size: int) -> np.ndarray:
        image, window = self._window(row)
        return thumbnail(image, size, _pixel_box(window, STORE))

    def match(self, images: list[Image.Image]) -> list[tuple[float, int]]:
        """(verification score, evaluation image) of each pretraining image's best match; (0, -1) if none."""
        if not images:
            return []
        coarse = np.stack(
            [normalised(np.asarray(im.resize((COARSE, COARSE), Image.BOX, reducing_gap=None))) for im in images]
        )
        similarity, rows = self.coarse_search(
            coarse, min(len(self.keys) * self.per_image, self.config.candidates * self.per_image)
        )
        results = []
        for image, query, sims, found in zip(images, coarse, similarity, rows):
            if not isinstance(self.windows_index, np.ndarray):
                sims, found = self._exact_order(query, found[found >= 0][:RERANK])
            best, seen = (0.0, -1), set()
            if len(found) and sims[0] >= self.config.prefilter:
                for row in found:  # nearest windows first: the first of each image is its starting point
                    owner = int(row) // self.per_image
                    if row < 0 or owner in seen:
                        continue
                    seen.add(owner)
                    score = self._verify(image, row)
                    if score > best[0]:
                        best = (score, owner)
                    if len(seen) == self.config.candidates:
                        break
            results.append(best)
        return results


def _ascend(objective, window: np.ndarray, steps: tuple[float, ...]) -> tuple[np.ndarray, float]:
    """Coordinate ascent of objective(window) over single edges, shifts and scalings."""
    best = objective(window)
    for step in steps:
        improved = True
        while improved:
            improved = False
            for move in _MOVES:
                for sign in (-1, 1):
                    trial = np.clip(window + sign * step * move, 0, 1)
                    if trial[2] - trial[0] < 0.5 or trial[3] - trial[1] < 0.5:
                        continue
                    value = objective(trial)
                    if value > best:
                        best, window, improved = value, trial, True
    return window, best


_MOVES = [*np.eye(4), np.array([1.0, 0, 1, 0]), np.array([0, 1.0, 0, 1]), np.array([-1.0, -1, 1, 1])]
