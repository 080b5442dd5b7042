"""The data stages in parts, as the tasks of a job array: three local processes, one of them
killed and run again, then the merge, give the same bytes as one run over everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import jpeg_bytes, write_tar

from wsl.data.demo import planted_duplicates
from wsl.dedup.run import REPORT_FILE
from wsl.errors import WslError
from wsl.parts import PartKeys, this_part

WSL = str(Path(sys.executable).parent / "wsl")


def _parts(*args: str, parts: int = 3, env: dict | None = None) -> list[subprocess.Popen]:
    """`wsl ARGS part=I parts=3` for every I, at the same time."""
    return [
        subprocess.Popen(
            [WSL, *args, f"part={part}", f"parts={parts}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {}).get(part, {})},
        )
        for part in range(parts)
    ]


def _finished(processes: list[subprocess.Popen]) -> list[int]:
    return [process.wait(timeout=300) for process in processes]


def _wsl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([WSL, *args], capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in (".tar", ".json")}


@pytest.mark.slow
def test_shards_in_three_parts_one_killed_and_rerun_then_merged_equal_one_run(demo, tmp_path):
    out = tmp_path / "shards"
    args = ["shards", f"jsonl={demo['summary']['annotations']}", f"out={out}", "prefix=demo", "shard_size=100"]
    killed = {1: {"WSL_KILL_AFTER_SHARDS": "1"}}  # part 1 dies right after its first of three shards
    codes = _finished(_parts(*args, "workers=1", env=killed))
    assert codes[0] == codes[2] == 0 and codes[1] == -signal.SIGKILL
    early = _wsl("shards", f"out={out}", "merge=true")
    assert early.returncode == 2 and "1 of 3 parts have not finished (part 1)" in early.stderr
    rerun = _finished([subprocess.Popen([WSL, *args, "part=1", "parts=3", "workers=1"])])
    assert rerun == [0]
    merged = _wsl("shards", f"out={out}", "merge=true")
    assert merged.returncode == 0, merged.stderr
    one_run = {n: b for n, b in _files(demo["shards"]).items() if n != "vocab.json"}  # the fixture: one process
    assert _files(out) == one_run
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_vocab_counted_in_three_parts_then_merged_equals_one_run(demo, tmp_path):
    out = tmp_path / "vocab.json"
    args = ["vocab", f"shards={demo['shards']}", f"synonyms={demo['summary']['synonyms']}", "min_count=5"]
    first = _parts(*args, f"out={out}", "workers=1")
    first[2].send_signal(signal.SIGKILL)  # killed before it could finish its count
    assert _finished(first)[:2] == [0, 0]
    if first[2].returncode != 0:
        assert "part 2" in _wsl(*args, f"out={out}", "merge=true").stderr
        assert _finished([subprocess.Popen([WSL, *args, f"out={out}", "part=2", "parts=3"])]) == [0]
    merged = _wsl(*args, f"out={out}", "merge=true")
    assert merged.returncode == 0, merged.stderr
    one_run = _wsl(*args, f"out={tmp_path / 'one.json'}")
    assert one_run.returncode == 0, one_run.stderr
    assert out.read_bytes() == (tmp_path / "one.json").read_bytes()


@pytest.mark.slow
def test_features_in_three_parts_then_merged_equal_one_run(tmp_path):
    folder = tmp_path / "images"
    for c, (name, count) in enumerate({"a": 5, "b": 4}.items()):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            (folder / name / f"{name}_{i}.JPEG").write_bytes(jpeg_bytes(40, 36, seed=10 * c + i))
    args = ["features", f"source={folder}", "model=resnext14_8x4d", "image_size=32", "resize=36", "unit_size=2"]
    args += ["batch_size=2", "workers=0"]
    out = tmp_path / "parts"
    first = _parts(*args, f"out={out}")
    first[0].send_signal(signal.SIGKILL)
    assert _finished(first)[1:] == [0, 0]
    if first[0].returncode != 0:
        assert "part-000000.npz" in _wsl(*args, f"out={out}", "merge=true").stderr  # a unit is missing
        assert _finished([subprocess.Popen([WSL, *args, f"out={out}", "part=0", "parts=3"])]) == [0]
    merged = _wsl(*args, f"out={out}", "merge=true")
    assert merged.returncode == 0 and "every part is there: 9 features" in merged.stdout, merged.stderr
    assert _wsl(*args, f"out={tmp_path / 'one'}").returncode == 0
    one_run = {p.name: p.read_bytes() for p in sorted((tmp_path / "one").iterdir())}
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == one_run
    with np.load(out / "part-000004.npz") as last:
        assert last["features"].shape == (1, 2048)  # 9 images in units of 2


def test_the_part_comes_from_the_config_or_a_slurm_job_array_and_is_checked(monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert this_part(PartKeys()) is None and this_part(PartKeys(part=2, parts=3)) == (2, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert this_part(PartKeys()) == (4, 8)  # `--array=1-8`: task 5 is part 4
    assert this_part(PartKeys(part=0, parts=2)) == (0, 2)  # the config wins
    for keys, message in [(PartKeys(part=3, parts=3), "not one of the 3 parts"), (PartKeys(parts=3), "both")]:
        with pytest.raises(WslError, match=message):
            this_part(keys)


@pytest.mark.slow
def test_dedup_in_three_parts_one_killed_and_rerun_then_merged_equals_one_run(tmp_path):
    planted_duplicates(tmp_path / "data", num_eval=10, copies_per_image=1, num_others=50, shard_size=12)
    shards = tmp_path / "data" / "shards"
    samples = wds.WebDataset(str(shards / "pretrain-000000.tar"), shardshuffle=False)
    first = next(s for s in samples if s["__key__"].startswith("img"))  # not a planted copy
    write_tar(shards / "pretrain-000005.tar", [("dup.jpg", first["jpg"]), ("dup.json", b"{}")])  # part 2 copies part 0
    args = ["dedup", f"shards={shards}", f"against=[{tmp_path / 'data' / 'eval'}]", "workers=1"]
    out = tmp_path / "parts"
    started = _parts(*args, f"out={out}")
    started[1].send_signal(signal.SIGKILL)  # killed before it could score its shards
    assert [started[0].wait(timeout=300), started[2].wait(timeout=300)] == [0, 0]
    if started[1].wait() != 0:
        early = _wsl(*args, f"out={out}", "merge=true")
        assert early.returncode == 2 and "(part 1)" in early.stderr, early.stderr
        assert _finished([subprocess.Popen([WSL, *args, f"out={out}", "part=1", "parts=3"])]) == [0]
    merged = _wsl(*args, f"out={out}", "merge=true")
    assert merged.returncode == 0, merged.stderr
    one_run = _wsl(*args, f"out={tmp_path / 'one'}")
    assert one_run.returncode == 0, one_run.stderr
    report, one_report = (json.loads((folder / REPORT_FILE).read_text()) for folder in (out, tmp_path / "one"))
    assert report["shards"]["pretrain-000005.tar"]["exact_duplicates"][0]["same_as"].startswith("pretrain-000000")
    report.pop("picture"), one_report.pop("picture")  # the path of each run's own picture
    assert report == one_report

    def outputs(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".tar", ".png", ".json")}

    assert {n: b for n, b in outputs(out).items() if n != REPORT_FILE} == {
        n: b for n, b in outputs(tmp_path / "one").items() if n != REPORT_FILE
    }
    assert len(outputs(out)) == 9  # 6 shards, sizes.json, the report, the picture
