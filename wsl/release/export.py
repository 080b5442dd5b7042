"""Released backbones: `wsl export` turns a checkpoint into a release folder, and
`load_backbone` loads one, or a WSL-Images / torchvision / timm file, in one line.

A release folder holds the network in torchvision's state-dict layout twice, as safetensors
and as a weights-only `.pth`, each named `<name>-<first 8 hex of its SHA-256>.<ext>` (the
WSL-Images and torch.hub convention); `metadata.json` (architecture, classes, the head's
vocabulary hash, training config, data statistics, eval numbers, versions, file hashes);
`vocab.json` when the head is the hashtag head; and a model card, `README.md`.
Loading goes through `wsl.release.checkpoints`: nothing is unpickled with code, hashes are checked.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import wsl
from wsl.config import REQUIRED, option, require_file
from wsl.errors import WslError
from wsl.files import write_atomic, write_json
from wsl.models import ResNeXt, build_model, parse_model_name
from wsl.release.checkpoints import WSL_IMAGES, file_sha256, infer_architecture, load_weights, read_checkpoint

FORMAT = "wsl-release-1"
WSL_IMAGES_URL = "https://download.pytorch.org/models/"


def _json_safe(value):
    """Hyper-parameters as JSON (tuples to lists; anything else that is not plain data to its repr)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _write_named(out: Path, name: str, suffix: str, write) -> dict:
    """Write through `write(path)` to a temporary file, then rename to `<name>-<sha8><suffix>`."""
    staging = out / f".{name}{suffix}.tmp"
    write(staging)
    digest = file_sha256(staging)
    final = out / f"{name}-{digest[:8]}{suffix}"
    staging.rename(final)  # the name holds the hash, known only once written: not `write_atomic`
    return {"file": final.name, "sha256": digest, "bytes": final.stat().st_size}


def export(
    checkpoint: str | Path,
    out: str | Path,
    name: str | None = None,
    vocab: str | Path | None = None,
    eval_report: str | Path | None = None,
) -> Path:
    """Write the release folder of a `wsl pretrain` / `wsl finetune` checkpoint (or any weights
    file the loader accepts); returns the folder."""
    checkpoint, out = Path(checkpoint), Path(out)
    state, kind, hparams = read_checkpoint(checkpoint)
    model = hparams.get("model") or infer_architecture(state)
    if model is None or not model.startswith("resnext"):
        raise WslError(f"{checkpoint}: cannot tell the architecture ({model or 'not a torchvision ResNeXt'})")
    if "fc.weight" not in state:
        raise WslError(f"{checkpoint}: no classifier (fc.weight) in the checkpoint")
    num_classes = int(state["fc.weight"].shape[0])
    net = build_model(model, num_classes)
    load_weights(net, checkpoint, model, head="keep")  # checks every tensor and shape
    name = name or f"wsl_{model}"
    head: dict = {"kind": "unknown", "num_classes": num_classes}
    statistics: dict = {}
    out.mkdir(parents=True, exist_ok=True)
    trained_with = ((hparams.get("config") or {}).get("data") or {}).get("vocab")
    if hparams.get("vocab_sha256") and vocab is None and trained_with and Path(trained_with).is_file():
        vocab = trained_with  # the vocabulary the run's config names (its hash is checked below)
    if hparams.get("vocab_sha256"):
        if vocab is None:
            raise WslError(
                f"{checkpoint} has a hashtag head (vocabulary {hparams['vocab_sha256'][:12]}): give vocab=FILE"
            )
        from wsl.data.vocab import Vocabulary

        vocabulary = Vocabulary.load(vocab)
        if vocabulary.sha256 != hparams["vocab_sha256"]:
            raise WslError(
                f"{vocab} is vocabulary {vocabulary.sha256[:12]}, the checkpoint was trained with "
                f"{hparams['vocab_sha256'][:12]}"
            )
        shutil.copyfile(vocab, out / "vocab.json")
        head = {
            "kind": "hashtags",
            "num_classes": num_classes,
            "vocab_sha256": vocabulary.sha256,
            "vocab_file": "vocab.json",
        }
        statistics = {
            "hashtag_classes": len(vocabulary),
            "images_per_class": {c.tag: c.count for c in vocabulary.classes[:20]},
        }
    elif hparams.get("classes"):
        head = {"kind": "classes", "num_classes": num_classes, "classes": list(hparams["classes"])}
    evaluation = {}
    run_result = checkpoint.parent.parent / "result.json"  # a run directory's numbers, when exporting from one
    if run_result.is_file():
        evaluation["training_run"] = json.loads(run_result.read_text()).get("metrics", {})
    if eval_report:
        report = json.loads(Path(eval_report).read_text())
        evaluation["eval"] = {
            n: {"knn": r["knn"], "linear": {k: r["linear"][k] for k in ("top1", "top5")}}
            for n, r in report.get("results", {}).items()
        }
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    from safetensors.torch import save_file

    files = {
        "safetensors": _write_named(
            out, name, ".safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
        ),
        "pth": _write_named(out, name, ".pth", lambda p: torch.save(tensors, p)),
    }
    _, groups, width = parse_model_name(model)
    metadata = {
        "format": FORMAT,
        "name": name,
        "architecture": model,
        "depth": int(model[len("resnext") : model.index("_")]),
        "groups": groups,
        "width_per_group": width,
        "feature_dim": 2048,
        "head": head,
        "files": files,
        "config": _json_safe(hparams.get("config")),
        "training_config": _json_safe(hparams),
        "data_statistics": statistics,
        "evaluation": evaluation,
        "source_checkpoint": {"file": checkpoint.name, "kind": kind},
        "wsl_version": wsl.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / "metadata.json", metadata)
    write_atomic(out / "README.md", model_card(metadata))
    return out


