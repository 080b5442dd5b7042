import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import hashtag_shards, jpeg_bytes, write_tar
from PIL import Image

from wsl.data.shards import (
    ResizeConfig,
    expand_shard_spec,
    read_input_shards,
    read_jsonl,
    read_shard_samples,
    shard_preparation,
    write_shards,
)
from wsl.errors import WslError


def test_demo_shards_hold_jpg_and_json_members(demo):
    shards = sorted(demo["shards"].glob("demo-*.tar"))
    assert len(shards) == 7  # 600 images + 5 broken lines -> 604 parseable entries, 100 a shard
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert {name.rsplit(".", 1)[1] for name in names} == {"jpg", "json"}
    assert names[0].endswith(".jpg") and names[1] == names[0].replace(".jpg", ".json")  # a sample's files adjacent


def test_broken_demo_files_are_reported_with_reasons_and_nothing_else_is_lost(demo):
    stats = demo["stats"]
    lines = demo["summary"]["annotations"]
    total_lines = sum(1 for line in open(lines) if line.strip())
    assert stats["samples"] == 600
    assert stats["samples"] + sum(stats["skipped"].values()) == total_lines
    assert stats["skipped"] == {
        "annotation line is not JSON": 1,
        "corrupt image": 1,
        "not an image": 1,
        "empty file": 1,
        "unreadable": 1,
    }
    reasons = {item["source"]: item["reason"] for item in stats["skipped_files"]}
    assert reasons["images/broken/truncated.jpg"].startswith("corrupt image: image file is truncated")
    sizes = json.loads((demo["shards"] / "sizes.json").read_text())
    assert sum(sizes.values()) == 600 and sizes == stats["shards"]


def test_shard_json_keeps_the_hashtags_as_typed_and_from_captions(demo):
    with tarfile.open(sorted(demo["shards"].glob("demo-*.tar"))[0]) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert all(isinstance(meta["hashtags"], list) for meta in metas)
    captioned = [m for m in metas if "caption" in m]
    assert captioned, "the demo has caption-only annotations"
    for meta in captioned:
        assert meta["hashtags"] == [w[1:] for w in meta["caption"].split() if w.startswith("#")]


def test_writing_the_same_input_twice_gives_byte_identical_shards(tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(7):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
        lines.append(json.dumps({"path": f"img/{i}.jpg", "hashtags": ["#Cat", "dog"]}))
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    for out in ("one", "two"):
        samples, problems = read_jsonl(tmp_path / "a.jsonl")
        write_shards(samples, tmp_path / out, prefix="x", shard_size=3, workers=2, input_problems=problems)
    one = sorted((tmp_path / "one").glob("x-*.tar"))
    assert [p.name for p in one] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert all(p.read_bytes() == (tmp_path / "two" / p.name).read_bytes() for p in one)
    assert not list((tmp_path / "one").glob("*.tmp"))


@pytest.mark.parametrize("mode", ["shorter", "longer"])
def test_resized_shards_keep_the_aspect_never_upscale_and_record_the_resize(tmp_path, mode):
    sizes = [(96, 64), (40, 120), (30, 20)]  # the last is smaller than the target: stored as it was
    (tmp_path / "img").mkdir()
    lines = []
    for i, (width, height) in enumerate(sizes):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(width, height, seed=i))
        lines.append(json.dumps({"path": f"img/{i}.jpg", "hashtags": ["cat"]}))
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    resize = ResizeConfig(mode=mode, size=32, quality=85)
    for out, workers in (("one", 1), ("two", 2)):
        write_shards(read_jsonl(tmp_path / "a.jsonl")[0], tmp_path / out, shard_size=2, workers=workers, resize=resize)
    stored = {s["__key__"]: s["jpg"] for s in read_shard_samples(expand_shard_spec(tmp_path / "one"))}
    got = [Image.open(io.BytesIO(stored[f"{i + 1:09d}"])).size for i in range(3)]
    expected = {"shorter": [(48, 32), (32, 96), (30, 20)], "longer": [(32, 21), (11, 32), (30, 20)]}[mode]
    assert got == expected
    assert stored["000000003"] == (tmp_path / "img" / "2.jpg").read_bytes()  # not upscaled, not re-encoded
    stats = json.loads((tmp_path / "one" / "stats.json").read_text())
    assert stats["resize"] == {"mode": mode, "size": 32, "quality": 85}
    assert shard_preparation(expand_shard_spec(tmp_path / "one")) == {str(tmp_path / "one"): stats["resize"]}
    one = sorted((tmp_path / "one").glob("*.tar"))
    assert all(p.read_bytes() == (tmp_path / "two" / p.name).read_bytes() for p in one)


def test_img2dataset_shards_are_resharded_with_hashtags_from_json_or_caption_text(tmp_path):
    image = jpeg_bytes()
    write_tar(
        tmp_path / "in-0.tar",
        [
            ("000.jpg", image),
            ("000.json", json.dumps({"caption": "at the #Beach", "url": "http://x"}).encode()),
            ("001.jpg", image),
            ("001.txt", b"my #cat and #dog"),
            ("002.jpg", image),
            ("002.json", json.dumps({"hashtags": ["sky"]}).encode()),
            ("002.pth", b"not read"),
            ("003.jpg", b"<html>error</html>"),
            ("003.txt", b"#broken"),
        ],
    )
    stats = write_shards(read_input_shards(str(tmp_path / "in-0.tar")), tmp_path / "out", prefix="p", shard_size=10)
    assert stats["samples"] == 3 and stats["skipped"] == {"not an image": 1}
    with tarfile.open(tmp_path / "out" / "p-000000.tar") as tar:
        metas = {m.name: json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")}
        names = tar.getnames()
    assert metas["000.json"]["hashtags"] == ["Beach"] and metas["000.json"]["url"] == "http://x"
    assert metas["001.json"]["hashtags"] == ["cat", "dog"]
    assert metas["002.json"]["hashtags"] == ["sky"]
    assert not any(n.endswith(".pth") for n in names)


def test_only_rank_0_stats_the_shards_of_a_pattern(tmp_path, monkeypatch):
    hashtag_shards(tmp_path, [["cat"]] * 4, per_shard=2)  # s-000000.tar, s-000001.tar
    pattern = str(tmp_path / "s-{000000..000002}.tar")  # the third is missing
    stats = []
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: stats.append(self) or is_file(self))
    monkeypatch.setenv("WORLD_SIZE", "336")
    monkeypatch.setenv("RANK", "7")
    assert len(expand_shard_spec(pattern)) == 3 and stats == [], "rank 7 lists the pattern without a metadata call"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(WslError, match="shard not found: .*s-000002.tar"):
        expand_shard_spec(pattern)
    assert len(stats) == 3
