"""`wsl dedup`: the pipeline over shards (resumable, byte-identical), the report and its picture."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from wsl.config import REQUIRED, option
from wsl.data.shards import SIZES_FILE, TAR_MTIME, expand_shard_spec, read_shard_samples, sample_image_bytes
from wsl.dedup.index import (
    DECODE_ERRORS,
    FORMAT,
    DedupConfig,
    build_index,
    decode_small,
    open_index,
)
from wsl.errors import WslError
from wsl.files import write_atomic, write_json
from wsl.parts import PartKeys, read_records, this_part, write_record
from wsl.pictures import image_grid

_SPAWN = multiprocessing.get_context("spawn")  # forked workers deadlock in FAISS after the parent used OpenMP
REPORT_FILE = "dedup_report.json"
PICTURE_FILE = "dedup_matches.png"


def _start_worker(workers_started) -> None:
    """Worker initialiser: the n-th worker of a machine uses GPU n mod the GPUs there are (an SSCD
    network on every worker would otherwise share cuda:0)."""
    with workers_started.get_lock():
        number = workers_started.value
        workers_started.value += 1
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(number % torch.cuda.device_count())


def _pool(workers: int) -> cf.Executor:
    """One pool for scoring and writing. Several workers are spawned processes, each importing
    torch and opening the index once; a single one is a thread of this process, which has both
    already (a spawned one took ~3.5 s to start, a tenth of `make bench-dedup`'s run)."""
    if workers <= 1:
        return cf.ThreadPoolExecutor(max_workers=1)
    return cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=_SPAWN, initializer=_start_worker, initargs=(_SPAWN.Value("i", 0),)
    )


def _scoring_index(work: str, config_json: str, threads: int):
    """The evaluation index as scoring opens it: FAISS (and an SSCD network) on `threads` threads."""
    import faiss

    faiss.omp_set_num_threads(threads)
    return open_index(Path(work), DedupConfig(**json.loads(config_json)), threads)


_worker_index = functools.lru_cache(maxsize=1)(_scoring_index)  # once per spawned worker (an SSCD network too)


def _score_shard(url: str, work: str, config: dict, threads: int, index=None, batch: int = 256) -> dict:
    """Task: every sample of one shard scored against the evaluation index (that of a spawned
    worker where `index` is None) -> decisions/<shard>.json."""
    if index is None:
        index = _worker_index(work, json.dumps(config, sort_keys=True), threads)
    records: list[dict] = []
    pending: list[tuple[dict, Image.Image]] = []

    def flush() -> None:
        for (record, _), (score, owner) in zip(pending, index.match([image for _, image in pending])):
            record.update(score=round(score, 4), match=index.keys[owner] if owner >= 0 else None)
        pending.clear()

    for sample in read_shard_samples([url]):
        try:
            data = sample_image_bytes(sample)
        except ValueError:
            data = b""
        record = {"key": sample["__key__"], "sha256": hashlib.sha256(data).hexdigest()}
        records.append(record)
        try:
            pending.append((record, index.decode(data)))
        except DECODE_ERRORS as exn:
            record["corrupt"] = str(exn) or type(exn).__name__
        if len(pending) == batch:
            flush()
    flush()
    decisions = {"shard": Path(url).name, "samples": records}
    write_json(Path(work) / "decisions" / f"{Path(url).name}.json", decisions)
    return decisions


def _write_filtered_shard(url: str, out: str, keep_file: str) -> None:
    """Task: the kept samples of one shard, their members' bytes unchanged, through a rename."""
    path = Path(out) / Path(url).name
    wanted = set(json.loads(Path(keep_file).read_text()))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for sample in read_shard_samples([url]):
                if sample["__key__"] in wanted:
                    writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})

    write_atomic(path, write)


_RECORD = np.dtype([("d0", ">u8"), ("d1", ">u8"), ("d2", ">u8"), ("d3", ">u8"), ("shard", "<u4"), ("sample", "<u4")])
_DUPLICATE = np.dtype([("shard", "<u4"), ("sample", "<u4"), ("first_shard", "<u4"), ("first_sample", "<u4")])
BUCKETS = 1024  # digest partitions: ~1M records a bucket at 1B images, a few MB to sort
SHARD_GROUP = 1024  # duplicates are filed by input shard // SHARD_GROUP
BUFFER = 65_536  # records held before they are appended to their files


