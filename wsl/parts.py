"""One part of a stage's input for one task of a job array, and the merge of the parts.

At billions of images the data stages run as SLURM job arrays, as FAIR's pipelines ran under
submitit and img2dataset under Spark: `wsl shards|dedup|vocab|features ... part=I parts=N`
(or nothing, inside an array task: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT) does part I
of N. Parts are cut deterministically by input unit (a chunk of shard_size input samples, a
shard, a unit of images) round robin, never overlap, and each writes only its own outputs
through a rename, plus a record of what it did under `_parts/`. Then one `... merge=true`
writes what is global (sizes.json and stats.json, byte duplicates across parts and the
filtered shards, the vocabulary) from the records: the same bytes as one run over
everything. A killed part is simply run again.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from wsl.config import option
from wsl.errors import WslError
from wsl.files import write_json

PARTS_FOLDER = "_parts"


@dataclass
class PartKeys:
    """The keys every stage that can run in parts shares (a base of its `Config`)."""

    part: int | None = option(
        None, "this task's part, 0-based (null: SLURM_ARRAY_TASK_ID in a job array, else the whole input)", minimum=0
    )
    parts: int | None = option(None, "how many parts the input is cut into (null: SLURM_ARRAY_TASK_COUNT)", minimum=1)
    merge: bool = option(False, "write what is global from the finished parts' records (after every part)")


def this_part(keys: PartKeys) -> tuple[int, int] | None:
    """(part, parts) from the config, else from a SLURM job array, else None (the whole input)."""
    part, parts = keys.part, keys.parts
    if part is None and parts is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        part = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first
        parts = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "0")) or None
        if parts is None:
            raise WslError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: give part=I parts=N")
    if part is None and parts is None:
        return None
    if part is None or parts is None:
        raise WslError(f"give both part and parts (got part={part}, parts={parts})")
    if not 0 <= part < parts:
        raise WslError(f"part {part} is not one of the {parts} parts (0 to {parts - 1})")
    return part, parts


def record_path(folder: str | Path, name: str, part: int, parts: int) -> Path:
    return Path(folder) / PARTS_FOLDER / f"{name}-{part:05d}-of-{parts:05d}.json"


def write_record(folder: str | Path, name: str, part: int, parts: int, record: dict) -> Path:
    """What part `part` did, written last (through a rename): its presence means the part finished."""
    path = record_path(folder, name, part, parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, record | {"part": part, "parts": parts})


def read_records(folder: str | Path, name: str) -> list[dict]:
    """Every part's record, in part order; a one-line error naming the parts not finished."""
    pattern = re.compile(rf"^{re.escape(name)}-(\d{{5}})-of-(\d{{5}})\.json$")
    found: dict[int, set[int]] = {}
    for path in sorted((Path(folder) / PARTS_FOLDER).glob(f"{name}-*-of-*.json")):
        if match := pattern.match(path.name):
            found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if not found:
        raise WslError(f"no finished parts in {Path(folder) / PARTS_FOLDER}: run the parts (part=I parts=N) first")
    if len(found) > 1:
        raise WslError(
            f"{Path(folder) / PARTS_FOLDER} holds parts of runs cut {sorted(found)} ways: remove the stale ones"
        )
    parts, done = next(iter(found.items()))
    missing = sorted(set(range(parts)) - done)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + ("..." if len(missing) > 10 else "")
        raise WslError(f"{len(missing)} of {parts} parts have not finished (part {shown}): run them, then merge")
    return [json.loads(record_path(folder, name, part, parts).read_text()) for part in range(parts)]
