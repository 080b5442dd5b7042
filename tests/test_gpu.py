"""The GPU paths, each the twin of a CPU test that runs everywhere: skipped without CUDA.

Run them where there is a GPU: `python -m pytest tests/test_gpu.py` (BENCHMARKS.md says when
they last ran, and on what).
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, random_sscd_weights
from PIL import Image

from wsl.config import load, to_dict
from wsl.data.transforms import EvalTransform
from wsl.eval.features import extract_features, frozen_backbone, load_features
from wsl.eval.knn import l2_normalise
from wsl.eval.linear_probe import linear_probe
from wsl.train.pretrain import Config, run_pretraining
from wsl.train.runner import resolve_hardware

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (its CPU twin runs here)")


def test_pretraining_on_the_gpu_trains_in_bf16_channels_last_and_resumes(demo, tmp_path):
    """CPU twin: test_pretrain.py::test_a_tiny_pretraining_run_logs_to_csv_and_wandb_offline_and_resumes."""
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "model=resnext14_8x4d",
        f"data.shards={demo['shards']}",
        f"data.vocab={demo['vocab_path']}",
        f"data.val_shards={demo['shards']}/demo-000006.tar",
        "data.batch_size=8",
        "data.num_workers=2",
        "data.image_size=64",
        "data.val_batches=2",
        "val_every_steps=2",
        "checkpoint_every_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "wandb.mode=disabled",
        "channels_last=auto",
    ]
    config = load(Config, ["configs/pretrain/demo.yaml"], [*overrides, "max_steps=4"])
    assert resolve_hardware(config.trainer, config.channels_last) == (
        {**to_dict(config.trainer), "precision": "bf16-mixed"},
        True,
    )
    result = run_pretraining(config)
    assert result["global_step"] == 4 and 0 <= result["metrics"]["val/precision@1"] <= 1
    stored = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert stored["hyper_parameters"]["channels_last"], "auto: NHWC on a GPU"
    assert all(v.dtype == torch.float32 for v in stored["state_dict"].values() if v.is_floating_point())
    with open(tmp_path / "run" / "metrics.csv") as rows:
        losses = [float(r["train/loss"]) for r in csv.DictReader(rows) if r.get("train/loss")]
    assert losses and all(math.isfinite(loss) for loss in losses)
    resumed = run_pretraining(load(Config, ["configs/pretrain/demo.yaml"], [*overrides, "max_steps=6"]))
    assert resumed["global_step"] == 6


def test_the_linear_probe_on_the_gpu_scores_as_on_the_cpu():
    """CPU twin: test_eval.py::test_linear_probe_is_within_one_point_of_scikit_learns_logistic_regression."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 40)) * 0.6
    y_train, y_val = rng.integers(0, 5, 1000), rng.integers(0, 5, 1000)
    x_train, x_val = centres[y_train] + rng.normal(size=(1000, 40)), centres[y_val] + rng.normal(size=(1000, 40))
    on = {
        device: linear_probe(x_train, y_train, x_val, y_val, 5, epochs=60, device=torch.device(device))
        for device in ("cpu", "cuda")
    }
    assert abs(on["cuda"]["top1"] - on["cpu"]["top1"]) <= 0.01, on


def test_features_on_the_gpu_point_where_the_cpus_do(tmp_path):
    """CPU twin: test_eval.py::test_features_are_computed_in_float32_by_default_and_in_bfloat16_when_asked."""
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"a_{i:03d}.JPEG").write_bytes(jpeg_bytes(40, 36, seed=i))
    options = dict(image_size=32, resize=36, batch_size=4, num_workers=0, rank=0, world_size=1, progress=False)
    cpu_net, _ = frozen_backbone("resnext14_8x4d", None)
    images = torch.stack([EvalTransform(32, 36)((folder / f"a_{i:03d}.JPEG").read_bytes()) for i in range(4)])
    with torch.inference_mode():
        reference = l2_normalise(cpu_net.forward_features(images).numpy())
    for precision in ("float32", "bfloat16"):
        out = extract_features(
            str(tmp_path / "images"), tmp_path / precision, "resnext14_8x4d", None, dtype="float32",
            precision=precision, **options,
        )  # fmt: skip
        got = load_features(out)
        cosines = (reference * l2_normalise(got.features[np.argsort(got.keys)])).sum(1)
        assert got.meta["precision"] == precision and cosines.min() > 0.99, (precision, cosines)


def test_sscd_descriptors_on_the_gpu_equal_the_cpus(tmp_path):
    """CPU twin: test_dedup.py's SSCD test (`-k sscd_descriptor`), which on a machine with a GPU
    runs its dedup workers there."""
    from wsl.dedup.sscd import embed, load_sscd

    model = load_sscd(random_sscd_weights(tmp_path / "sscd.torchvision.pt"))
    images = [Image.open(io.BytesIO(jpeg_bytes(320, 300, seed=s))).convert("RGB") for s in range(40)]
    on_cpu = embed(model, images)
    on_gpu = embed(model.to("cuda"), images)
    assert on_gpu.shape == (40, 512) and (on_cpu * on_gpu).sum(1).min() > 0.999
