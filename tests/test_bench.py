"""The benchmarks that a test can run at a small size: they run, print their table and its
headline, and measure in the same run what they compare against."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wsl.data.copies import EDITS

BENCH = Path(__file__).parent.parent / "pipelines" / "bench"


def test_the_training_step_benchmark_reports_each_mode_against_a_matrix_product_measured_in_the_same_run():
    script = BENCH / "train.py"
    args = ["--image-size", "32", "--batch-size", "2", "--classes", "10", "--steps", "2", "--warmup", "1"]
    result = subprocess.run(
        [sys.executable, str(script), *args, "--modes", "eager,channels_last"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("eager", "channels_last")}
    assert set(rows) == {"eager", "channels_last"} and all(float(row[1]) > 0 for row in rows.values())
    assert re.fullmatch(
        r"best \((eager|channels_last)\): \d+\.\d% of the matrix-product rate; \d+\.\d\dx eager", lines[-1]
    )
    bad = subprocess.run([sys.executable, str(script), "--model", "resnet50"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--model: a registry model name" in bad.stderr


def test_the_scale_benchmark_fits_each_stages_growth_and_extrapolates_to_the_papers_sizes(tmp_path):
    stages = "vocab,probe"
    result = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--quick", "--stages", stages, "--work", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "scale.json").read_text())
    assert [row["stage"] for row in rows] == stages.split(",")
    for row in rows:
        assert len(row["sizes"]) == 3 and row["sizes"][-1] >= 10 * row["sizes"][0]
        assert all(s > 0 for s in row["seconds"]) and all(m > 0 for m in row["peak_mib"])
        assert row["core_hours"] > 0 and row["paper_gb"] > 0
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("resnext101_32x48d", 2) for line in lines)  # release sizes per width
    assert lines[-1].startswith("headline: costliest at the paper's size: ")


NON_COPIES = ("non-copies: demo images", "non-copies: photo crops")
ROWS = ("demo: planted copies", *NON_COPIES)


@pytest.mark.slow
def test_the_dedup_benchmark_prints_a_row_per_edit_finds_simple_copies_and_ends_on_the_decode_ratio(tmp_path):
    sizes = ["--eval-images", "8", "--copies", "1", "--others", "12", "--per-edit-demo", "1", "--photo-others", "6"]
    result = subprocess.run(
        [sys.executable, str(BENCH / "dedup.py"), "--out", str(tmp_path), *sizes], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    header = next(line.split() for line in lines if line.split()[:2] == ["row", "n"])
    at_default = header.index("0.77") - 1  # a row's values start after its name, the header's after "row"
    rows = {line[:26].strip(): line[26:].split() for line in lines if line[:26].strip() in {*ROWS, *EDITS}}
    assert set(rows) == {*ROWS, *EDITS}
    assert rows["resize+jpeg35"][at_default] == "100.0%" and rows["resize+jpeg35"][-1] == "9/9"
    assert all(rows[row][at_default] == "0.00%" for row in NON_COPIES)
    assert any(line.startswith("plain full decode of the same 196 images") for line in lines)
    assert re.fullmatch(r"de-duplication rate / plain full decode rate: \d+\.\d%", lines[-1])
