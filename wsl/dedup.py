"""`wsl dedup`: drop pretraining samples that copy an evaluation image, and exact byte duplicates.

The copies on the web are resized, re-compressed, cropped, recoloured and mirrored versions
of the evaluation images. The descriptor is pixels, at low resolution, in two stages:

1. Retrieval. Every evaluation image is indexed as many windows: crops keeping at least
   `min_area` of it (each side >= `min_side`, on a grid of `window_step`) and their mirror
   images, each a COARSE x COARSE RGB thumbnail with its mean colour removed and its contrast
   normalised (so brightness, contrast and small colour shifts barely move it), L2-normalised,
   in a FAISS inner-product index. A pretraining image is one thumbnail of its whole frame,
   decoded in JPEG draft mode (the decoder scales by 1/2..1/8 for free). One of the windows
   is within half a grid step of any crop, so the right evaluation image is among the
   nearest `candidates` images.
2. Verification. For each of the `candidates` nearest evaluation images, the window is
   refined by coordinate ascent (edges, position, size): first on the whole FINE x FINE
   thumbnail, which lines up the objects, then on its detail (what the thumbnail holds beyond
   4 x 4-pixel block averages: texture, edges), which lines up the texture. The score is the
   correlation of the details; a sample is a copy when it reaches `threshold`. Whole
   thumbnails of two different images with a similar object on a similar background can
   correlate above 0.95 once aligned; their details do not, while a copy's survive JPEG
   quality 30 and a 2x downscale.

A learned copy-detection embedding (SSCD) would be stronger against heavy edits, but needs
weights that nothing here may download; pixels need none. Costs: BENCHMARKS.md.

Input shards are processed in parallel, one task a shard, each writing its decisions
(`decisions/<shard>.json`) through a rename; byte duplicates are then resolved in shard
order (the first copy stays); the filtered shards are written through a rename too. A killed
run re-run skips every finished decision and shard, and the same input gives byte-identical
output.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from wsl.data import is_image_folder
from wsl.errors import WslError
from wsl.shards import IMAGE_EXTENSIONS, SIZES_FILE, _MTIME, expand_shard_spec, is_sample_member, sample_image_bytes

COARSE = 16  # retrieval thumbnail side
FINE = 48  # verification thumbnail side
STORE = 96  # evaluation images kept as STORE x STORE RGB for verification (windows are fractions)
FORMAT = "wsl-dedup-1"
# Workers are spawned, not forked: a fork after FAISS's OpenMP threads have run (building the
# IVF index) deadlocks the child's first OpenMP call.
_SPAWN = multiprocessing.get_context("spawn")
RERANK = 64  # IVF hits re-ranked by exact similarity
REPORT_FILE = "dedup_report.json"
PICTURE_FILE = "dedup_matches.png"
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError)


@dataclass
class DedupConfig:
    threshold: float = 0.77  # verified detail correlation at or above which a sample is a copy (BENCHMARKS.md)
    prefilter: float = 0.6  # retrieval similarity below which a sample is not verified at all
    candidates: int = 1  # nearest evaluation images verified per sample: verification is the cost
    min_area: float = 0.68  # smallest crop (fraction of the area) the windows cover
    min_side: float = 0.7
    window_step: float = 0.05
    # The window index: "flat" (exact, float32, ~3 KB a window), "ivf" (PCA to `pca_dim`, IVF with
    # `nlist` lists (0: 4 sqrt(windows)) searched `nprobe` at a time, 8-bit codes: ~130 B a window),
    # or "auto": ivf above `ivf_above` windows (500 an evaluation image: 4,000 images).
    index: str = "auto"
    ivf_above: int = 2_000_000
    nlist: int = 0
    nprobe: int = 64
    pca_dim: int = 128


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
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
            yield f"{root.name}/{path.relative_to(root).with_suffix('')}", path.read_bytes()
        return
    for sample in wds.DataPipeline(wds.SimpleShardList(expand_shard_spec(source)),
                                   wds.tarfile_to_samples(select_files=is_sample_member)):
        yield f"{Path(sample['__url__']).name}:{sample['__key__']}", sample_image_bytes(sample)


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
    def build(cls, sources: list[str], config: DedupConfig, folder: Path) -> tuple[EvalIndex, list[tuple[str, str]]]:
        """Index every image of `sources` into `folder`; undecodable images are skipped and returned with a reason."""
        keys, pixels, skipped = [], [], []
        for source in sources:
            if not Path(source).exists() and "{" not in source and "://" not in source:
                raise WslError(f"evaluation set not found: {source}")
            for key, data in tqdm(evaluation_images(source), desc=f"reading {source}", unit=" images",
                                  dynamic_ncols=True):
                try:
                    image = decode_small(data, STORE)
                except DECODE_ERRORS as exn:
                    skipped.append((key, f"corrupt image: {exn}"))
                    continue
                keys.append(key)
                pixels.append(np.asarray(image.resize((STORE, STORE), Image.BOX, reducing_gap=None)))
        if not keys:
            raise WslError(f"no evaluation images in {', '.join(sources)}")
        store = np.stack(pixels)
        windows = crop_windows(config)
        total = len(keys) * 2 * len(windows)
        folder.mkdir(parents=True, exist_ok=True)
        if config.index not in ("auto", "flat", "ivf"):
            raise WslError(f"index must be auto, flat or ivf, not {config.index!r}")
        if config.index == "ivf" or (config.index == "auto" and total > config.ivf_above):
            cls._build_ivf(store, windows, config, folder / "eval-windows.faiss")
        else:
            tmp = folder / "eval-windows.npy.tmp"
            descriptors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, 3 * COARSE * COARSE))
            per_image = 2 * len(windows)
            for i, image_pixels in enumerate(tqdm(store, desc="indexing evaluation windows", unit=" images",
                                                  dynamic_ncols=True)):
                descriptors[i * per_image:(i + 1) * per_image] = cls._window_descriptors(image_pixels, windows)
            descriptors.flush()
            del descriptors
            os.replace(tmp, folder / "eval-windows.npy")
        with open(folder / "eval-store.npy.tmp", "wb") as stream:
            np.save(stream, store)
        os.replace(folder / "eval-store.npy.tmp", folder / "eval-store.npy")
        _write_json(folder / "eval-keys.json", {"keys": keys, "skipped": skipped})  # last: marks the index complete
        return cls.open(folder, config), skipped

    @classmethod
    def _window_descriptors(cls, pixels: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """The coarse descriptors of every window of an image, then of its mirror: [2W, D]."""
        return np.stack([thumbnail(view, COARSE, _pixel_box(window, STORE))
                         for view in cls._views(pixels) for window in windows])

    @classmethod
    def _build_ivf(cls, store: np.ndarray, windows: np.ndarray, config: DedupConfig, path: Path) -> None:
        """A compressed window index (PCA, IVF, 8-bit codes), trained on evenly spaced images, written through a rename."""
        import faiss

        per_image = 2 * len(windows)
        total = len(store) * per_image
        nlist = config.nlist or max(1, int(4 * math.sqrt(total)))
        train_images = min(len(store), max(1, -(-max(64 * nlist, 100_000) // per_image)))
        sample = np.unique(np.linspace(0, len(store) - 1, train_images).astype(int))
        index = faiss.index_factory(3 * COARSE * COARSE, f"PCA{config.pca_dim},IVF{nlist},SQ8",
                                    faiss.METRIC_INNER_PRODUCT)
        index.train(np.concatenate([cls._window_descriptors(store[i], windows) for i in sample]))
        for start in tqdm(range(0, len(store), 256), desc="indexing evaluation windows (IVF)", unit=" x256 images",
                          dynamic_ncols=True):
            index.add(np.concatenate([cls._window_descriptors(p, windows) for p in store[start:start + 256]]))
        faiss.write_index(index, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)

    @classmethod
    def open(cls, folder: Path, config: DedupConfig) -> EvalIndex:
        """The index of `folder`, memory-mapped: worker processes on a machine share one copy."""
        keys = json.loads((folder / "eval-keys.json").read_text())["keys"]
        store = np.load(folder / "eval-store.npy", mmap_mode="r")
        if (folder / "eval-windows.faiss").is_file():
            import faiss

            search_index = faiss.read_index(str(folder / "eval-windows.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            faiss.extract_index_ivf(search_index).nprobe = config.nprobe
            return cls(keys, store, search_index, config)
        return cls(keys, store, np.load(folder / "eval-windows.npy", mmap_mode="r"), config)

    def coarse_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest windows by inner product: exact over the memory-mapped descriptors, or through the IVF index."""
        import faiss

        if isinstance(self.windows_index, np.ndarray):
            return faiss.knn(queries, self.windows_index, k, metric=faiss.METRIC_INNER_PRODUCT)
        return self.windows_index.search(queries, k)

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
        coarse = np.stack([normalised(np.asarray(im.resize((COARSE, COARSE), Image.BOX, reducing_gap=None)))
                           for im in images])
        similarity, rows = self.coarse_search(coarse, min(len(self.keys) * self.per_image, self.config.candidates * self.per_image))
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


