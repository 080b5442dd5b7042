"""Files written so that nobody ever reads half of one: through a temporary name and a rename."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write `data` (text, bytes, or a function that writes the path it is given) to `path`
    through a temporary name in the same folder and a rename, so a reader (another rank, a
    re-run after a kill) sees the old file or the whole new one, never a half. The temporary
    name carries the process id: two processes writing the same file (parts of a job array
    building the same index) never write into one temporary file."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if callable(data):
        data(staging)
    elif isinstance(data, bytes):
        staging.write_bytes(data)
    else:
        staging.write_text(data)
    staging.replace(path)
    return path


def write_json(path: str | Path, payload: object) -> Path:
    """`payload` as indented JSON, atomically."""
    return write_atomic(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
