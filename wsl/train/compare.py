"""`wsl compare`: the val metrics of finished runs, side by side (from their result.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wsl.config import option
from wsl.errors import WslError


@dataclass
class Config:
    """`wsl compare`: the val metrics of finished runs, side by side."""

    runs: list[str] = option([], "run directories holding result.json, e.g. runs=[runs/a,runs/b]")


def main(config: Config) -> str:
    if not config.runs:
        raise WslError("config key 'runs' is empty: e.g. runs=[runs/a,runs/b]")
    results = {}
    for run_dir in config.runs:
        path = Path(run_dir) / "result.json"
        if not path.is_file():
            raise WslError(f"no result.json in {run_dir}: has the run finished?")
        results[run_dir] = json.loads(path.read_text())["metrics"]
    names = sorted({k for metrics in results.values() for k in metrics if k.startswith("val/")})
    width = max(len(r) for r in results)
    lines = [f"{'run':<{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for run_dir, metrics in results.items():
        cells = [f"{metrics[n]:>12.4f}" if n in metrics else f"{'-':>12}" for n in names]
        lines.append(f"{run_dir:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
