"""`wsl eval`: kNN and linear-probe accuracy of frozen backbones, side by side.

For each backbone of the config (a checkpoint any loader of `wsl.checkpoints` accepts, or
null for a random initialisation of the same architecture) the train and val sets are
mapped to pooled features (`wsl.features`, cached under run_dir/features and resumable),
then classified by FAISS kNN (`wsl.knn`) and by a linear probe (`wsl.linear_probe`). The
numbers go to run_dir/report.json, W&B (offline by default) and a table on screen; a picture
of val queries with their nearest train images is saved beside the report and logged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wsl.errors import WslError
from wsl.features import Features, extract_features, load_features
from wsl.knn import knn_classify
from wsl.linear_probe import linear_probe

DEFAULTS = {
    "run_dir": "runs/eval",
    "model": "resnext101_32x8d",
    "backbones": {},  # name: weights file, or null for a random initialisation of `model`
    "seed": 0,
    "data": {"train": None, "val": None, "val_labels": None, "image_size": 224, "resize": 256,
             "batch_size": 64, "num_workers": 4},
    "features": {"dtype": "float16", "unit_size": 1024},
    "knn": {"k": [10, 20, 100, 200], "temperature": 0.07, "index": "flat", "database_block": 1_000_000,
            "query_block": 16_384, "nlist": 1024, "nprobe": 32},
    "linear": {"lrs": [0.001, 0.01, 0.1], "weight_decays": [0.0, 1.0e-4, 1.0e-3], "epochs": 100, "batch_size": 256,
               "holdout": 0.2,
               # also the probe on the frozen network with augmentation (torchvision's SWAG recipe:
               # 28 epochs, SGD Nesterov 0.9, cosine from lr 0.001), a `wsl finetune` run per backbone
               "augmented": False, "augmented_epochs": 28, "augmented_lr": 0.001, "crop_scale": [0.08, 1.0]},
    "picture": {"queries": 8, "neighbours": 5, "size": 64},
    "wandb": {"project": "wsl-eval", "mode": "offline"},
}


def _check_pair(train: Features, val: Features) -> int:
    if train.meta["backbone"] != val.meta["backbone"]:
        raise WslError(f"train features are of {train.meta['backbone']}, val features of {val.meta['backbone']}")
    if train.meta["classes"] != val.meta["classes"]:
        raise WslError(f"train ({train.meta['source']}) and val ({val.meta['source']}) have different class lists")
    if train.meta["classes"]:
        return len(train.meta["classes"])
    return int(max(train.labels.max(), val.labels.max())) + 1


def evaluate_backbone(name: str, weights: str | None, config: dict) -> dict:
    """Extract (or reuse) the features of one backbone, then kNN and the linear probe."""
    data, run_dir = config["data"], Path(config["run_dir"])
    common = dict(image_size=data["image_size"], resize=data["resize"], batch_size=data["batch_size"],
                  num_workers=data["num_workers"], dtype=config["features"]["dtype"],
                  unit_size=config["features"]["unit_size"], seed=config["seed"])
    if not data["train"] or not data["val"]:
        raise WslError("the config needs data.train and data.val")
    started = time.time()
    train_dir = extract_features(data["train"], run_dir / "features" / name / "train", config["model"], weights, **common)
    train = load_features(train_dir)
    val_dir = extract_features(data["val"], run_dir / "features" / name / "val", config["model"], weights,
                               classes=train.meta["classes"], labels_file=data["val_labels"], **common)
    val = load_features(val_dir)
    num_classes = _check_pair(train, val)
    extracted = time.time()
    knn_options = {key: config["knn"][key] for key in ("index", "database_block", "query_block", "nlist", "nprobe")}
    knn, neighbours = knn_classify(train.features, train.labels, val.features, val.labels, num_classes,
                                   tuple(config["knn"]["k"]), config["knn"]["temperature"], **knn_options)
    searched = time.time()
    linear = linear_probe(train.features, train.labels, val.features, val.labels, num_classes,
                          tuple(config["linear"]["lrs"]), tuple(config["linear"]["weight_decays"]),
                          config["linear"]["epochs"], config["linear"]["batch_size"], config["linear"]["holdout"],
                          config["seed"])
    if config["linear"]["augmented"]:
        linear["augmented"] = _augmented_probe(name, weights, config)
    return {
        "weights": weights, "backbone": train.meta["backbone"], "train_images": len(train.labels),
        "val_images": len(val.labels), "classes": num_classes,
        "knn": {str(k): v for k, v in knn.items()}, "linear": linear,
        "seconds": {"features": extracted - started, "knn": searched - extracted, "linear": time.time() - searched},
        "_neighbours": neighbours, "_train": train, "_val": val,
    }


def _augmented_probe(name: str, weights: str | None, config: dict) -> dict:
    """The classifier of the frozen network trained with augmentation (a `wsl finetune` run)."""
    from wsl.finetune import DEFAULTS as FINETUNE_DEFAULTS
    from wsl.finetune import run_finetuning
    from wsl.run import merge

    data, linear = config["data"], config["linear"]
    probe = merge(FINETUNE_DEFAULTS, {
        "run_dir": str(Path(config["run_dir"]) / f"probe-{name}"), "model": config["model"], "weights": weights,
        "freeze_backbone": True, "epochs": linear["augmented_epochs"], "seed": config["seed"],
        "data": {key: data[key] for key in ("train", "val", "val_labels", "image_size", "resize", "batch_size", "num_workers")}
                | {"crop_scale": linear["crop_scale"]},
        "optim": {"base_lr": linear["augmented_lr"] * 256 / data["batch_size"], "nesterov": True, "weight_decay": 0.0,
                  "schedule": "cosine"},
        "wandb": config["wandb"],
    })
    metrics = run_finetuning(probe)["metrics"]
    return {"top1": metrics["val/top1"], "top5": metrics["val/top5"], "run_dir": probe["run_dir"]}


def neighbour_picture(train: Features, val: Features, neighbours: np.ndarray, path: Path, queries: int = 8,
                      per_query: int = 5, size: int = 64) -> Path | None:
    """A grid: each row a val image (framed) and its nearest train images, green when their
    class is the query's, red when not. Needs image folders (keys are relative paths)."""
    roots = [Path(f.meta["source"]) for f in (train, val)]
    if not all(root.is_dir() for root in roots):
        return None

    def tile(root: Path, key: str) -> Image.Image:
        found = next(iter(sorted((root / key).parent.glob(Path(key).name + ".*"))), None)
        image = Image.open(found).convert("RGB") if found else Image.new("RGB", (size, size))
        return image.resize((size, size))

    picks = np.linspace(0, len(val.keys) - 1, min(queries, len(val.keys))).astype(int)
    pad = 4
    grid = Image.new("RGB", ((per_query + 1) * (size + pad) + pad, len(picks) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for row, query in enumerate(picks):
        y = pad + row * (size + pad)
        grid.paste(tile(roots[1], str(val.keys[query])), (pad, y))
        draw.rectangle([pad - 2, y - 2, pad + size + 1, y + size + 1], outline="black", width=2)
        for col, neighbour in enumerate(neighbours[query, :per_query], 1):
            x = pad + col * (size + pad)
            grid.paste(tile(roots[0], str(train.keys[neighbour])), (x, y))
            colour = "green" if train.labels[neighbour] == val.labels[query] else "red"
            draw.rectangle([x - 2, y - 2, x + size + 1, y + size + 1], outline=colour, width=2)
    grid.save(path)
    return path


def summary_table(results: dict) -> str:
    """One screen: a row per backbone, kNN top-1 at every k and the linear probe's top-1/top-5, in per cent."""
    ks = sorted({int(k) for result in results.values() for k in result["knn"]})
    augmented = any("augmented" in result["linear"] for result in results.values())
    header = (f"{'backbone':<22}" + "".join(f"{f'kNN k={k}':>10}" for k in ks) + f"{'linear top-1':>14}{'linear top-5':>14}"
              + (f"{'augm. linear top-1':>20}" if augmented else ""))
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        cells = "".join(f"{100 * result['knn'][str(k)]['top1']:>10.1f}" if str(k) in result["knn"] else f"{'-':>10}" for k in ks)
        extra = f"{100 * result['linear']['augmented']['top1']:>20.1f}" if augmented else ""
        lines.append(f"{name:<22}{cells}{100 * result['linear']['top1']:>14.1f}{100 * result['linear']['top5']:>14.1f}{extra}")
    return "\n".join(lines + ["(top-1 %, val set; kNN votes weighted by exp(cosine / T); the linear probe's lr and weight decay "
                               "chosen on a split of train)"])


def run_eval(config: dict) -> dict:
    """Evaluate every backbone of `config`; write report.json, the neighbour pictures and W&B."""
    if not config["backbones"]:
        raise WslError("the config needs backbones: {name: weights file or null}")
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    results, pictures = {}, {}
    for name, weights in config["backbones"].items():
        result = evaluate_backbone(name, weights, config)
        picture = neighbour_picture(result.pop("_train"), result.pop("_val"), result.pop("_neighbours"),
                                    run_dir / f"neighbours-{name}.png", config["picture"]["queries"],
                                    config["picture"]["neighbours"], config["picture"]["size"])
        if picture is not None:
            pictures[name] = picture
            result["picture"] = str(picture)
        results[name] = result
    report = {"model": config["model"], "data": config["data"], "results": results}
    report_file = run_dir / "report.json"
    report_file.write_text(json.dumps(report, indent=1) + "\n")
    return report | {"table": summary_table(results), "report_file": str(report_file),
                     "pictures": [str(p) for p in pictures.values()], "wandb_dir": _log_to_wandb(config, results, pictures)}


def _log_to_wandb(config: dict, results: dict, pictures: dict) -> str:
    if config["wandb"]["mode"] == "disabled":
        return ""
    import wandb

    run = wandb.init(project=config["wandb"]["project"], dir=str(config["run_dir"]), mode=config["wandb"]["mode"],
                     config={k: v for k, v in config.items() if k != "wandb"}, job_type="eval")
    for name, result in results.items():
        numbers = {f"{name}/knn_top1@k={k}": v["top1"] for k, v in result["knn"].items()}
        numbers |= {f"{name}/knn_top5@k={k}": v["top5"] for k, v in result["knn"].items()}
        numbers |= {f"{name}/linear_top1": result["linear"]["top1"], f"{name}/linear_top5": result["linear"]["top5"]}
        if name in pictures:
            numbers[f"{name}/neighbours"] = wandb.Image(str(pictures[name]), caption="val query | nearest train images")
        run.log(numbers)
    run.summary.update({f"{n}/linear_top1": r["linear"]["top1"] for n, r in results.items()})
    directory = run.dir
    run.finish()
    return str(Path(directory).parent)
