"""One config system for every stage: schemas, YAML inheritance, overrides, one-line errors,
`--help` from the schema, and runs that never report a number under a config they did not run with."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import jpeg_bytes

from wsl.cli import COMMANDS, main
from wsl.config import describe, load, to_dict
from wsl.errors import WslError
from wsl.train.finetune import Config as FinetuneConfig
from wsl.train.pretrain import Config as PretrainConfig
from wsl.train.pretrain import run_pretraining

WSL = str(Path(sys.executable).parent / "wsl")
REPO = Path(__file__).parent.parent


def wsl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([WSL, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, *texts: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(text in lines[0] for text in texts), result.stderr[-2000:]


def _leaf_keys(schema: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, default) of every leaf of a schema."""
    keys = []
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            keys += _leaf_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            keys.append((f"{prefix}{f.name}", default))
    return keys


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_stage_help_names_every_key_of_its_schema_with_its_default(command, capsys):
    schema = importlib.import_module(COMMANDS[command][0]).Config
    if command == "pretrain":  # through the installed command once; the others in this process (no torch start-up)
        result = wsl(command, "--help")
        assert result.returncode == 0, result.stderr
        output = result.stdout
    else:
        assert main([command, "--help"]) == 0
        output = capsys.readouterr().out
    shown = {line.split(":")[0].strip(): line for line in output.splitlines() if line.startswith("  ")}
    for key, default in _leaf_keys(schema):
        assert key in shown, f"{key} missing from `wsl {command} --help`"
        assert f"= {_as_shown(default)}  " in shown[key] or (default == "???" and "(required)" in shown[key]), shown[
            key
        ]