def model_card(metadata: dict) -> str:
    """The release's README.md, rendered from its metadata."""
    head = metadata["head"]
    files = metadata["files"]
    lines = [
        f"# {metadata['name']}",
        "",
        f"A {metadata['architecture']} backbone (torchvision ResNet, groups={metadata['groups']}, "
        f"width_per_group={metadata['width_per_group']}) trained with `wsl` "
        "(weakly-supervised hashtag pretraining, Mahajan et al. 2018). "
        f"Pooled features: {metadata['feature_dim']} dims.",
        "",
        "## Use",
        "",
        "```python",
        "import wsl",
        'model = wsl.load_backbone("path/to/this/folder")               # with its head',
        'backbone = wsl.load_backbone("path/to/this/folder", num_classes=10)  # a new 10-class head',
        "features = model.forward_features(images)                      # [batch, 2048]",
        "# or, from a checkout of the wsl repository:",
        'model = torch.hub.load("path/to/wsl", "wsl_backbone", "path/to/this/folder", source="local")',
        "```",
        "",
        "Inputs: RGB, Resize(256) + CenterCrop(224) (or the training resolution), mean (0.485, 0.456, 0.406),",
        "std (0.229, 0.224, 0.225). Files are loaded without unpickling code "
        "(safetensors, or `torch.load(weights_only=True)`).",
        "",
        "## Details",
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | {metadata['architecture']} |",
        f"| head | {head['kind']}, {head['num_classes']} classes |",
    ]
    if head.get("vocab_sha256"):
        lines.append(f"| vocabulary | `{head['vocab_file']}`, sha256 {head['vocab_sha256']} |")
    for kind, entry in files.items():
        lines.append(f"| {kind} | `{entry['file']}`, sha256 {entry['sha256']} |")
    lines += [
        f"| wsl version | {metadata['wsl_version']} |",
        f"| torch version | {metadata['torch_version']} |",
        f"| created | {metadata['created']} |",
        "",
    ]
    if metadata["evaluation"]:
        lines += ["## Evaluation", ""]
        for source, numbers in metadata["evaluation"].items():
            lines.append(f"- {source}: `{json.dumps(numbers)}`")
        lines.append("")
    if metadata["data_statistics"]:
        lines += ["## Data", "", f"`{json.dumps(metadata['data_statistics'])}`", ""]
    lines += ["## Training config", "", "```json", json.dumps(metadata["training_config"], indent=1), "```", ""]
    return "\n".join(lines)


def wsl_images_file(width: int, weights: str | Path | None = None) -> Path:
    """Facebook's WSL-Images file for a width: `weights` if given, else the torch.hub
    checkpoints folder's copy. Nothing is downloaded at run time."""
    if width not in WSL_IMAGES:
        raise WslError(f"WSL-Images has widths {sorted(WSL_IMAGES)}, not {width}")
    if weights is not None:
        return Path(weights)
    path = Path(torch.hub.get_dir()) / "checkpoints" / WSL_IMAGES[width]
    if not path.is_file():
        raise WslError(
            f"{path} not found: download {WSL_IMAGES_URL}{WSL_IMAGES[width]} there (CC-BY-NC 4.0), or pass weights=PATH"
        )
    return path