def image_for_matching(data: bytes) -> Image.Image:
    """A pretraining image as `EvalIndex.match` takes it: decoded small enough to be cheap."""
    return decode_small(data, 2 * FINE)


# ---------------------------------------------------------------------------- the pipeline


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _shard_samples(url: str) -> Iterator[dict]:
    yield from wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(select_files=is_sample_member))


def _score_shard(url: str, work: str, config: dict, threads: int, batch: int = 256) -> dict:
    """Task: every sample of one shard scored against the evaluation index -> decisions/<shard>.json."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = EvalIndex.open(Path(work), DedupConfig(**config))
    records: list[dict] = []
    pending: list[tuple[dict, Image.Image]] = []

    def flush() -> None:
        for (record, _), (score, owner) in zip(pending, index.match([image for _, image in pending])):
            record.update(score=round(score, 4), match=index.keys[owner] if owner >= 0 else None)
        pending.clear()

    for sample in _shard_samples(url):
        try:
            data = sample_image_bytes(sample)
        except ValueError:
            data = b""
        record = {"key": sample["__key__"], "sha256": hashlib.sha256(data).hexdigest()}
        records.append(record)
        try:
            pending.append((record, image_for_matching(data)))
        except DECODE_ERRORS as exn:
            record["corrupt"] = str(exn) or type(exn).__name__
        if len(pending) == batch:
            flush()
    flush()
    decisions = {"shard": Path(url).name, "samples": records}
    _write_json(Path(work) / "decisions" / f"{Path(url).name}.json", decisions)
    return decisions


def _write_filtered_shard(url: str, out: str, keep: list[str]) -> None:
    """Task: the kept samples of one shard, their members' bytes unchanged, through a rename."""
    path = Path(out) / Path(url).name
    tmp = path.with_name(path.name + ".tmp")
    wanted = set(keep)
    with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=_MTIME) as writer:
        for sample in _shard_samples(url):
            if sample["__key__"] in wanted:
                writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
    os.replace(tmp, path)