def _as_shown(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(list(value) if isinstance(value, tuple) else value)


def test_wsl_help_is_fast_because_it_imports_no_stage():
    code = (
        "import sys; from wsl.cli import main; main(['--help']); "
        "print(sorted(m for m in sys.modules if m in ('torch', 'pytorch_lightning')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith("[]"), result.stdout + result.stderr


def test_wrong_types_impossible_values_unknown_keys_and_models_name_the_key_and_what_was_given():
    cases = {
        ("max_steps=abc",): ("config key 'max_steps'", "expected int", "got 'abc'"),
        ("optim.base_lr=-0.1",): ("config key 'optim.base_lr'", "expected > 0", "got -0.1"),
        ("model=resnet50",): ("config key 'model'", "registry model name", "got 'resnet50'"),
        ("optim.lr=0.1",): ("unknown config key 'optim.lr'", "did you mean 'optim.base_lr'"),
        ("data.crop_scale=[0.9,0.2]",): ("config key 'data.crop_scale'", "0 < low <= high <= 1"),
        ("trainer.devices=2", "optim.schedule=linear"): ("config key 'optim.schedule'", "one of cosine, step"),
    }
    for overrides, texts in cases.items():
        with pytest.raises(WslError) as caught:
            load(PretrainConfig, ["configs/pretrain/demo.yaml"], list(overrides))
        assert all(text in str(caught.value) for text in texts), str(caught.value)


def test_the_paper_configs_are_a_few_lines_over_one_base_and_differ_only_in_model_and_run_dir():
    configs = {w: load(PretrainConfig, [f"configs/pretrain/ig_resnext101_32x{w}d.yaml"]) for w in (8, 16, 32, 48)}
    for width, config in configs.items():
        assert config.model == f"resnext101_32x{width}d" and config.trainer.num_nodes == 42
        assert len(Path(f"configs/pretrain/ig_resnext101_32x{width}d.yaml").read_text().splitlines()) <= 8
        flat, base = to_dict(config), to_dict(configs[8])
        assert {k for k in flat if flat[k] != base[k]} <= {"model", "run_dir"}
    for width in (8, 16, 32, 48):
        config = load(FinetuneConfig, [f"configs/finetune/imagenet_resnext101_32x{width}d.yaml"])
        assert config.model == f"resnext101_32x{width}d" and config.data.num_classes == 1000 and config.epochs == 30
        assert len(Path(f"configs/finetune/imagenet_resnext101_32x{width}d.yaml").read_text().splitlines()) <= 12


def test_describe_lists_sections_and_keys():
    lines = describe(PretrainConfig)
    assert any(line.startswith("  optim.base_lr: float = 0.1") for line in lines)
    assert any(line.startswith("  data.shards: str (required)") for line in lines)


def test_the_cases_a_new_user_ran_into_are_one_line_and_exit_2(demo, tmp_path):
    assert_one_line_error(wsl("eval", "--config", "configs/eval/demo.yaml", "knn.k=5"), "knn.k", "list[int]", "'5'")
    assert_one_line_error(
        wsl("pretrain", "--config", "configs/pretrain/demo.yaml", "max_steps=abc"), "max_steps", "expected int"
    )
    run_dir = tmp_path / "nope-run"
    result = wsl(
        "pretrain",
        "--config",
        "configs/pretrain/demo.yaml",
        "data.shards=/nope",
        f"data.vocab={demo['vocab_path']}",
        f"run_dir={run_dir}",
    )
    assert_one_line_error(result, "shard not found: /nope")
    assert not run_dir.exists(), "nothing (run directory, W&B run, model) is made before the inputs are checked"


def _tiny_downstream(root: Path) -> Path:
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (root / split / name / f"{i}.JPEG").write_bytes(jpeg_bytes(40, 36, seed=10 * c + i))
    return root


@pytest.mark.slow
def test_a_finished_run_refuses_another_config_and_the_same_command_still_resumes(tmp_path):
    data = _tiny_downstream(tmp_path / "data")
    command = [
        "finetune",
        "--config",
        "configs/finetune/demo.yaml",
        f"run_dir={tmp_path / 'run'}",
        "weights=null",
        f"data.train={data / 'train'}",
        f"data.val={data / 'val'}",
        "epochs=1",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.image_size=32",
        "data.resize=36",
        "wandb.mode=disabled",
        "trainer.enable_progress_bar=false",
    ]
    first = wsl(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    refused = wsl(*command, "optim.base_lr=5.0")
    assert_one_line_error(refused, "holds a run with another config", "optim.base_lr: 0.4 -> 5.0", "restart=true")
    assert "val top-1" not in refused.stdout, "no number is reported under a config it did not run with"
    again = wsl(*command, "trainer.log_every_n_steps=5")  # a key that may change on resume
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    assert re.search(r"val top-1 [\d.]+", again.stdout).group(0) == re.search(r"val top-1 [\d.]+", first.stdout).group(
        0
    )
    restarted = wsl(*command, "optim.base_lr=5.0", "restart=true")
    assert restarted.returncode == 0 and "resuming from" not in restarted.stdout, restarted.stderr[-2000:]
    assert (tmp_path / "run.1" / "result.json").is_file(), "the old run is set aside, not deleted"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["base_lr"] == 5.0


@pytest.mark.slow
def test_run_dir_config_yaml_is_what_the_run_used_and_alone_reproduces_it(demo, tmp_path):
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "model=resnext14_8x4d",
        "max_steps=2",
        "val_every_steps=100",
        f"data.shards={demo['shards']}",
        "data.val_shards=null",
        f"data.vocab={demo['vocab_path']}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.image_size=32",
        "optim.base_lr=0.3",
        "trainer.enable_progress_bar=false",
        "wandb.mode=disabled",
    ]
    config = load(PretrainConfig, ["configs/pretrain/demo.yaml"], overrides)
    result = run_pretraining(config)
    saved = tmp_path / "run" / "config.yaml"
    assert yaml.safe_load(saved.read_text()) == to_dict(config)
    assert load(PretrainConfig, [saved]) == config, "the saved config alone gives the same settings"
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["config"] == to_dict(config), "every checkpoint carries its config"
    from wsl.release.export import export

    release = export(result["checkpoint"], tmp_path / "release")  # the vocabulary is found from the stored config
    metadata = yaml.safe_load((release / "metadata.json").read_text())
    assert metadata["config"] == to_dict(config) and metadata["head"]["kind"] == "hashtags"