def load_backbone(
    name_or_path: str | Path, num_classes: int | None = None, head: str = "auto", check_hash: bool = False
) -> ResNeXt:
    """A released backbone in one line, in eval mode, with `forward_features` (pooled 2048-d).

    `name_or_path`: a release folder (from `wsl export`), a weights file (`.pth`, `.ckpt`,
    `.safetensors`: ours, WSL-Images, torchvision, timm), or `resnext101_32x{8,16,32,48}d_wsl`
    for Facebook's files in the torch.hub checkpoints folder. head: "keep" the checkpoint's
    classifier, "new" (a fresh one of `num_classes`), or "auto": keep it unless `num_classes`
    asks for another size. The hash prefix in a file's name is checked for the published
    WSL-Images / torchvision files and release folders' files, and for any name with `check_hash`.
    """
    name = str(name_or_path)
    if name.endswith("_wsl") and name.startswith("resnext101_32x") and not Path(name).exists():
        path = wsl_images_file(int(name[len("resnext101_32x") : -len("d_wsl")]))
    else:
        path = Path(name_or_path)
    if path.is_dir():
        meta_file = path / "metadata.json"
        if not meta_file.is_file():
            raise WslError(f"{path} is not a release folder (no metadata.json)")
        metadata = json.loads(meta_file.read_text())
        entry = metadata["files"]["safetensors"]
        weights = path / entry["file"]
        if weights.is_file() and file_sha256(weights) != entry["sha256"]:
            raise WslError(f"{weights}: SHA-256 differs from metadata.json's: the file is corrupt or was replaced")
        model, checkpoint_classes = metadata["architecture"], metadata["head"]["num_classes"]
    else:
        weights = path
        state, _, hparams = read_checkpoint(path, check_hash)
        model = hparams.get("model") or infer_architecture(state)
        if model is None or not model.startswith("resnext"):
            raise WslError(f"{path}: not a torchvision ResNet(X) state dict")
        checkpoint_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else None
    if head == "auto":
        head = "keep" if checkpoint_classes and num_classes in (None, checkpoint_classes) else "new"
    if head == "new" and num_classes is None:
        raise WslError("head='new' needs num_classes")
    net = build_model(model, num_classes if head == "new" else checkpoint_classes)
    load_weights(net, weights, model, head=head, check_hash=check_hash)
    return net.eval()


@dataclass
class Config:
    """`wsl export`: a pretraining or fine-tuning checkpoint -> a release folder: the network in torchvision's
    layout as NAME-<sha256[:8]>.safetensors and .pth, metadata.json (with the training config), README.md
    (the model card) and, for a hashtag head, vocab.json. The checkpoint is read without unpickling code."""

    checkpoint: str = option(REQUIRED, "a .ckpt of wsl pretrain / wsl finetune, or a .pth / .safetensors")
    out: str = option(REQUIRED, "release folder to write")
    name: str | None = option(None, "file name stem (null: wsl_<architecture>)")
    vocab: str | None = option(None, "the vocabulary JSON of a hashtag head (checked against the checkpoint's hash)")
    eval_report: str | None = option(None, "a `wsl eval` report.json whose numbers go into the metadata and the card")


def main(config: Config) -> str:
    for key in ("vocab", "eval_report"):
        if getattr(config, key):
            require_file(getattr(config, key), key, key.replace("_", " ") + " file")
    out = export(config.checkpoint, config.out, name=config.name, vocab=config.vocab, eval_report=config.eval_report)
    metadata = json.loads((out / "metadata.json").read_text())
    lines = [
        f"release {metadata['name']} ({metadata['architecture']}, {metadata['head']['kind']} head, "
        f"{metadata['head']['num_classes']} classes) in {out}:"
    ]
    lines += [f"  {entry['file']}  sha256 {entry['sha256']}" for entry in metadata["files"].values()]
    lines.append(f"  metadata.json, README.md{', vocab.json' if metadata['head'].get('vocab_file') else ''}")
    lines.append(f'load it with: wsl.load_backbone("{out}")')
    return "\n".join(lines)
