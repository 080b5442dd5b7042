"""Fine-tuning: the three ImageNet layouts, the one weights loader, a real run, DDP validation, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import jpeg_bytes, write_tar
from timm.data import ImageNetInfo

from wsl.config import load
from wsl.data.folders import LabelledImageFolder, collate_labelled
from wsl.data.transforms import TrainTransform
from wsl.errors import WslError
from wsl.models import build_model
from wsl.release.checkpoints import file_sha256, load_weights
from wsl.train.finetune import Config as FinetuneConfig
from wsl.train.finetune import FinetuneDataConfig, ImageClassifier, LabelledImages, run_finetuning
from wsl.train.pretrain import Config as PretrainConfig
from wsl.train.pretrain import run_pretraining

WSL = str(Path(sys.executable).parent / "wsl")
REPO = Path(__file__).parent.parent
WNIDS = ["n01440764", "n01443537", "n02102040"]


def _tiny_imagenet(root: Path) -> dict:
    """The same 9 train and 7 val images (an odd number) in ImageNet's three layouts."""
    train = [
        (f"{wnid}_{i}", wnid, jpeg_bytes(40 + i, 36, seed=10 * c + i)) for c, wnid in enumerate(WNIDS) for i in range(3)
    ]
    val = [(f"ILSVRC2012_val_{i:08d}", WNIDS[i % 3], jpeg_bytes(44, 40 + i, seed=100 + i)) for i in range(1, 8)]
    folders = root / "folders"  # (a) class folders
    kaggle = root / "kaggle"  # (b) Kaggle: class-folder train, flat val + LOC_val_solution.csv two levels up
    for name, wnid, data in train:
        for base in (folders / "train", kaggle / "ILSVRC/Data/CLS-LOC/train"):
            (base / wnid).mkdir(parents=True, exist_ok=True)
            (base / wnid / f"{name}.JPEG").write_bytes(data)
    (kaggle / "ILSVRC/Data/CLS-LOC/val").mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for name, wnid, data in val:
        (folders / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (folders / "val" / wnid / f"{name}.JPEG").write_bytes(data)
        (kaggle / "ILSVRC/Data/CLS-LOC/val" / f"{name}.JPEG").write_bytes(data)
        rows.append(f"{name},{wnid} 1 2 30 30 {wnid} 3 4 20 20")
    (kaggle / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    shards = root / "shards"  # (c) key.jpg + key.cls, labels by sorted wnid as in the public copies
    shards.mkdir()
    for split, items in (("train", train), ("val", val)):
        members = [
            m
            for name, wnid, data in items
            for m in ((f"{name}.jpg", data), (f"{name}.cls", str(WNIDS.index(wnid)).encode()))
        ]
        write_tar(shards / f"imagenet1k-{split}-0000.tar", members)
    (shards / "sizes.json").write_text(json.dumps({"imagenet1k-train-0000.tar": len(train)}))
    return {
        "folders": FinetuneDataConfig(
            train=str(folders / "train"), val=str(folders / "val"), image_size=32, resize=36, num_workers=0
        ),
        "kaggle": FinetuneDataConfig(
            train=str(kaggle / "ILSVRC/Data/CLS-LOC/train"),
            val=str(kaggle / "ILSVRC/Data/CLS-LOC/val"),
            image_size=32,
            resize=36,
            num_workers=0,
        ),
        "shards": FinetuneDataConfig(
            train=str(shards / "imagenet1k-train-0000.tar"),
            val=str(shards / "imagenet1k-val-0000.tar"),
            num_classes=3,
            image_size=32,
            resize=36,
            num_workers=0,
            batch_size=3,
            resampled=False,
        ),
        "labels": {name: WNIDS.index(wnid) for name, wnid, _ in train + val},
    }


def test_the_three_imagenet_layouts_yield_the_same_samples_and_labels(tmp_path):
    layouts = _tiny_imagenet(tmp_path)
    val = {}
    for layout in ("folders", "kaggle", "shards"):
        data = LabelledImages(layouts[layout])
        assert data.num_classes == 3
        samples = list(data.val_dataloader().dataset)
        val[layout] = {Path(s["key"]).name: (s["label"], s["image"]) for s in samples}
        assert len(samples) == len(val[layout]) == 7
        assert {name: label for name, (label, _) in val[layout].items()} == {
            n: label_ for n, label_ in layouts["labels"].items() if "val" in n
        }
    for layout in ("kaggle", "shards"):
        assert all(torch.equal(val[layout][name][1], val["folders"][name][1]) for name in val["folders"])
    for layout in ("folders", "kaggle"):
        data = LabelledImages(layouts[layout])
        assert {Path(p).stem: label for p, label in data.train_items} == {
            n: label_ for n, label_ in layouts["labels"].items() if "val" not in n
        }
    shard_batches = list(LabelledImages(layouts["shards"]).train_dataloader())  # a shuffled stream: labels, not order
    assert len(shard_batches) == 3 and all(batch["image"].shape == (3, 3, 32, 32) for batch in shard_batches)
    seen = [(key, int(label)) for batch in shard_batches for key, label in zip(batch["key"], batch["target"])]
    assert all(layouts["labels"][key] == label for key, label in seen)


def test_a_corrupt_training_image_is_skipped_and_counted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "good.JPEG").write_bytes(jpeg_bytes())
    (tmp_path / "a" / "bad.JPEG").write_bytes(b"not a jpeg")
    items = [(str(tmp_path / "a" / "good.JPEG"), 0), (str(tmp_path / "a" / "bad.JPEG"), 0)]
    dataset = LabelledImageFolder(tmp_path, items, TrainTransform(32))
    batch = collate_labelled([dataset[0], dataset[1]])
    assert batch["skipped"] == 1 and batch["key"] == ["a/good"] and batch["image"].shape == (1, 3, 32, 32)


def _save_with_hash_name(state: dict, folder: Path, stem: str) -> Path:
    staging = folder / "staging.pth"
    torch.save(state, staging)
    return staging.rename(folder / f"{stem}-{file_sha256(staging)[:8]}.pth")


@pytest.mark.slow
def test_a_wsl_images_pth_loads_into_the_finetuning_model_with_only_the_head_reinitialised(tmp_path):
    torch.manual_seed(0)
    released = torchvision.models.resnext101_32x8d().state_dict()  # the WSL-Images / torchvision layout
    path = _save_with_hash_name(released, tmp_path, "ig_resnext101_32x8")
    assert re.fullmatch(r"ig_resnext101_32x8-[0-9a-f]{8}\.pth", path.name)
    model = ImageClassifier("resnext101_32x8d", num_classes=10, batch_size=2, epochs=1)
    head_before = model.net.fc.weight.detach().clone()
    report = load_weights(model.net, path, "resnext101_32x8d", head="new")
    assert "dropped the checkpoint's 1000-class head, new 10-class head" in report and "missing: none" in report
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in released.items() if not k.startswith("fc."))
    assert loaded["fc.weight"].shape == (10, 2048) and torch.equal(loaded["fc.weight"], head_before)
    wrong = path.rename(tmp_path / "ig_resnext101_32x8-c38310e5.pth")  # the published name, other bytes
    with pytest.raises(WslError, match="SHA-256 does not start with c38310e5"):
        load_weights(model.net, wrong, "resnext101_32x8d")


