"""The shard format, in one place: how samples are written to and read from tar shards.

A shard is `<prefix>-%06d.tar` (WebDataset layout): per sample `KEY.jpg` (the original
JPEG bytes, or with `resize` the image already resized as img2dataset does; other image
formats are re-encoded to JPEG once) and `KEY.json` (`{"hashtags": [...as typed...],
"source": ..., ...}`). Beside the shards: `sizes.json` (shard name -> sample count, OpenCLIP's
convention) and `stats.json` (samples per shard, hashtag counts, files skipped and why, the
resize applied).

Readers only ever decode the image and JSON/text members (`is_sample_member`):
nothing in a shard is unpickled, whatever its extension.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import io
import json
import multiprocessing
import os
import signal
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import braceexpand
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from wsl.config import REQUIRED, option, section
from wsl.data.hashtags import canonical_tag, extract_hashtags
from wsl.distributed import distributed_rank
from wsl.errors import WslError
from wsl.files import write_atomic, write_json
from wsl.parts import PartKeys, read_records, this_part, write_record

FORMAT_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("json", "txt", "cls")
SIZES_FILE = "sizes.json"
STATS_FILE = "stats.json"
# Fixed tar member mtime, so the same input always gives byte-identical shards.
TAR_MTIME = 1_500_000_000
_MAX_EXAMPLES = 1000  # skipped files listed by name in stats.json


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def is_sample_member(name: str) -> bool:
    """The tar members a reader may decode: images and JSON/text. Everything else is skipped unread."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS + TEXT_EXTENSIONS


def is_meta_member(name: str) -> bool:
    """The members that hold a sample's hashtags: what counting reads, skipping the images."""
    return name.rsplit(".", 1)[-1].lower() in ("json", "txt")


def sample_image_bytes(sample: dict) -> bytes:
    """The image member of a sample read from a shard (any of the image extensions)."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} has no image member")


def sample_hashtags(sample: dict) -> list[str]:
    """The hashtags of a sample, as typed: the JSON's `hashtags`, else hashtags in its caption."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta.get("hashtags"), list):
            return [str(t) for t in meta["hashtags"]]
        if isinstance(meta.get("caption"), str):
            return extract_hashtags(meta["caption"])
    if "txt" in sample:
        return extract_hashtags(sample["txt"].decode("utf-8", errors="replace"))
    return []


def read_shard_samples(urls: list[str], members=is_sample_member, handler=None) -> wds.DataPipeline:
    """The samples of shards, in order: only the members `members(name)` accepts are read;
    `handler` (webdataset's) decides what a read error does (default: raise)."""
    kwargs = {"handler": handler} if handler is not None else {}
    return wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(select_files=members, **kwargs))