class _Appender:
    """Records of one dtype appended to numbered files under `folder`, `BUFFER` at a time."""

    def __init__(self, folder: Path, dtype: np.dtype, file_of):
        self.folder, self.dtype, self.file_of = folder, dtype, file_of
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.bin"):
            stale.unlink()
        self.buffer, self.size = np.zeros(BUFFER, dtype), 0

    def add(self, rows: np.ndarray) -> None:
        for start in range(0, len(rows), BUFFER):
            chunk = rows[start : start + BUFFER]
            if self.size + len(chunk) > BUFFER:
                self.flush()
            self.buffer[self.size : self.size + len(chunk)] = chunk
            self.size += len(chunk)

    def flush(self) -> None:
        files = self.file_of(self.buffer[: self.size])
        order = np.argsort(files, kind="stable")
        rows, files = self.buffer[: self.size][order], files[order]
        numbers, starts = np.unique(files, return_index=True)
        for number, start, end in zip(numbers, starts, [*starts[1:], len(rows)]):
            with open(self.folder / f"{number:06d}.bin", "ab") as stream:
                stream.write(rows[start:end].tobytes())
        self.size = 0

    def read(self, number: int) -> np.ndarray:
        path = self.folder / f"{number:06d}.bin"
        return np.fromfile(path, self.dtype) if path.is_file() else np.zeros(0, self.dtype)


def _byte_duplicates(decision_files: list[Path], work: Path) -> _Appender:
    """Find byte duplicates in memory that does not grow with the data: every decodable sample's
    (SHA-256, shard, sample) goes to one of `BUCKETS` files by its digest; each bucket is sorted
    alone; every sample after the first (in shard order) of its digest is a duplicate, filed by
    its shard's group. Returns the duplicates' files."""
    buckets = _Appender(work / "digests", _RECORD, lambda rows: (rows["d0"] % BUCKETS).astype(np.int64))
    for shard, path in enumerate(decision_files):
        samples = json.loads(path.read_text())["samples"]
        rows = np.zeros(len(samples), _RECORD)
        digests = np.frombuffer(b"".join(bytes.fromhex(r["sha256"]) for r in samples), ">u8").reshape(-1, 4)
        for column in range(4):
            rows[f"d{column}"] = digests[:, column] if len(samples) else 0
        rows["shard"], rows["sample"] = shard, np.arange(len(samples))
        buckets.add(rows[[("corrupt" not in r) for r in samples]])
    buckets.flush()
    duplicates = _Appender(
        work / "duplicates", _DUPLICATE, lambda rows: (rows["shard"] // SHARD_GROUP).astype(np.int64)
    )
    for bucket in range(BUCKETS):
        rows = np.sort(buckets.read(bucket), order=["d0", "d1", "d2", "d3", "shard", "sample"])
        if not len(rows):
            continue
        changed = np.zeros(len(rows) - 1, bool)
        for column in ("d0", "d1", "d2", "d3"):
            changed |= rows[column][1:] != rows[column][:-1]
        first = np.r_[True, changed]
        start = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))[~first]  # each group's first row
        found = np.zeros(len(start), _DUPLICATE)
        found["shard"], found["sample"] = rows["shard"][~first], rows["sample"][~first]
        found["first_shard"], found["first_sample"] = rows["shard"][start], rows["sample"][start]
        duplicates.add(found)
    duplicates.flush()
    return duplicates


def classify_decisions(decision_files: list[Path], threshold: float, work: Path) -> Iterator[tuple[str, dict]]:
    """(shard name, its entry: kept keys and the removed ones, why), one shard at a time in
    shard order, in memory that does not grow with the number of shards or samples. Byte
    duplicates are resolved in shard order, so the first copy stays whatever the number of
    workers; a sample at or above `threshold` is a copy of an evaluation image first."""
    duplicates = _byte_duplicates(decision_files, work)
    group, same_as = -1, {}

    @functools.lru_cache(maxsize=8)  # duplicates mostly point to few recent shards
    def keys_of(shard: int) -> tuple[str, list[str]]:
        decisions = json.loads(decision_files[shard].read_text())
        return decisions["shard"], [record["key"] for record in decisions["samples"]]

    def where(shard: int, sample: int) -> str:
        name, keys = keys_of(shard)
        return f"{name}:{keys[sample]}"

    for shard, path in enumerate(decision_files):
        if shard // SHARD_GROUP != group:
            group = shard // SHARD_GROUP
            same_as = {}
            for row in duplicates.read(group):
                same_as[(int(row["shard"]), int(row["sample"]))] = (int(row["first_shard"]), int(row["first_sample"]))
        decisions = json.loads(path.read_text())
        entry = {"samples": len(decisions["samples"]), "keep": [], "copies": [], "exact_duplicates": [], "corrupt": []}
        for sample, record in enumerate(decisions["samples"]):
            if "corrupt" in record:
                entry["corrupt"].append({"key": record["key"], "reason": record["corrupt"]})
            elif record["score"] >= threshold:
                entry["copies"].append({"key": record["key"], "match": record["match"], "score": record["score"]})
            elif (shard, sample) in same_as:
                entry["exact_duplicates"].append({"key": record["key"], "same_as": where(*same_as[(shard, sample)])})
            else:
                entry["keep"].append(record["key"])
        yield decisions["shard"], entry


