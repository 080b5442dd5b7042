"""Model registry, loss, schedule, and a real (tiny) Lightning pretraining run with W&B offline."""

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision

from wsl.config import load
from wsl.errors import WslError
from wsl.models import PAPER_MODELS, build_model, count_parameters
from wsl.train.optim import OptimConfig, lr_factor, paper_training_length
from wsl.train.pretrain import Config, run_pretraining, soft_target_cross_entropy
from wsl.train.runner import resume_checkpoint

WSL = str(Path(sys.executable).parent / "wsl")


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


def test_the_papers_schedule_warms_up_from_the_lr_of_256_images_then_halves_13_times():
    config = OptimConfig(base_lr=0.1, warmup_steps=800, schedule="paper", paper_reductions=13, paper_factor=0.5)
    peak, steps, batch = 0.1 * 8064 / 256, 14 * 1000 + 800, 8064
    lr = [peak * lr_factor(step, steps, config, batch) for step in range(steps + 1)]
    assert lr[0] == pytest.approx(0.1) and lr[400] == pytest.approx((0.1 + peak) / 2) and lr[800] == pytest.approx(peak)
    assert max(lr) == pytest.approx(3.15)
    halvings = [step for step in range(1, steps + 1) if lr[step] < lr[step - 1] - 1e-12]
    assert halvings == [800 + 1000 * i for i in range(1, 14)], "13 equally spaced reductions after the warm-up"
    for i, step in enumerate(halvings, 1):
        assert lr[step] == pytest.approx(peak * 0.5**i) and lr[step - 1] == pytest.approx(peak * 0.5 ** (i - 1))
    assert lr[-1] == pytest.approx(peak * 0.5**13)


def test_the_paper_configs_use_the_papers_schedule_and_zero_initialised_residual_gammas():
    config = load(Config, ["configs/pretrain/ig_resnext101_32x8d.yaml"])
    assert config.optim.schedule == "paper" and config.zero_init_residual and config.optim.warmup_steps == 800
    assert paper_training_length(940e6, 8064) == (1_983_605_808, 245_983)
    assert config.max_steps == 246_000
    net = build_model("resnext14_8x4d", 10, zero_init_residual=True)
    gammas = [block.bn3.weight for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for block in layer]
    assert gammas and all(torch.count_nonzero(g) == 0 for g in gammas)
    assert torch.count_nonzero(build_model("resnext14_8x4d", 10).layer1[0].bn3.weight) > 0