def expand_shard_spec(spec: str | Path | Iterable[str | Path], check_exists: bool | None = None) -> list[str]:
    """Shard URLs from paths, directories (their *.tar), brace patterns or remote URLs.

    Several specs may be joined with '::' (webdataset's convention). Local paths must exist:
    checked by rank 0 only (`check_exists=None`), so that 336 ranks do not each stat 188k
    shards on a shared filesystem at start-up; rank 0's error stops the job.
    """
    if check_exists is None:
        check_exists = distributed_rank()[0] == 0
    if isinstance(spec, (str, Path)):
        specs = [s for s in str(spec).split("::") if s]
    else:
        specs = [str(s) for s in spec]
    urls: list[str] = []
    for item in specs:
        if "://" in item or item.startswith("pipe:"):
            urls += braceexpand.braceexpand(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise WslError(f"no .tar shards in directory {path}")
            urls += found
            continue
        for expanded in braceexpand.braceexpand(item):
            if check_exists and not Path(expanded).is_file():
                raise WslError(f"shard not found: {expanded}")
            urls.append(expanded)
    if not urls:
        raise WslError(f"empty shard list: {spec!r}")
    return urls


def read_sizes(urls: list[str]) -> dict[str, int] | None:
    """Sample counts of local shards from the `sizes.json` beside them; None if any is unknown."""
    sizes: dict[str, int] = {}
    cache: dict[Path, dict[str, int]] = {}
    for url in urls:
        path = Path(url)
        if "://" in url or url.startswith("pipe:"):
            return None
        sizes_file = path.parent / SIZES_FILE
        if sizes_file not in cache:
            if not sizes_file.is_file():
                return None
            cache[sizes_file] = json.loads(sizes_file.read_text())
        if path.name not in cache[sizes_file]:
            return None
        sizes[url] = int(cache[sizes_file][path.name])
    return sizes


def shard_preparation(urls: list[str]) -> dict[str, dict | None]:
    """How each folder of `urls` was written: its `stats.json`'s resize (mode, size, JPEG
    quality), {"mode": "none"} for shards written before resizing existed, None for a folder
    without stats.json (shards from elsewhere, remote URLs). A run records it in its config."""
    folders = dict.fromkeys(str(Path(url).parent) for url in urls if "://" not in url and not url.startswith("pipe:"))
    preparation: dict[str, dict | None] = {}
    for folder in folders:
        stats_file = Path(folder) / STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
        preparation[folder] = None if stats is None else stats.get("resize", {"mode": "none"})
    return preparation


# ---------------------------------------------------------------------------- writing


@dataclass
class SourceSample:
    """One input sample before validation: either a file path or bytes already read."""

    key: str
    meta: dict
    path: str | None = None
    image: bytes | None = None
    source: str = ""


@dataclass
class ShardResult:
    name: str
    samples: int
    hashtag_counts: collections.Counter = field(default_factory=collections.Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)


@dataclass
class ResizeConfig:
    """The `resize:` section: store images already resized, as large runs do (img2dataset's
    resize modes; SWAG's and OpenCLIP's data): decoding a 320 px JPEG costs a fraction of an
    800-1600 px one, and the training crops come from the stored image."""

    mode: str = option(
        "none",
        "none: the original bytes; shorter / longer: that side to `size`, aspect kept, never upscaled",
        choices=("none", "shorter", "longer"),
    )
    size: int = option(320, "the resized side in pixels", minimum=16)
    quality: int = option(
        90, "JPEG quality of resized images", minimum=1, check=lambda v: None if v <= 100 else "at most 100"
    )


def _resized_size(width: int, height: int, resize: ResizeConfig) -> tuple[int, int] | None:
    """The stored size of a width x height image, or None when it is kept as it is."""
    side = min(width, height) if resize.mode == "shorter" else max(width, height)
    if resize.mode == "none" or side <= resize.size:
        return None
    scale = resize.size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _checked_jpeg(data: bytes, resize: ResizeConfig | None = None) -> tuple[bytes, str | None]:
    """(JPEG bytes, None) for a good image, resized as `resize` says, or (b"", reason) for a broken one.

    Decoding in draft mode (at 1/8 scale, or at the smallest scale still at least the resized
    size) reads every byte of the entropy-coded data, so a truncated file is caught at a
    fraction of the cost of a full decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
                target = _resized_size(*image.size, resize) if resize else None
                image.draft("RGB", target or (64, 64))
                image.load()
                if target is not None:
                    resized = image.convert("RGB").resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
                    return _encode_jpeg(resized, resize.quality), None
                if image_format == "JPEG":
                    return data, None
                return _encode_jpeg(image, 95), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        return b"", f"decompression bomb: {exn}"
    except Image.UnidentifiedImageError:
        return b"", "not an image"
    except (OSError, SyntaxError, ValueError) as exn:
        return b"", f"corrupt image: {exn}"


def _write_one_shard(path: Path, samples: list[SourceSample], resize: ResizeConfig | None = None) -> ShardResult:
    """Validate (and resize) and write one shard to a temporary name, then rename it into place."""
    result = ShardResult(name=path.name, samples=0)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for sample in samples:
                source = sample.source or sample.path or sample.key
                if sample.image is None:
                    try:
                        data = Path(sample.path).read_bytes()
                    except OSError as exn:
                        result.skipped.append((source, f"unreadable: {exn.strerror or exn}"))
                        continue
                else:
                    data = sample.image
                if not data:
                    result.skipped.append((source, "empty file"))
                    continue
                jpeg, reason = _checked_jpeg(data, resize)
                if reason:
                    result.skipped.append((source, reason))
                    continue
                tags = [str(t) for t in sample.meta.get("hashtags", [])]
                writer.write(
                    {"__key__": sample.key, "jpg": jpeg, "json": json.dumps(sample.meta, ensure_ascii=False).encode()}
                )
                result.samples += 1
                result.hashtag_counts.update({canonical_tag(t) for t in tags} - {""})

    write_atomic(path, write)
    return result


def _sample_meta(record: dict) -> dict:
    """The JSON stored with a sample: `hashtags` as typed, plus the input's other fields."""
    meta = {k: v for k, v in record.items() if k not in ("path", "hashtags")}
    if isinstance(record.get("hashtags"), list):
        meta["hashtags"] = [str(t).lstrip("#＃") for t in record["hashtags"]]
    elif isinstance(record.get("caption"), str):
        meta["hashtags"] = extract_hashtags(record["caption"])
    else:
        meta["hashtags"] = []
    return meta


def read_jsonl(jsonl: Path, images_root: Path | None = None) -> tuple[Iterator[SourceSample], list[tuple[str, str]]]:
    """Samples of a JSONL annotation file (`{"path", "hashtags"}` or `{"path", "caption"}`).

    Lines that are not JSON objects with a `path` are skipped and recorded in the returned
    list (filled while the iterator runs), never fatal.
    """
    if not jsonl.is_file():
        raise WslError(f"annotation file not found: {jsonl}")
    root = images_root or jsonl.parent
    if not root.is_dir():
        raise WslError(f"image folder not found: {root}")
    bad_lines: list[tuple[str, str]] = []

    def samples() -> Iterator[SourceSample]:
        with open(jsonl, encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{jsonl}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    bad_lines.append((where, "annotation line is not JSON"))
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                    bad_lines.append((where, "annotation line has no 'path'"))
                    continue
                path = root / record["path"]
                yield SourceSample(
                    key=f"{line_no:09d}", meta=_sample_meta(record), path=str(path), source=record["path"]
                )

    return samples(), bad_lines


def read_input_shards(spec: str) -> Iterator[SourceSample]:
    """Samples of img2dataset-style shards (`key.jpg` + `key.json` and/or `key.txt`)."""
    urls = expand_shard_spec(spec)
    for sample in read_shard_samples(urls):
        record = json.loads(sample["json"]) if "json" in sample else {}
        if "hashtags" not in record and "caption" not in record and "txt" in sample:
            record["caption"] = sample["txt"].decode("utf-8", errors="replace")
        key = sample["__key__"].replace(".", "_").replace("/", "_")
        source = f"{sample['__url__']}:{sample['__key__']}"
        try:
            image = sample_image_bytes(sample)
        except ValueError:
            image = b""
        yield SourceSample(key=key, meta=_sample_meta(record), image=image, source=source)


def _chunks(samples: Iterable[SourceSample], size: int) -> Iterator[list[SourceSample]]:
    chunk: list[SourceSample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(
    samples: Iterable[SourceSample],
    out_dir: Path,
    *,
    prefix: str = "shard",
    shard_size: int = 1000,
    workers: int = 1,
    input_problems: list[tuple[str, str]] | None = None,
    resize: ResizeConfig | None = None,
    part: tuple[int, int] | None = None,
) -> dict:
    """Write `samples` into shards of at most `shard_size` samples, `workers` shards at a time,
    images resized as `resize` says (default: the original bytes).

    Broken images are skipped with a reason (a shard holds `shard_size` minus its skips).
    Returns the stats dict, also written to `stats.json`; `sizes.json` lists every shard.
    With `part` = (I, N) only the shards whose index is I mod N are written, and a record of
    them instead of sizes.json / stats.json: `merge_shard_parts` writes those from every part's.
    """
    if shard_size < 1:
        raise WslError(f"shard_size must be at least 1, got {shard_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if part is None:
        for stale in [*out_dir.glob(f"{prefix}-*.tar"), *out_dir.glob(f".{prefix}-*.tmp")]:
            stale.unlink()  # a previous run's shards (or .tmp leftovers of a killed one)
    started = time.time()
    results: list[ShardResult] = []
    in_flight: dict[cf.Future, int] = {}
    chunks = 0
    desc = f"writing shards to {out_dir}" + (f" (part {part[0]} of {part[1]})" if part else "")
    progress = tqdm(desc=desc, unit=" shards", dynamic_ncols=True)
    with cf.ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, chunk in enumerate(_chunks(samples, shard_size)):
            chunks = index + 1
            if part is not None and index % part[1] != part[0]:
                continue  # another part's shard
            in_flight[pool.submit(_write_one_shard, out_dir / shard_name(prefix, index), chunk, resize)] = index
            while len(in_flight) >= 2 * max(1, workers):
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    in_flight.pop(future)
                    results.append(future.result())
                    progress.update()
                    _fault_injection(len(results))
        for future in cf.as_completed(in_flight):
            results.append(future.result())
            progress.update()
            _fault_injection(len(results))
    progress.close()
    resize_record = asdict(resize) if resize and resize.mode != "none" else {"mode": "none"}
    problems = list(input_problems or [])
    if part is not None:
        record = {
            "prefix": prefix,
            "chunks": chunks,
            "resize": resize_record,
            "input_problems": problems,
            "shards": [
                {"name": r.name, "samples": r.samples, "hashtag_counts": dict(r.hashtag_counts), "skipped": r.skipped}
                for r in sorted(results, key=lambda r: r.name)
            ],
        }
        write_record(out_dir, "shards", *part, record)
        written = sum(r.samples for r in results)
        return {"samples": written, "shards": {r.name: r.samples for r in results}, "part": part}
    stats = _write_summary(out_dir, results, problems, resize_record)
    print(f"{stats['samples']} samples in {len(stats['shards'])} shards, {time.time() - started:.1f} s")
    return stats


def _fault_injection(shards_done: int) -> None:
    """WSL_KILL_AFTER_SHARDS=N: SIGKILL this process and its shard writers once N shards are
    written, as a cluster kills a task, so a test knows where a killed part died (never set it otherwise)."""
    if os.environ.get("WSL_KILL_AFTER_SHARDS") == str(shards_done):
        for child in multiprocessing.active_children():
            child.kill()
        os.kill(os.getpid(), signal.SIGKILL)


def _write_summary(
    out_dir: Path, results: list[ShardResult], problems: list[tuple[str, str]], resize_record: dict
) -> dict:
    """sizes.json and stats.json of a whole set of shards (one run's, or every part's)."""
    results = sorted(results, key=lambda r: r.name)
    skipped = problems + [tuple(s) for r in results for s in r.skipped]
    counts: collections.Counter = collections.Counter()
    for r in results:
        counts.update(r.hashtag_counts)
    sizes = {r.name: r.samples for r in results}
    stats = {
        "format_version": FORMAT_VERSION,
        "samples": sum(sizes.values()),
        "shards": sizes,
        "skipped": dict(collections.Counter(reason.split(":")[0] for _, reason in skipped)),
        "skipped_files": [{"source": s, "reason": r} for s, r in skipped[:_MAX_EXAMPLES]],
        "distinct_hashtags": len(counts),
        "top_hashtags": dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:1000]),  # ties by name
        "resize": resize_record,
    }
    write_json(out_dir / SIZES_FILE, sizes)  # through a rename, as every shard is
    write_json(out_dir / STATS_FILE, stats)
    if not sizes:
        raise WslError("no input samples: nothing was written")
    return stats


def merge_shard_parts(out_dir: Path) -> dict:
    """sizes.json and stats.json from every part's record (the same bytes as one run's);
    shards of an earlier run that no part wrote are removed."""
    records = read_records(out_dir, "shards")
    chunks = {record["chunks"] for record in records}
    prefixes = {record["prefix"] for record in records}
    if len(chunks) != 1 or len(prefixes) != 1:
        raise WslError(f"the parts in {out_dir} were cut from different inputs or prefixes: run them again")
    results = [
        ShardResult(r["name"], r["samples"], collections.Counter(r["hashtag_counts"]), [tuple(s) for s in r["skipped"]])
        for record in records
        for r in record["shards"]
    ]
    prefix = prefixes.pop()
    expected = {shard_name(prefix, index) for index in range(chunks.pop())}
    if {r.name for r in results} != expected:
        raise WslError(f"the parts in {out_dir} do not cover the input's shards: run them again")
    for stale in [*out_dir.glob(f"{prefix}-*.tar"), *out_dir.glob(f".{prefix}-*.tmp")]:
        if stale.name not in expected:
            stale.unlink()
    problems = [tuple(p) for p in records[0]["input_problems"]]  # every part read every input line
    return _write_summary(out_dir, results, problems, records[0]["resize"])


@dataclass
class Config(PartKeys):
    """`wsl shards`: write images + hashtags into WebDataset tar shards (give jsonl or input_shards).
    In a job array each task writes the shards of its part (shard index mod parts), then one
    `merge=true` writes sizes.json and stats.json: the same bytes as one run."""

    jsonl: str | None = option(None, 'annotations, one {"path", "hashtags"} or {"path", "caption"} a line')
    images_root: str | None = option(None, "folder the JSONL paths are relative to (null: the JSONL's folder)")
    input_shards: str | None = option(
        None, "img2dataset-style shards (key.jpg + key.json/key.txt): paths, dirs, {a..b}"
    )
    out: str = option(REQUIRED, "output folder")
    prefix: str = option("shard", "shard names are PREFIX-NNNNNN.tar")
    shard_size: int = option(1000, "samples a shard (5,000-10,000 at scale: ~0.5-1 GB shards)", minimum=1)
    workers: int = option(os.cpu_count() or 1, "shards written at once", minimum=1)
    resize: ResizeConfig = section(ResizeConfig, "images stored already resized (img2dataset's resize modes)")


def main(config: Config) -> str:
    if config.merge:
        stats = merge_shard_parts(Path(config.out))
        return f"merged the parts: {stats['samples']} samples in {len(stats['shards'])} shards in {config.out}"
    if bool(config.jsonl) == bool(config.input_shards):
        raise WslError("give exactly one input: jsonl=FILE or input_shards=SPEC")
    part = this_part(config)
    problems: list[tuple[str, str]] = []
    if config.jsonl:
        root = Path(config.images_root) if config.images_root else None
        samples, problems = read_jsonl(Path(config.jsonl), root)
    else:
        samples = read_input_shards(config.input_shards)
    stats = write_shards(
        samples,
        Path(config.out),
        prefix=config.prefix,
        shard_size=config.shard_size,
        workers=config.workers,
        input_problems=problems,
        resize=config.resize,
        part=part,
    )
    if part is not None:
        return (
            f"part {part[0]} of {part[1]}: wrote {stats['samples']} samples in {len(stats['shards'])} shards to "
            f"{config.out}; when every part has finished: wsl shards out={config.out} merge=true"
        )
    skipped = sum(stats["skipped"].values())
    lines = [
        f"wrote {stats['samples']} samples in {len(stats['shards'])} shards to {config.out} "
        f"({config.prefix}-NNNNNN.tar; sizes.json, stats.json)",
        f"skipped {skipped} input(s): " + (json.dumps(stats["skipped"]) if skipped else "none"),
    ]
    lines += [f"  skipped {item['source']}: {item['reason']}" for item in stats["skipped_files"][:10]]
    if config.resize.mode != "none":
        resize = config.resize
        lines.append(f"images resized: {resize.mode} side to {resize.size} px, JPEG quality {resize.quality}")
    return "\n".join(lines)
