"""Released backbones: export -> load in one line (and through torch.hub), WSL-Images files,
hash checks, and checkpoints that try to run code."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision

import wsl
from wsl.config import load
from wsl.errors import WslError
from wsl.models import build_model
from wsl.release.checkpoints import file_sha256
from wsl.release.export import export
from wsl.train.pretrain import Config as PretrainConfig
from wsl.train.pretrain import run_pretraining

REPO = str(Path(__file__).parent.parent)


class _KeepNetwork(pl.Callback):
    def on_fit_end(self, trainer, module):
        self.net = copy.deepcopy(module.net).eval()


@pytest.mark.slow
def test_pretrain_export_and_load_in_one_line_or_through_torch_hub_give_the_trained_features(demo, tmp_path):
    kept = _KeepNetwork()
    run_pretraining(
        load(
            PretrainConfig,
            ["configs/pretrain/demo.yaml"],
            [
                f"run_dir={tmp_path / 'run'}",
                "max_steps=2",
                "val_every_steps=100",
                f"data.shards={demo['shards']}",
                "data.val_shards=null",
                f"data.vocab={demo['vocab_path']}",
                "data.batch_size=4",
                "data.num_workers=0",
                "data.image_size=32",
                "channels_last=false",
                "trainer.enable_progress_bar=false",
                "wandb.mode=disabled",
            ],
        ),
        callbacks=[kept],
    )  # the same memory layout as the loaded copies, so the same kernels and bit-equal features
    release = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "release", vocab=demo["vocab_path"])
    metadata = json.loads((release / "metadata.json").read_text())
    for entry in metadata["files"].values():
        assert re.fullmatch(r"wsl_resnext14_8x4d-[0-9a-f]{8}\.(safetensors|pth)", entry["file"])
        assert file_sha256(release / entry["file"]).startswith(entry["file"].rsplit("-", 1)[1][:8])
    assert metadata["head"]["kind"] == "hashtags" and metadata["head"]["vocab_sha256"] == demo["vocab"].sha256
    assert (release / "vocab.json").read_bytes() == Path(demo["vocab_path"]).read_bytes()

    batch = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = kept.net.forward_features(batch)
        one_line = wsl.load_backbone(release)
        hub = torch.hub.load(REPO, "wsl_backbone", str(release), source="local")
        pth = wsl.load_backbone(release / metadata["files"]["pth"]["file"])
        for model in (one_line, hub, pth):
            features = model.forward_features(batch)
            assert features.shape == (3, 2048) and torch.equal(features, expected)
        assert torch.equal(one_line(batch), kept.net(batch))  # the hashtag head too
        assert wsl.load_backbone(release, num_classes=7).fc.out_features == 7

    card = (release / "README.md").read_text()  # the model card renders the metadata
    assert card.startswith("# wsl_resnext14_8x4d\n")
    for value in (
        metadata["architecture"],
        metadata["head"]["vocab_sha256"],
        metadata["files"]["safetensors"]["sha256"],
        metadata["files"]["pth"]["file"],
        f"{metadata['head']['num_classes']} classes",
        metadata["wsl_version"],
    ):
        assert str(value) in card
    assert json.loads(card.split("```json\n")[1].split("```")[0]) == metadata["training_config"]


@pytest.mark.slow
def test_a_torchvision_state_dict_under_the_wsl_images_name_loads_through_the_hub_entry_point(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnext101_32x8d().eval()
    staging = tmp_path / "staging.pth"
    torch.save(reference.state_dict(), staging)
    path = staging.rename(tmp_path / f"ig_resnext101_32x8-{file_sha256(staging)[:8]}.pth")
    model = torch.hub.load(REPO, "resnext101_32x8d_wsl", weights=str(path), source="local")
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(batch), reference(batch))
        assert model.forward_features(batch).shape == (2, 2048)
    wrong = path.rename(tmp_path / "ig_resnext101_32x8-c38310e5.pth")  # the published name, other bytes
    with pytest.raises(WslError, match="SHA-256 does not start with c38310e5"):
        torch.hub.load(REPO, "resnext101_32x8d_wsl", weights=str(wrong), source="local")


def test_a_users_own_dated_file_name_loads_and_any_name_is_checked_when_asked(tmp_path):
    weights = tmp_path / "model-20240101.pth"  # a date, not a hash: not the user's problem
    torch.save(build_model("resnext14_8x4d", 5).state_dict(), weights)
    assert wsl.load_backbone(weights).fc.out_features == 5
    with pytest.raises(WslError, match="SHA-256 does not start with 20240101"):
        wsl.load_backbone(weights, check_hash=True)


def test_a_pth_whose_pickle_calls_os_system_is_refused_and_the_payload_never_runs(tmp_path):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, evil)
    assert not marker.exists()
    with pytest.raises(WslError, match="refused"):
        wsl.load_backbone(evil)
    with pytest.raises(WslError, match="refused"):
        torch.hub.load(REPO, "resnext101_32x8d_wsl", weights=str(evil), source="local")
    assert not marker.exists()


def test_a_truncated_or_replaced_release_file_is_refused(tmp_path):
    weights = tmp_path / "plain.pth"
    torch.save(build_model("resnext14_8x4d", 5).state_dict(), weights)
    release = export(weights, tmp_path / "release", name="tiny")
    metadata = json.loads((release / "metadata.json").read_text())
    assert metadata["head"] == {"kind": "unknown", "num_classes": 5} and metadata["architecture"] == "resnext14_8x4d"
    safetensors_file = release / metadata["files"]["safetensors"]["file"]
    safetensors_file.write_bytes(safetensors_file.read_bytes()[:1000])
    with pytest.raises(WslError, match="SHA-256"):
        wsl.load_backbone(release)
    pth_file = release / metadata["files"]["pth"]["file"]
    pth_file.write_bytes(pth_file.read_bytes()[:5000])
    with pytest.raises(WslError, match="SHA-256 does not start with"):
        wsl.load_backbone(pth_file)