def test_weights_of_another_width_or_a_truncated_file_are_one_clear_error(tmp_path):
    narrow = tmp_path / "narrow.pth"
    torch.save(build_model("resnext14_8x4d", 3).state_dict(), narrow)
    with pytest.raises(
        WslError, match=r"holds resnext14_8x4d, not resnext14_32x4d: 0 backbone tensors missing, \d+ of another shape"
    ):
        load_weights(build_model("resnext14_32x4d", 3), narrow, "resnext14_32x4d")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(narrow.read_bytes()[:5000])
    with pytest.raises(WslError, match="unreadable or truncated"):
        load_weights(build_model("resnext14_8x4d", 3), truncated, "resnext14_8x4d")


def test_timm_safetensors_and_prefixed_training_checkpoints_load_alike(tmp_path):
    from safetensors.torch import save_file

    source = build_model("resnext14_8x4d", 7)
    save_file(source.state_dict(), tmp_path / "timm.safetensors")
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ddp.pth"
    )
    for name in ("timm.safetensors", "ddp.pth"):
        target = build_model("resnext14_8x4d", 7)
        report = load_weights(target, tmp_path / name, "resnext14_8x4d", head="keep")
        assert "classifier kept (7 classes)" in report
        assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def _demo_downstream_config(demo, run_dir: Path, *extra: str) -> FinetuneConfig:
    downstream = demo["summary"]["downstream"]
    return load(
        FinetuneConfig,
        ["configs/finetune/demo.yaml"],
        [
            f"run_dir={run_dir}",
            "epochs=1",
            f"data.train={downstream}/train",
            f"data.val={downstream}/val",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.image_size=32",
            "data.resize=36",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
            *extra,
        ],
    )