@pytest.mark.slow
def test_a_tiny_pretraining_run_logs_to_csv_and_wandb_offline_and_resumes(demo, tmp_path, monkeypatch):
    secret = "wsl-test-key-" + "0123456789abcdef" * 2
    monkeypatch.setenv("WANDB_API_KEY", secret)
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "model=resnext14_8x4d",
        "max_steps=4",
        "val_every_steps=2",
        "checkpoint_every_steps=2",
        f"data.shards={demo['shards']}",
        f"data.val_shards={demo['shards']}/demo-000006.tar",
        f"data.vocab={demo['vocab_path']}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.image_size=32",
        "data.val_batches=2",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "wandb.table_every=2",
    ]
    result = run_pretraining(load(Config, ["configs/pretrain/demo.yaml"], overrides))
    run = tmp_path / "run"
    assert result["global_step"] == 4 and (run / "checkpoints" / "last.ckpt").is_file()
    assert 0 <= result["metrics"]["val/precision@1"] <= 1
    assert list(run.glob("wandb/offline-run-*/run-*.wandb")), "W&B offline mode writes a real run file"
    tables = list(run.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert tables, "a table of sample images with hashtags and top-5 predictions"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["image", "hashtags", "top-5 predicted"] and len(table["data"]) == 4
    assert all(row[1].startswith("#") and len(row[2].split()) == 5 for row in table["data"])
    with open(run / "metrics.csv") as rows:
        logged = list(csv.DictReader(rows))
    assert any(row.get("train/loss") for row in logged) and any(row.get("val/precision@1") for row in logged)
    stored = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    prepared = stored["hyper_parameters"]["shards_prepared"]  # how the shards were written goes with the run
    assert prepared == {str(demo["shards"]): {"mode": "none"}}
    resumed = run_pretraining(load(Config, ["configs/pretrain/demo.yaml"], [*overrides, "max_steps=6"]))
    assert resumed["global_step"] == 6
    assert resumed["wandb_dir"] == str(max(run.glob("wandb/offline-run-*")))  # the resumed run's own files
    written = [p for p in run.rglob("*") if p.is_file()]
    assert written and not [p for p in written if secret.encode() in p.read_bytes()], "the API key is never written"


def test_unknown_config_key_names_it():
    with pytest.raises(WslError, match="unknown config key 'optimizer'"):
        load(Config, [], ["optimizer.lr=0.1"])


def _tiny_overrides(demo, run_dir, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        "model=resnext14_8x4d",
        f"data.shards={demo['shards']}",
        f"data.vocab={demo['vocab_path']}",
        "data.val_shards=null",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.image_size=32",
        "trainer.enable_progress_bar=false",
        "wandb.mode=disabled",
        *extra,
    ]


@pytest.mark.slow
def test_only_the_newest_and_every_mth_step_checkpoints_are_kept_and_the_disk_use_is_reported(demo, tmp_path):
    overrides = _tiny_overrides(
        demo,
        tmp_path / "run",
        "max_steps=9",
        "checkpoint_every_steps=1",
        "val_every_steps=1000",
        "keep_last_checkpoints=2",
        "keep_checkpoint_every_steps=4",
    )
    result = run_pretraining(load(Config, ["configs/pretrain/demo.yaml"], overrides))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert kept == ["last.ckpt", "step0000004.ckpt", "step0000008.ckpt", "step0000009.ckpt"]
    assert result["checkpoints"]["files"] == 4 and result["checkpoints"]["gigabytes"] > 0
    paper = load(Config, ["configs/pretrain/ig_resnext101_32x48d.yaml"])
    every = paper.keep_checkpoint_every_steps
    assert paper.max_steps // every + paper.keep_last_checkpoints + 1 <= 10, "a paper-scale run keeps under ~10 files"


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_the_same_number_of_optimizer_steps(demo, tmp_path):
    def command(run_dir):
        return [
            WSL,
            "pretrain",
            "--config",
            "configs/pretrain/demo.yaml",
            *_tiny_overrides(demo, run_dir, "max_steps=16", "checkpoint_every_steps=4", "val_every_steps=1000"),
        ]

    # The run kills itself (SIGKILL) right after its step-8 checkpoint is written: no race with a poller.
    killed = subprocess.run([*command(tmp_path / "killed"), "stop_after_step=8"], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("step*.ckpt")) == [
        "step0000004.ckpt",
        "step0000008.ckpt",
    ]
    newest = resume_checkpoint(tmp_path / "killed")
    assert torch.load(newest, weights_only=False)["global_step"] == 8
    resumed = subprocess.run(command(tmp_path / "killed"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = re.search(r"resuming from (\S+)", resumed.stdout)
    assert start and start.group(1) == str(newest)
    assert "optimizer steps: 16" in resumed.stdout
    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    ends = [
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False) for run in ("killed", "straight")
    ]
    assert [e["global_step"] for e in ends] == [16, 16]
    assert [e["lr_schedulers"][0]["last_epoch"] for e in ends] == [16, 16]  # the schedule continued, not restarted


DDP_SCRIPT = """
import json, sys, torch
import pytorch_lightning as pl
from wsl.config import load
from wsl.train.pretrain import Config, run_pretraining
from wsl.train.runner import resume_checkpoint

class SaveWeights(pl.Callback):
    def on_fit_end(self, trainer, module):
        params = {k: v.detach().clone() for k, v in module.named_parameters()}
        torch.save({"params": params, "step": trainer.global_step}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

run_pretraining(load(Config, ["configs/pretrain/demo.yaml"], sys.argv[2:]), callbacks=[SaveWeights()])
"""


@pytest.mark.slow
def test_two_process_ddp_on_uneven_shards_ends_with_equal_steps_and_identical_weights(demo, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    overrides = _tiny_overrides(
        demo,
        tmp_path / "run",
        "max_steps=6",
        "checkpoint_every_steps=100",
        "val_every_steps=1000",
        f"data.shards={demo['shards']}/demo-{{000000..000002}}.tar",
        "data.resampled=false",  # 2 shards vs 1
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    )
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys()
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"])


class _RecordKeys(pl.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.keys.append(list(batch["key"]))


@pytest.mark.slow
def test_a_resumed_run_draws_fresh_samples_instead_of_replaying_its_first_batches(demo, tmp_path):
    overrides = _tiny_overrides(
        demo, tmp_path / "a", "max_steps=4", "checkpoint_every_steps=2", "val_every_steps=1000", "data.num_workers=1"
    )  # the stream is pickled into a worker process
    straight = _RecordKeys()
    run_pretraining(load(Config, ["configs/pretrain/demo.yaml"], overrides), callbacks=[straight])
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "step0000002.ckpt", tmp_path / "b" / "checkpoints")
    resumed = _RecordKeys()
    result = run_pretraining(
        load(Config, ["configs/pretrain/demo.yaml"], [*overrides, f"run_dir={tmp_path / 'b'}"]), callbacks=[resumed]
    )
    assert result["global_step"] == 4 and len(resumed.keys) == 2
    assert resumed.keys != straight.keys[:2], "the resumed run replayed the stream's first batches"
    assert resumed.keys != straight.keys[2:]  # and it is a stream of its own (seeded by step 2)


def test_unknown_data_or_optim_keys_are_named_and_a_config_needs_shards_and_vocab():
    with pytest.raises(WslError, match="unknown config key 'data.batchsize'"):
        load(Config, ["configs/pretrain/demo.yaml"], ["data.batchsize=3"])
    with pytest.raises(WslError, match="unknown config key 'optim.lr'"):
        load(Config, [], ["optim.lr=0.1"])
    with pytest.raises(WslError, match="config key 'data.shards' is required"):
        load(Config, [], [])