def _picture(urls: list[str], per_shard: dict[str, dict], index, path: Path, examples: int = 8) -> None:
    """Example matches: each row a removed pretraining image beside the evaluation image it copies."""
    rows: list[list] = []
    captions: list[str] = []
    for url in urls:
        copies = {c["key"]: c for c in per_shard[Path(url).name]["copies"]}
        if not copies:
            continue
        for sample in read_shard_samples([url]):
            found = copies.get(sample["__key__"])
            if found:
                mine = decode_small(sample_image_bytes(sample), 96)
                theirs = Image.fromarray(np.asarray(index.store[index.keys.index(found["match"])]))
                rows.append([(mine, None), (theirs, None)])
                captions.append(f"pretraining | evaluation  {found['score']:.3f}")
            if len(rows) == examples:
                break
        if len(rows) == examples:
            break
    image_grid(rows, path, size=96, captions=captions)


def run_dedup(
    shards: str,
    against: list[str],
    out: str | Path,
    config: DedupConfig | None = None,
    workers: int = 1,
    threads: int | None = None,
    part: tuple[int, int] | None = None,
    merge: bool = False,
) -> dict:
    """Filter `shards` into `out`: without copies of the `against` sets' images, without byte
    duplicates and undecodable images. Returns the report (also `out/dedup_report.json`).
    `workers` shards at a time, each searching with `threads` FAISS threads (default: the cores shared out).

    In a job array: `part` = (I, N) only scores the shards whose index is I mod N (their
    decisions, the costly step) and records it; then `merge` (every shard scored) resolves byte
    duplicates across all of them in bounded memory and writes the filtered shards and the
    report, the same bytes as one run."""
    config = config or DedupConfig()
    started = time.time()
    urls = expand_shard_spec(shards)
    names = [Path(url).name for url in urls]
    if len(set(names)) != len(names):
        raise WslError("input shards must have distinct file names: the filtered shards keep them")
    out = Path(out)
    if any(Path(url).resolve().parent == out.resolve() for url in urls):
        raise WslError(f"out={out} holds the input shards: choose another folder")
    work = out / "_dedup"
    settings = {"format": FORMAT, "config": asdict(config), "against": [str(a) for a in against], "shards": urls}
    settings_file = work / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        for stale in [*work.glob("*"), *work.glob("decisions/*"), *out.glob("*.tar*")]:
            if stale.is_file():
                stale.unlink()  # another run's settings: nothing of it may be reused
    (work / "decisions").mkdir(parents=True, exist_ok=True)
    write_json(settings_file, settings)

    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    built = None if (work / "eval-keys.json").is_file() else build_index([str(a) for a in against], config, work)
    if workers <= 1:  # one worker, a thread: this index, opened as scoring opens it (an SSCD network loads once)
        index = _scoring_index(str(work), json.dumps(asdict(config), sort_keys=True), threads)
    else:
        index = built if built is not None else open_index(work, config)
    eval_skipped = json.loads((work / "eval-keys.json").read_text())["skipped"]

    decisions_file = {url: work / "decisions" / f"{Path(url).name}.json" for url in urls}
    mine = urls if part is None else urls[part[0] :: part[1]]
    pending = [url for url in mine if not decisions_file[url].is_file()]
    if merge and pending:
        read_records(out, "dedup")  # names the parts that have not finished
        raise WslError(f"{len(pending)} shards have no decisions ({Path(pending[0]).name}...): run their parts again")
    progress = tqdm(
        total=len(mine), initial=len(mine) - len(pending), desc="de-duplicating", unit=" shards", dynamic_ncols=True
    )
    images, tick = 0, time.time()
    in_process = index if workers <= 1 else None  # (not cached across runs, which may rebuild the index)
    with _pool(workers) as pool:
        for done in cf.as_completed(
            [pool.submit(_score_shard, url, str(work), asdict(config), threads, in_process) for url in pending]
        ):
            images += len(done.result()["samples"])
            progress.update()
            progress.set_postfix(images_per_sec=round(images / max(time.time() - tick, 1e-6)))
        progress.close()
        if part is not None:
            write_record(out, "dedup", *part, {"shards": [Path(url).name for url in mine]})
            return {"part": part, "shards": len(mine), "images": images, "seconds": round(time.time() - started, 1)}

        sizes, per_shard = {}, {}
        (work / "kept").mkdir(exist_ok=True)
        for name, entry in classify_decisions([decisions_file[url] for url in urls], config.copy_threshold, work):
            write_json(work / "kept" / f"{name}.json", entry.pop("keep"))  # one shard's list at a time
            sizes[name] = entry["samples"] - sum(len(entry[what]) for what in ("copies", "exact_duplicates", "corrupt"))
            per_shard[name] = entry | {"kept": sizes[name]}  # what was removed, and why
        jobs = [
            pool.submit(_write_filtered_shard, url, str(out), str(work / "kept" / f"{Path(url).name}.json"))
            for url in urls
            if not (out / Path(url).name).is_file()
        ]
        for job in tqdm(
            cf.as_completed(jobs), total=len(jobs), desc="writing filtered shards", unit=" shards", dynamic_ncols=True
        ):
            job.result()
    write_json(out / SIZES_FILE, sizes)
    _picture(urls, per_shard, index, out / PICTURE_FILE)

    totals = {what: sum(len(e[what]) for e in per_shard.values()) for what in ("copies", "exact_duplicates", "corrupt")}
    report = {
        "format": FORMAT,
        "config": asdict(config),
        "against": settings["against"],
        "evaluation_images": len(index.keys),
        "evaluation_skipped": [{"key": k, "reason": r} for k, r in eval_skipped],
        "input_samples": sum(e["samples"] for e in per_shard.values()),
        "kept": sum(sizes.values()),
        "removed": totals,
        "shards": per_shard,
        "picture": str(out / PICTURE_FILE),
    }
    write_json(out / REPORT_FILE, report)  # no timings in it: one run and parts + merge give the same bytes
    return report | {"seconds": round(time.time() - started, 1)}