@pytest.mark.slow
def test_finetuning_from_a_pretraining_checkpoint_runs_logs_and_validates_its_own_checkpoint(demo, tmp_path):
    pretrain = run_pretraining(
        load(
            PretrainConfig,
            ["configs/pretrain/demo.yaml"],
            [
                f"run_dir={tmp_path / 'pretrain'}",
                "max_steps=2",
                "val_every_steps=100",
                f"data.shards={demo['shards']}",
                "data.val_shards=null",
                f"data.vocab={demo['vocab_path']}",
                "data.batch_size=4",
                "data.num_workers=0",
                "data.image_size=32",
                "trainer.enable_progress_bar=false",
                "wandb.mode=disabled",
            ],
        )
    )
    result = run_finetuning(_demo_downstream_config(demo, tmp_path / "ft", f"weights={pretrain['checkpoint']}"))
    assert "Lightning checkpoint" in result["start"] and "new 10-class head" in result["start"]
    assert result["metrics"]["val/images"] == 30  # 10 classes x 3 val images, each once
    assert 0 <= result["metrics"]["val/top1"] <= result["metrics"]["val/top5"] <= 1
    assert (tmp_path / "ft" / "metrics.csv").read_text().count("train/loss") == 1
    assert list((tmp_path / "ft").glob("wandb/offline-run-*/run-*.wandb"))
    validated = subprocess.run(
        [
            WSL,
            "finetune",
            "validate=true",
            "--config",
            "configs/finetune/demo.yaml",
            f"weights={result['checkpoint']}",
            f"data.train={demo['summary']['downstream']}/train",
            f"data.val={demo['summary']['downstream']}/val",
            "data.num_workers=0",
            "data.image_size=32",
            "data.resize=36",
            "trainer.enable_progress_bar=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert validated.returncode == 0, validated.stderr[-2000:]
    top1 = float(re.search(r"val top-1 ([\d.]+)", validated.stdout).group(1))
    assert top1 == pytest.approx(100 * result["metrics"]["val/top1"], abs=0.01)


def _validate(weights: Path, val: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            WSL,
            "finetune",
            "validate=true",
            "--config",
            "configs/finetune/demo.yaml",
            "model=resnext14_8x4d",
            f"weights={weights}",
            "data.train=null",
            f"data.val={val}",
            "data.batch_size=2",
            "data.num_workers=1",
            "data.image_size=32",
            "data.resize=36",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.mark.slow
def test_two_process_ddp_validation_counts_each_of_an_odd_number_of_images_once(tmp_path):
    layouts = _tiny_imagenet(tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "classifier.pth"
    torch.save(build_model("resnext14_8x4d", 3).state_dict(), weights)
    single = _validate(weights, Path(layouts["folders"].val), "trainer.devices=1")
    ddp = _validate(weights, Path(layouts["folders"].val), "trainer.devices=2", "trainer.strategy=ddp")
    for run in (single, ddp):
        assert run.returncode == 0, run.stderr[-3000:]
    lines = [re.findall(r"val top-1 .*", run.stdout) for run in (single, ddp)]
    assert len(lines[1]) == 1, "one report, from rank 0"
    assert "(7 images of" in lines[0][0] and lines[0] == lines[1]


def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path):
    layouts = _tiny_imagenet(tmp_path)
    other_val = tmp_path / "other_val"
    (other_val / "n99999999").mkdir(parents=True)
    (other_val / "n99999999" / "x.JPEG").write_bytes(jpeg_bytes())
    narrow = tmp_path / "narrow.pth"
    torch.save(build_model("resnext14_8x4d", 3).state_dict(), narrow)
    base = [
        WSL,
        "finetune",
        "--config",
        "configs/finetune/demo.yaml",
        f"data.train={layouts['folders'].train}",
        f"data.val={layouts['folders'].val}",
        f"run_dir={tmp_path / 'run'}",
        "wandb.mode=disabled",
        "weights=null",
    ]
    cases = {
        "the classes of .* differ from training's: 3 missing": [f"data.val={other_val}"],
        "holds resnext14_8x4d, not resnext14_32x4d": [f"weights={narrow}", "model=resnext14_32x4d"],
        "weights file not found: .*nowhere.pth": [f"weights={tmp_path / 'nowhere.pth'}"],
    }
    for message, overrides in cases.items():
        run = subprocess.run([*base, *overrides], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert run.returncode == 2, run.stderr[-2000:]
        assert len(run.stderr.strip().splitlines()) == 1 and re.search(
            f"wsl finetune: error: .*{message}", run.stderr
        ), run.stderr


def test_a_frozen_backbone_probe_trains_only_the_classifier_and_keeps_batchnorm_statistics(tmp_path):
    layouts = _tiny_imagenet(tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "start.pth"
    start = build_model("resnext14_8x4d", 3).state_dict()
    torch.save(start, weights)
    config = load(
        FinetuneConfig,
        [],
        [
            f"run_dir={tmp_path / 'probe'}",
            "model=resnext14_8x4d",
            f"weights={weights}",
            "head=keep",
            "freeze_backbone=true",
            "epochs=2",
            f"data.train={layouts['folders'].train}",
            f"data.val={layouts['folders'].val}",
            "data.batch_size=3",
            "data.num_workers=0",
            "data.image_size=32",
            "data.resize=36",
            "optim.base_lr=10",
            "wandb.mode=disabled",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ],
    )
    result = run_finetuning(config)
    trained = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    assert all(
        torch.equal(trained[f"net.{k}"], v) for k, v in start.items() if not k.startswith("fc.")
    )  # BN buffers too
    assert not torch.equal(trained["net.fc.weight"], start["fc.weight"])


@pytest.mark.slow
def test_validation_reports_lower_bound_top1_with_copies_counted_wrong_and_real_top1_on_imagenet_keys(tmp_path):
    wnids = ImageNetInfo("imagenet-1k").label_names()
    real = json.loads((files("timm.data") / "_info" / "imagenet_real_labels.json").read_text())
    predicted = next(labels[0] for labels in real[:5] if labels)  # the network below predicts it for every image
    val = tmp_path / "val"
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for number in range(1, 6):  # ILSVRC2012_val_00000001..5: images 1 and 2 labelled `predicted`
        name = f"ILSVRC2012_val_{number:08d}"
        (val / f"{name}.JPEG").write_bytes(jpeg_bytes(40, 36, seed=number))
        rows.append(f"{name},{wnids[predicted] if number <= 2 else wnids[(predicted + number) % 1000]} 0 0 1 1")
    rows += [f"absent_{i},{wnid} 0 0 1 1" for i, wnid in enumerate(wnids)]  # the labels file names all 1,000 classes
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    net = build_model("resnext14_8x4d", 1000)
    torch.nn.init.zeros_(net.fc.weight)
    with torch.no_grad():
        net.fc.bias.zero_()[predicted] = 1.0
    torch.save(net.state_dict(), tmp_path / "constant.pth")
    report = tmp_path / "dedup_report.json"  # `wsl dedup` found image 2 copied in the pretraining data
    report.write_text(
        json.dumps(
            {"shards": {"a.tar": {"copies": [{"key": "k", "match": "val/ILSVRC2012_val_00000002", "score": 0.9}]}}}
        )
    )
    result = _validate(
        tmp_path / "constant.pth", val, "model=resnext14_8x4d", f"dedup_reports=[{report}]", "trainer.devices=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = re.search(r"val top-1 .*", result.stdout).group(0)
    with_real = [real[n - 1] for n in range(1, 6) if real[n - 1]]
    expected_real = 100 * sum(predicted in labels for labels in with_real) / len(with_real)
    assert "val top-1 40.00" in line, line  # images 1 and 2 right
    assert "lower-bound top-1 20.00 (1 copied in pretraining count as errors)" in line, line
    assert f"ReaL top-1 {expected_real:.2f} ({len(with_real)} with ReaL labels)" in line, line
