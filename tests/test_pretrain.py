"""Model registry, loss, schedule, and a real (tiny) Lightning pretraining run with W&B offline."""

import csv

import pytest
import torch
import torch.nn.functional as F
import torchvision

from wsl.errors import WslError
from wsl.models import PAPER_MODELS, build_model, count_parameters
from wsl.pretrain import OptimConfig, lr_factor, soft_target_cross_entropy
from wsl.run import load_config, run_pretraining


def test_registry_builds_the_paper_models_with_the_published_parameter_counts():
    expected = [44_177_704, 88_791_336, 194_026_792, 468_530_472, 828_411_176]  # 1000-class head
    assert [count_parameters(name) for name in PAPER_MODELS] == expected


def test_registry_state_dict_keys_match_torchvision():
    ours = build_model("resnext101_32x8d", 1000, device="meta").state_dict()
    theirs = torchvision.models.resnext101_32x8d().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(WslError, match="unknown model 'resnet101_32x8d'"):
        build_model("resnet101_32x8d", 10)


def test_loss_equals_torch_cross_entropy_with_probability_targets():
    logits = torch.randn(6, 9)
    target = torch.zeros(6, 9)
    for row, k in enumerate([1, 2, 3, 1, 2, 4]):
        target[row, torch.randperm(9)[:k]] = 1 / k
    assert soft_target_cross_entropy(logits, target) == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-6)


def test_lr_warms_up_linearly_then_decays():
    config = OptimConfig(warmup_steps=10, schedule="cosine")
    assert lr_factor(0, 100, config) == pytest.approx(0.1) and lr_factor(9, 100, config) == pytest.approx(1.0)
    assert lr_factor(55, 100, config) == pytest.approx(0.5) and lr_factor(100, 100, config) == pytest.approx(0.0)
    steps = OptimConfig(schedule="step", step_milestones=[0.5, 0.75], step_gamma=0.1)
    assert [lr_factor(s, 100, steps) for s in (0, 49, 50, 80)] == pytest.approx([1, 1, 0.1, 0.01])


@pytest.mark.slow
def test_a_tiny_pretraining_run_logs_to_csv_and_wandb_offline_and_resumes(demo, tmp_path):
    overrides = [
        f"run_dir={tmp_path / 'run'}", "model=resnext14_8x4d", "max_steps=4", "val_every_steps=2",
        "checkpoint_every_steps=2", f"data.shards={demo['shards']}", f"data.val_shards={demo['shards']}/demo-000006.tar",
        f"data.vocab={demo['vocab_path']}", "data.batch_size=4", "data.num_workers=0", "data.image_size=32",
        "data.val_batches=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    ]
    result = run_pretraining(load_config("configs/pretrain/demo.yaml", overrides))
    run = tmp_path / "run"
    assert result["global_step"] == 4 and (run / "checkpoints" / "last.ckpt").is_file()
    assert 0 <= result["metrics"]["val/precision@1"] <= 1
    assert list(run.glob("wandb/offline-run-*/run-*.wandb")), "W&B offline mode writes a real run file"
    with open(run / "metrics.csv") as rows:
        logged = list(csv.DictReader(rows))
    assert any(row.get("train/loss") for row in logged) and any(row.get("val/precision@1") for row in logged)
    resumed = run_pretraining(load_config("configs/pretrain/demo.yaml", [*overrides, "max_steps=6"]))
    assert resumed["global_step"] == 6


def test_unknown_config_key_names_it():
    with pytest.raises(WslError, match="unknown config key 'optimizer'"):
        load_config(None, ["optimizer.lr=0.1"])
