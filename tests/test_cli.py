"""The `wsl` command as a user runs it: bad input is one clear line and exit status 2."""

import collections
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hashtag_shards

from wsl.data.vocab import build_vocab

WSL = str(Path(sys.executable).parent / "wsl")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([WSL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_missing_annotation_file_or_image_folder_is_one_line(tmp_path):
    assert_one_line_error(
        run("shards", f"jsonl={tmp_path / 'nope.jsonl'}", f"out={tmp_path / 'o'}"), "annotation file not found"
    )
    (tmp_path / "a.jsonl").write_text("")
    assert_one_line_error(
        run("shards", f"jsonl={tmp_path / 'a.jsonl'}", f"images_root={tmp_path / 'imgs'}", f"out={tmp_path / 'o'}"),
        "image folder not found",
    )


def test_empty_shard_list_is_one_line(tmp_path):
    out = f"out={tmp_path / 'v.json'}"
    assert_one_line_error(run("vocab", f"shards={tmp_path}", out), "no .tar shards in directory")
    assert_one_line_error(run("vocab", "shards=''", out), "empty shard list")
    assert_one_line_error(run("vocab", f"shards={tmp_path / 's-{0..3}.tar'}", out), "shard not found")


def test_unknown_config_key_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("shard_size: 10\nshard_sise: 20\n")
    assert_one_line_error(
        run("shards", "--config", str(tmp_path / "c.yaml"), "out=x"), "unknown config key 'shard_sise'"
    )


def test_vocabulary_that_does_not_match_the_shards_is_one_line(tmp_path):
    hashtag_shards(tmp_path / "shards", [["cat"], ["dog"]] * 4, per_shard=4)
    build_vocab(collections.Counter({"zebra": 3})).save(tmp_path / "vocab.json")
    result = run("check-data", f"shards={tmp_path / 'shards'}", f"vocab={tmp_path / 'vocab.json'}")
    assert_one_line_error(result, "does not match the shards")
    assert_one_line_error(
        run("check-data", f"shards={tmp_path / 'shards'}", f"vocab={tmp_path / 'none.json'}"),
        "vocabulary file not found",
    )


@pytest.mark.slow
def test_shards_vocab_and_check_data_run_end_to_end_from_the_command_line(demo, tmp_path):
    out = tmp_path / "shards"
    annotations = demo["summary"]["annotations"]
    result = run("shards", f"jsonl={annotations}", f"out={out}", "prefix=p", "shard_size=250", "workers=2")
    assert result.returncode == 0, result.stderr
    assert "wrote 600 samples in 3 shards" in result.stdout
    assert "skipped images/broken/error_page.jpg: not an image" in result.stdout
    assert "annotations.jsonl" in result.stdout and "annotation line is not JSON" in result.stdout
    synonyms = demo["summary"]["synonyms"]
    result = run("vocab", f"shards={out}", f"synonyms={synonyms}", f"out={out / 'vocab.json'}", "min_count=5")
    assert result.returncode == 0 and "most frequent: #" in result.stdout and "#circle (" in result.stdout, (
        result.stderr
    )
    result = run(
        "check-data",
        f"shards={out}",
        f"vocab={out / 'vocab.json'}",
        "batches=3",
        "batch_size=8",
        "image_size=64",
        "workers=2",
    )
    assert result.returncode == 0 and "read 24 images" in result.stdout, result.stderr
