"""Evaluation: FAISS kNN and the weighted vote against independent references, the linear probe
against scikit-learn, exactly-once resumable feature extraction, the report, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors

from wsl.config import load
from wsl.data.demo import planted_duplicates
from wsl.data.transforms import EvalTransform
from wsl.dedup.run import REPORT_FILE, run_dedup
from wsl.errors import WslError
from wsl.eval.accounting import Accounting
from wsl.eval.evaluate import Config as EvalConfig
from wsl.eval.evaluate import augmented_probe_config, run_eval
from wsl.eval.features import extract_features, frozen_backbone, load_features
from wsl.eval.knn import knn_classify, l2_normalise, search, weighted_vote
from wsl.eval.linear_probe import linear_probe
from wsl.models import build_model

WSL = str(Path(sys.executable).parent / "wsl")
REPO = Path(__file__).parent.parent


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_faiss_neighbours_equal_scikit_learns_brute_force_cosine_neighbours(index):
    rng = np.random.default_rng(0)
    database, queries = rng.normal(size=(2000, 64)), rng.normal(size=(37, 64))
    # small blocks, so the exact search merges results over 5 database blocks and 2 query blocks
    options = {"database_block": 450, "query_block": 20} if index == "flat" else {"nlist": 16, "nprobe": 16}
    similarities, ids = search(l2_normalise(database), l2_normalise(queries), 20, index=index, **options)
    distances, expected = (
        NearestNeighbors(n_neighbors=20, metric="cosine", algorithm="brute").fit(database).kneighbors(queries)
    )
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(similarities, 1 - distances, atol=1e-5)


def test_weighted_vote_equals_a_plain_numpy_implementation_of_the_formula():
    rng = np.random.default_rng(1)
    similarities = np.sort(rng.uniform(-1, 1, (25, 10)), axis=1)[:, ::-1]
    labels = rng.integers(0, 7, (25, 10))
    expected = np.zeros((25, 7))
    for query in range(25):
        for neighbour in range(10):
            expected[query, labels[query, neighbour]] += np.exp(similarities[query, neighbour] / 0.07)
    np.testing.assert_allclose(weighted_vote(similarities, labels, 7, 0.07), expected, rtol=1e-12)


def test_knn_on_clustered_features_finds_the_clusters_and_skips_k_beyond_the_database():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 32)) * 3
    train_labels, val_labels = rng.integers(0, 4, 150), rng.integers(0, 4, 40)
    train, val = centres[train_labels] + rng.normal(size=(150, 32)), centres[val_labels] + rng.normal(size=(40, 32))
    results, ids = knn_classify(train, train_labels, val, val_labels, 4, ks=(10, 20, 200))
    assert set(results) == {10, 20} and ids.shape == (40, 20)
    assert results[20]["top1"] > 0.95 and results[20]["top5"] == 1.0


def test_ivf_neighbours_missing_from_the_probed_lists_cast_no_vote():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16)).astype(np.float32)
    train = np.repeat(centres, 3, axis=0) + 0.01 * rng.normal(size=(120, 16)).astype(np.float32)
    labels = np.repeat(np.arange(40) % 4, 3)
    queries = centres[:8] + 0.01 * rng.normal(size=(8, 16)).astype(np.float32)
    options = dict(index="ivf", nlist=3, nprobe=1)  # each query probes one list of ~40 vectors: k = 100 is not there
    results, ids = knn_classify(train, labels, queries, labels[::3][:8], 4, ks=(100,), **options)
    assert (ids == -1).any(), "the probed lists hold fewer than k vectors"
    similarities, same_ids = search(l2_normalise(train), l2_normalise(queries), 100, **options)
    found = same_ids >= 0
    expected = np.zeros((8, 4))
    for q in range(8):
        for s, i in zip(similarities[q][found[q]], same_ids[q][found[q]]):
            expected[q, labels[i]] += np.exp(s / 0.07)
    top1 = float((expected.argmax(1) == labels[::3][:8]).mean())
    assert results[100]["top1"] == top1 == 1.0


def test_linear_probe_is_within_one_point_of_scikit_learns_logistic_regression():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 40)) * 0.6  # nearly separable, but not so far apart that both are at 100%
    y_train, y_val = rng.integers(0, 5, 1000), rng.integers(0, 5, 1000)
    x_train, x_val = centres[y_train] + rng.normal(size=(1000, 40)), centres[y_val] + rng.normal(size=(1000, 40))
    ours = linear_probe(x_train, y_train, x_val, y_val, 5, epochs=60)
    reference = LogisticRegression(max_iter=2000).fit(x_train, y_train).score(x_val, y_val)
    assert 0.9 < reference < 0.995
    assert abs(ours["top1"] - reference) <= 0.01, (ours, reference)
    assert len(ours["holdout_top1"]) == 9 and ours["top5"] >= ours["top1"]


def _image_folder(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{name}_{i:03d}.JPEG").write_bytes(jpeg_bytes(40, 36, seed=100 * c + i))
    return root


def test_two_process_extraction_over_an_odd_number_of_images_writes_each_once_and_resumes(tmp_path):
    folder = _image_folder(tmp_path / "images", {"a": 6, "b": 4, "c": 3})  # 13 images
    out = tmp_path / "features"
    command = [
        WSL,
        "features",
        f"source={folder}",
        f"out={out}",
        "model=resnext14_8x4d",
        "image_size=32",
        "resize=36",
        "batch_size=2",
        "workers=1",
        "unit_size=2",
    ]
    ranks = [
        subprocess.Popen(
            command,
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for rank in ranks:
        _, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err[-2000:]
    features = load_features(out)
    assert sorted(features.keys) == sorted(
        f"{c}/{c}_{i:03d}" for c, n in {"a": 6, "b": 4, "c": 3}.items() for i in range(n)
    )
    assert features.features.shape == (13, 2048) and list(np.bincount(features.labels)) == [6, 4, 3]
    # a killed extraction: one part lost; the re-run writes only that part, identical to before
    parts = sorted(out.glob("part-*.npz"))
    assert len(parts) == 7
    kept = {p.name: p.stat().st_mtime_ns for p in parts[1:]}
    lost = np.load(parts[0])["features"].copy()
    parts[0].unlink()
    extract_features(
        str(folder),
        out,
        "resnext14_8x4d",
        None,
        image_size=32,
        resize=36,
        batch_size=2,
        num_workers=0,
        unit_size=2,
        rank=0,
        world_size=1,
        progress=False,
    )
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("part-*.npz"))[1:]} == kept
    np.testing.assert_array_equal(np.load(parts[0])["features"], lost)


def test_features_are_computed_in_float32_by_default_and_in_bfloat16_when_asked(tmp_path):
    folder = _image_folder(tmp_path / "images", {"a": 3})
    options = dict(image_size=32, resize=36, batch_size=3, num_workers=0, rank=0, world_size=1, progress=False)
    default = load_features(
        extract_features(str(folder), tmp_path / "f32", "resnext14_8x4d", None, dtype="float32", **options)
    )
    half = load_features(
        extract_features(
            str(folder), tmp_path / "bf16", "resnext14_8x4d", None, dtype="float32", precision="bfloat16", **options
        )
    )
    net, _ = frozen_backbone("resnext14_8x4d", None)
    images = torch.stack([EvalTransform(32, 36)((folder / "a" / f"a_{i:03d}.JPEG").read_bytes()) for i in range(3)])
    with torch.inference_mode():
        reference = net.forward_features(images).numpy()
    assert default.meta["precision"] == "float32" and half.meta["precision"] == "bfloat16"
    np.testing.assert_allclose(default.features, reference, rtol=1e-5, atol=1e-6)
    assert not np.allclose(half.features, reference, rtol=1e-5, atol=1e-6)
    assert load(EvalConfig, ["configs/eval/demo.yaml"]).features.precision == "float32"


def test_mixed_backbones_different_class_lists_and_an_empty_dataset_are_one_clear_error(tmp_path):
    folder = _image_folder(tmp_path / "images", {"a": 2, "b": 2})
    options = dict(
        image_size=32, resize=36, batch_size=2, num_workers=0, unit_size=2, rank=0, world_size=1, progress=False
    )
    weights = tmp_path / "other.pth"
    torch.save(build_model("resnext14_8x4d", 3).state_dict(), weights)
    random_init = extract_features(str(folder), tmp_path / "random", "resnext14_8x4d", None, **options)
    trained = extract_features(str(folder), tmp_path / "trained", "resnext14_8x4d", str(weights), **options)
    shutil.copy(trained / "part-000001.npz", random_init / "part-000001.npz")
    with pytest.raises(WslError, match="features from two backbones cannot be mixed"):
        load_features(random_init)
    other_classes = _image_folder(tmp_path / "other", {"a": 2, "z": 2})
    config = load(
        EvalConfig,
        [],
        [
            f"run_dir={tmp_path / 'eval'}",
            "model=resnext14_8x4d",
            "backbones={random: null}",
            f"data.train={folder}",
            f"data.val={other_classes}",
            "data.image_size=32",
            "data.resize=36",
            "data.num_workers=0",
            "wandb.mode=disabled",
        ],
    )
    with pytest.raises(WslError, match="classes of .* differ from training's"):
        run_eval(config)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    result = subprocess.run(
        [
            WSL,
            "features",
            f"source={tmp_path / 'empty'}",
            f"out={tmp_path / 'f'}",
            "model=resnext14_8x4d",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "wsl features: error: no images in" in result.stderr


@pytest.mark.slow
def test_a_command_line_override_of_one_backbone_keeps_the_configs_others():
    config = load(
        EvalConfig, ["configs/eval/demo.yaml"], ["backbones.hashtag-pretrained=other.ckpt", "backbones.extra=null"]
    )
    assert config.backbones == {"hashtag-pretrained": "other.ckpt", "random-init": None, "extra": None}


def test_eval_reports_both_backbones_with_json_picture_and_wandb_offline_run(demo, tmp_path):
    weights = tmp_path / "trained.pth"
    torch.save(build_model("resnext14_8x4d", 5).state_dict(), weights)
    downstream = demo["summary"]["downstream"]
    config = load(
        EvalConfig,
        ["configs/eval/demo.yaml"],
        [
            f"run_dir={tmp_path / 'eval'}",
            f"backbones.hashtag-pretrained={weights}",  # the config's other backbone, random-init, stays
            f"data.train={downstream}/train",
            f"data.val={downstream}/val",
            "data.image_size=32",
            "data.resize=36",
            "data.num_workers=0",
            "data.batch_size=8",
            "linear.epochs=5",
            "linear.lrs=[0.01]",
            "linear.augmented=true",
            "linear.augmented_epochs=1",
        ],
    )
    report = run_eval(config)
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(saved["results"]) == {"hashtag-pretrained", "random-init"}
    for result in saved["results"].values():
        assert result["train_images"] == 40 and result["val_images"] == 30
        assert set(result["knn"]) == {"10", "20"}  # k = 100, 200 exceed the 40 train images
        assert 0 <= result["linear"]["top1"] <= 1 and Path(result["picture"]).is_file()
        assert 0 <= result["linear"]["augmented"]["top1"] <= result["linear"]["augmented"]["top5"] <= 1
    assert saved["results"]["hashtag-pretrained"]["backbone"] != saved["results"]["random-init"]["backbone"]
    assert (
        "hashtag-pretrained" in report["table"]
        and "random-init" in report["table"]
        and "augm. linear top-1" in report["table"]
    )
    assert list((tmp_path / "eval").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(list((tmp_path / "eval").glob("wandb/offline-run-*/files/media/images/*/*.png"))) == 2  # the pictures


def test_the_augmented_probe_runs_on_one_device_whatever_the_host_has():
    config = load(EvalConfig, ["configs/eval/demo.yaml"], ["linear.augmented=true"])
    probe = augmented_probe_config("hashtag-pretrained", "x.ckpt", config)
    assert probe.trainer.devices == 1 and probe.trainer.num_nodes == 1 and probe.freeze_backbone
    assert probe.data.train == config.data.train and probe.run_dir.endswith("probe-hashtag-pretrained")


@pytest.mark.slow
def test_eval_counts_val_images_that_dedup_found_copied_in_pretraining_as_errors(tmp_path):
    planted_duplicates(tmp_path / "data", num_eval=20, copies_per_image=1, num_others=40, shard_size=30)
    originals = tmp_path / "data" / "eval"
    report = run_dedup(str(tmp_path / "data" / "shards"), [str(originals)], tmp_path / "dedup", workers=2)
    found = {c["match"].split("/", 1)[1] for shard in report["shards"].values() for c in shard["copies"]}
    assert len(found) >= 15, f"dedup found {len(found)} of the 20 planted copies"
    val = tmp_path / "val"  # the 20 originals, and 10 byte-equal images under new names that no report names
    shutil.copytree(originals, val)
    for path in sorted(originals.glob("*/*.JPEG"))[:10]:
        shutil.copy(path, val / path.parent.name / f"fresh_{path.name}")
    config = load(
        EvalConfig,
        [],
        [
            f"run_dir={tmp_path / 'eval'}",
            "model=resnext14_8x4d",
            "backbones={random-init: null}",
            f"dedup_reports=[{tmp_path / 'dedup' / REPORT_FILE}]",
            f"data.train={originals}",
            f"data.val={val}",
            "data.image_size=32",
            "data.resize=36",
            "data.num_workers=0",
            "knn.k=[1]",
            "linear.epochs=3",
            "wandb.mode=disabled",
        ],
    )
    report = run_eval(config)
    result = report["results"]["random-init"]
    knn, linear = result["knn"]["1"], result["linear"]
    assert knn["top1"] == 1.0  # every val image is, or equals, a train image: its own nearest neighbour
    assert knn["copied_in_pretraining"] == linear["copied_in_pretraining"] == len(found)
    assert knn["top1_lower_bound"] == pytest.approx((30 - len(found)) / 30)
    assert linear["top1_lower_bound"] <= min(linear["top1"], (30 - len(found)) / 30)
    assert f"random-init: lower-bound top-1 kNN k=1 {100 * (30 - len(found)) / 30:.1f}" in report["table"]
    assert "real_top1" not in knn  # the demo's classes are not ImageNet's


def test_accounting_leaves_out_val_images_without_real_labels_and_counts_reported_copies_wrong(tmp_path):
    from importlib.resources import files

    from timm.data import ImageNetInfo

    real = json.loads((files("timm.data") / "_info" / "imagenet_real_labels.json").read_text())
    labelled = [n for n in range(1, 50) if real[n - 1]][:3]
    empty = next(n for n in range(1, len(real) + 1) if not real[n - 1])  # a val image ReaL leaves out
    numbers = [*labelled, empty]
    keys = [f"n0/ILSVRC2012_val_{n:08d}" for n in numbers]
    first, second, third = (real[n - 1] for n in labelled)
    predicted = [first[0], (second[0] + 1) % 1000, third[0], 5]  # ReaL: the first and third right
    labels = [predicted[0], predicted[1], (predicted[2] + 1) % 1000, 5]  # plain top-1: the first, second, last right
    report = tmp_path / "dedup_report.json"
    report.write_text(json.dumps({"shards": {"a.tar": {"copies": [{"key": "k", "match": f"val/{keys[0]}"}]}}}))
    accounting = Accounting([str(report)], ImageNetInfo("imagenet-1k").label_names())
    rates = accounting(predicted, labels, keys)
    expected_real = sum(p in real[n - 1] for p, n in zip(predicted, labelled)) / 3  # the image ReaL leaves out: not
    assert rates["real_images"] == 3 and rates["real_top1"] == pytest.approx(expected_real)
    assert rates["copied_in_pretraining"] == 1 and rates["top1_lower_bound"] == pytest.approx(2 / 4)
    assert Accounting([], [f"c{i}" for i in range(1000)])(predicted, labels, keys) == {}  # not ImageNet, no reports