def _classify(decisions: list[dict], threshold: float) -> dict[str, dict]:
    """Per shard: kept keys and the removed ones, why. Byte duplicates are resolved in shard
    order, so the first copy stays whatever the number of workers."""
    first_seen: dict[str, str] = {}
    result: dict[str, dict] = {}
    for shard in decisions:
        entry = {"samples": len(shard["samples"]), "keep": [], "copies": [], "exact_duplicates": [], "corrupt": []}
        for record in shard["samples"]:
            where = f"{shard['shard']}:{record['key']}"
            if "corrupt" in record:
                entry["corrupt"].append({"key": record["key"], "reason": record["corrupt"]})
                continue
            if record["score"] >= threshold:
                entry["copies"].append({"key": record["key"], "match": record["match"], "score": record["score"]})
            elif record["sha256"] in first_seen:
                entry["exact_duplicates"].append({"key": record["key"], "same_as": first_seen[record["sha256"]]})
            else:
                entry["keep"].append(record["key"])
            first_seen.setdefault(record["sha256"], where)
        result[shard["shard"]] = entry
    return result


def _picture(urls: list[str], per_shard: dict[str, dict], index: EvalIndex, path: Path, examples: int = 8) -> None:
    """Example matches: each row a removed pretraining image beside the evaluation image it copies."""
    size = 96
    rows: list[tuple[Image.Image, Image.Image, float]] = []
    for url in urls:
        copies = {c["key"]: c for c in per_shard[Path(url).name]["copies"]}
        if not copies:
            continue
        for sample in _shard_samples(url):
            found = copies.get(sample["__key__"])
            if found:
                mine = decode_small(sample_image_bytes(sample), size).resize((size, size))
                theirs = Image.fromarray(np.asarray(index.store[index.keys.index(found["match"])])).resize((size, size))
                rows.append((mine, theirs, found["score"]))
            if len(rows) == examples:
                break
        if len(rows) == examples:
            break
    canvas = Image.new("RGB", (2 * size + 4, max(1, len(rows)) * (size + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (mine, theirs, score) in enumerate(rows):
        top = i * (size + 14)
        canvas.paste(mine, (0, top + 12))
        canvas.paste(theirs, (size + 4, top + 12))
        draw.text((2, top), f"pretraining | evaluation  {score:.3f}", fill="black")
    canvas.save(path)


def run_dedup(shards: str, against: list[str], out: str | Path, config: DedupConfig | None = None,
              workers: int = 1, threads: int | None = None) -> dict:
    """Filter `shards` into `out`: without copies of the `against` sets' images, without byte
    duplicates and undecodable images. Returns the report (also `out/dedup_report.json`).
    `workers` shards at a time, each searching with `threads` FAISS threads (default: the cores shared out)."""
    config = config or DedupConfig()
    started = time.time()
    urls = expand_shard_spec(shards)
    names = [Path(url).name for url in urls]
    if len(set(names)) != len(names):
        raise WslError("input shards must have distinct file names: the filtered shards keep them")
    out = Path(out)
    if any(Path(url).resolve().parent == out.resolve() for url in urls):
        raise WslError(f"--out {out} holds the input shards: choose another folder")
    work = out / "_dedup"
    settings = {"format": FORMAT, "config": asdict(config), "against": [str(a) for a in against], "shards": urls}
    settings_file = work / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        for stale in [*work.glob("*"), *work.glob("decisions/*"), *out.glob("*.tar*")]:
            if stale.is_file():
                stale.unlink()  # another run's settings: nothing of it may be reused
    (work / "decisions").mkdir(parents=True, exist_ok=True)
    _write_json(settings_file, settings)

    if (work / "eval-keys.json").is_file():
        index = EvalIndex.open(work, config)
    else:
        index, _ = EvalIndex.build([str(a) for a in against], config, work)
    eval_skipped = json.loads((work / "eval-keys.json").read_text())["skipped"]

    decisions_file = {url: work / "decisions" / f"{Path(url).name}.json" for url in urls}
    pending = [url for url in urls if not decisions_file[url].is_file()]
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    progress = tqdm(total=len(urls), initial=len(urls) - len(pending), desc="de-duplicating", unit=" shards",
                    dynamic_ncols=True)
    images, tick = 0, time.time()
    with cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=_SPAWN) as pool:
        for done in cf.as_completed([pool.submit(_score_shard, url, str(work), asdict(config), threads) for url in pending]):
            images += len(done.result()["samples"])
            progress.update()
            progress.set_postfix(images_per_sec=round(images / max(time.time() - tick, 1e-6)))
    progress.close()

    per_shard = _classify([json.loads(decisions_file[url].read_text()) for url in urls], config.threshold)
    with cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=_SPAWN) as pool:
        jobs = [pool.submit(_write_filtered_shard, url, str(out), per_shard[Path(url).name]["keep"])
                for url in urls if not (out / Path(url).name).is_file()]
        for job in tqdm(cf.as_completed(jobs), total=len(jobs), desc="writing filtered shards", unit=" shards",
                        dynamic_ncols=True):
            job.result()
    _write_json(out / SIZES_FILE, {name: len(entry["keep"]) for name, entry in per_shard.items()})
    _picture(urls, per_shard, index, out / PICTURE_FILE)

    totals = {what: sum(len(e[what]) for e in per_shard.values()) for what in ("copies", "exact_duplicates", "corrupt")}
    report = {
        "format": FORMAT,
        "config": asdict(config),
        "against": settings["against"],
        "evaluation_images": len(index.keys),
        "evaluation_skipped": [{"key": k, "reason": r} for k, r in eval_skipped],
        "input_samples": sum(e["samples"] for e in per_shard.values()),
        "kept": sum(len(e["keep"]) for e in per_shard.values()),
        "removed": totals,
        "shards": {name: {k: v for k, v in e.items() if k != "keep"} | {"kept": len(e["keep"])}
                   for name, e in per_shard.items()},
        "picture": str(out / PICTURE_FILE),
        "seconds": round(time.time() - started, 1),
    }
    _write_json(out / REPORT_FILE, report)
    return report