@dataclass
class Config(PartKeys, DedupConfig):
    """`wsl dedup`: drop pretraining samples that copy evaluation images, byte duplicates and undecodable
    images. Writes the filtered shards (same names), sizes.json, dedup_report.json and dedup_matches.png;
    a killed run re-run finishes the job. In a job array each task scores its part of the shards (shard
    index mod parts), then one `merge=true` resolves byte duplicates across all and writes the output."""

    shards: str = option(REQUIRED, "pretraining shards: paths, a folder, {a..b} patterns, joined by ::")
    against: list[str] = option([], "evaluation sets: image folders (searched recursively) or shards")
    out: str = option(REQUIRED, "folder for the filtered shards and the report")
    workers: int = option(os.cpu_count() or 1, "shards processed at once", minimum=1)


def main(config: Config) -> str:
    if not config.against:
        raise WslError("config key 'against' is empty: name the evaluation sets, e.g. against=[data/val]")
    settings = DedupConfig(**{f.name: getattr(config, f.name) for f in fields(DedupConfig)})
    part = None if config.merge else this_part(config)
    report = run_dedup(
        config.shards, config.against, config.out, settings, workers=config.workers, part=part, merge=config.merge
    )
    if part is not None:
        return (
            f"part {part[0]} of {part[1]}: scored {report['shards']} shards ({report['images']} images, "
            f"{report['seconds']} s); when every part has finished: the same command with merge=true"
        )
    removed = report["removed"]
    return (
        f"kept {report['kept']} of {report['input_samples']} samples in {len(report['shards'])} shards in "
        f"{config.out}; removed {removed['copies']} copies of the {report['evaluation_images']} evaluation images, "
        f"{removed['exact_duplicates']} byte duplicates, {removed['corrupt']} undecodable images\n"
        f"report: {Path(config.out) / REPORT_FILE}; example matches: {report['picture']}"
    )
