"""`wsl eval`: kNN and linear-probe accuracy of frozen backbones, side by side.

For each backbone of the config (a checkpoint any loader of `wsl.release.checkpoints` accepts, or
null for a random initialisation of the same architecture) the train and val sets are
mapped to pooled features (`wsl.eval.features`, cached under run_dir/features and resumable),
then classified by FAISS kNN (`wsl.eval.knn`) and by a linear probe (`wsl.eval.linear_probe`). The
numbers go to run_dir/report.json, W&B (offline by default) and a table on screen; a picture
of val queries with their nearest train images is saved beside the report and logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsl.config import REQUIRED, WandbConfig, option, require_file, section, to_dict, to_yaml
from wsl.data.shards import expand_shard_spec
from wsl.data.stream import crop_scale_problem
from wsl.errors import WslError
from wsl.eval.accounting import Accounting
from wsl.eval.features import Features, extract_features, load_features
from wsl.eval.knn import knn_classify
from wsl.eval.linear_probe import linear_probe
from wsl.files import write_atomic, write_json
from wsl.models import model_name_problem
from wsl.pictures import image_grid


@dataclass
class EvalDataConfig:
    """The `data:` section: a labelled train/val pair (what `wsl finetune` reads)."""

    train: str = option(REQUIRED, "class folders, a flat folder with a labels file, or labelled shards")
    val: str = option(REQUIRED, "the same layouts as train")
    val_labels: str | None = option(None, "labels of a flat val folder; null: Kaggle's LOC_val_solution.csv, found")
    image_size: int = option(224, "CenterCrop side", minimum=8)
    resize: int = option(256, "shorter side before the center crop", minimum=8)
    batch_size: int = option(64, "images per forward pass", minimum=1)
    num_workers: int = option(4, "DataLoader workers", minimum=0)


@dataclass
class FeaturesSection:
    dtype: str = option("float16", "stored feature type", choices=("float16", "float32"))
    precision: str = option(
        "float32", "the forward pass's type (bfloat16: autocast, faster on a GPU)", choices=("float32", "bfloat16")
    )
    unit_size: int = option(1024, "images a part (folders): the unit of resuming", minimum=1)


@dataclass
class KnnConfig:
    k: list[int] = option([10, 20, 100, 200], "neighbours that vote (DINO's weighted kNN), each a row", minimum=1)
    temperature: float = option(0.07, "votes weighted by exp(cosine / temperature)", above=0)
    index: str = option("flat", "flat: exact; ivf: FAISS IVF for large train sets", choices=("flat", "ivf"))
    database_block: int = option(1_000_000, "train features searched at a time", minimum=1)
    query_block: int = option(16_384, "val features searched at a time", minimum=1)
    nlist: int = option(1024, "IVF lists", minimum=1)
    nprobe: int = option(32, "IVF lists searched per query", minimum=1)


@dataclass
class LinearConfig:
    lrs: list[float] = option([0.001, 0.01, 0.1], "lr grid (chosen on a held-out split of train)", above=0)
    weight_decays: list[float] = option([0.0, 1.0e-4, 1.0e-3], "weight-decay grid", minimum=0)
    epochs: int = option(100, "epochs of each probe", minimum=1)
    batch_size: int = option(256, "features per step", minimum=1)
    holdout: float = option(
        0.2, "share of train held out to choose the grid point", above=0, check=lambda v: None if v < 1 else "< 1"
    )
    augmented: bool = option(
        False,
        "also the probe on the frozen network with augmentation (a `wsl finetune` run "
        "per backbone; torchvision's SWAG recipe)",
    )
    augmented_epochs: int = option(28, "epochs of the augmented probe", minimum=1)
    augmented_lr: float = option(0.001, "lr of the augmented probe (SGD Nesterov 0.9, cosine)", above=0)
    crop_scale: tuple[float, float] = option(
        (0.08, 1.0), "the augmented probe's RandomResizedCrop area range", check=crop_scale_problem
    )


@dataclass
class PictureConfig:
    queries: int = option(8, "val queries shown", minimum=0)
    neighbours: int = option(5, "nearest train images beside each", minimum=1)
    size: int = option(64, "tile side in pixels", minimum=8)


@dataclass
class Config:
    """`wsl eval`: kNN (FAISS) and linear-probe accuracy of frozen backbones, side by side."""

    run_dir: str = option("runs/eval", "report.json, pictures, cached features and W&B files")
    model: str = option("resnext101_32x8d", "registry model of every backbone", check=model_name_problem)
    backbones: dict[str, str | None] = option({}, "name: weights file, or null for a random initialisation of model")
    dedup_reports: list[str] = option(
        [], "`wsl dedup` reports: val images found copied in pretraining count as errors (lower-bound top-1)"
    )
    seed: int = option(0, "seed of random initialisations and the probe")
    data: EvalDataConfig = section(EvalDataConfig, "labelled train and val sets")
    features: FeaturesSection = section(FeaturesSection, "feature extraction")
    knn: KnnConfig = section(KnnConfig, "kNN classification")
    linear: LinearConfig = section(LinearConfig, "linear probe")
    picture: PictureConfig = section(PictureConfig, "the picture of val queries and their neighbours")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases logging")


def _check_pair(train: Features, val: Features) -> int:
    if train.meta["backbone"] != val.meta["backbone"]:
        raise WslError(f"train features are of {train.meta['backbone']}, val features of {val.meta['backbone']}")
    if train.meta["classes"] != val.meta["classes"]:
        raise WslError(f"train ({train.meta['source']}) and val ({val.meta['source']}) have different class lists")
    if train.meta["classes"]:
        return len(train.meta["classes"])
    return int(max(train.labels.max(), val.labels.max())) + 1


def evaluate_backbone(name: str, weights: str | None, config: Config) -> dict:
    """Extract (or reuse) the features of one backbone, then kNN and the linear probe."""
    data, run_dir, knn_config, linear_config = config.data, Path(config.run_dir), config.knn, config.linear
    common = dict(
        image_size=data.image_size,
        resize=data.resize,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        dtype=config.features.dtype,
        precision=config.features.precision,
        unit_size=config.features.unit_size,
        seed=config.seed,
    )
    started = time.time()
    train_dir = extract_features(data.train, run_dir / "features" / name / "train", config.model, weights, **common)
    train = load_features(train_dir)
    val_dir = extract_features(
        data.val,
        run_dir / "features" / name / "val",
        config.model,
        weights,
        classes=train.meta["classes"],
        labels_file=data.val_labels,
        **common,
    )
    val = load_features(val_dir)
    num_classes = _check_pair(train, val)
    accounting = Accounting(config.dedup_reports, train.meta["classes"])
    val_keys = [str(key) for key in val.keys]

    def account(predicted: np.ndarray) -> dict[str, float]:
        return accounting(predicted, val.labels, val_keys)

    extracted = time.time()
    knn, neighbours = knn_classify(
        train.features,
        train.labels,
        val.features,
        val.labels,
        num_classes,
        tuple(knn_config.k),
        knn_config.temperature,
        index=knn_config.index,
        database_block=knn_config.database_block,
        query_block=knn_config.query_block,
        nlist=knn_config.nlist,
        nprobe=knn_config.nprobe,
        account=account,
    )
    searched = time.time()
    linear = linear_probe(
        train.features,
        train.labels,
        val.features,
        val.labels,
        num_classes,
        tuple(linear_config.lrs),
        tuple(linear_config.weight_decays),
        linear_config.epochs,
        linear_config.batch_size,
        linear_config.holdout,
        config.seed,
        account=account,
    )
    if linear_config.augmented:
        linear["augmented"] = _augmented_probe(name, weights, config)
    return {
        "weights": weights,
        "backbone": train.meta["backbone"],
        "train_images": len(train.labels),
        "val_images": len(val.labels),
        "classes": num_classes,
        "knn": {str(k): v for k, v in knn.items()},
        "linear": linear,
        "seconds": {"features": extracted - started, "knn": searched - extracted, "linear": time.time() - searched},
        "_neighbours": neighbours,
        "_train": train,
        "_val": val,
    }


def augmented_probe_config(name: str, weights: str | None, config: Config):
    """The `wsl finetune` config of the augmented probe: the frozen network's classifier trained
    with augmentation (torchvision's SWAG recipe), on one device: a multi-device launcher would
    re-run the whole `wsl eval` command in every extra process."""
    from wsl.train.finetune import Config as FinetuneConfig
    from wsl.train.finetune import FinetuneDataConfig, FinetuneOptimConfig
    from wsl.train.runner import TrainerConfig

    data, linear = config.data, config.linear
    return FinetuneConfig(
        run_dir=str(Path(config.run_dir) / f"probe-{name}"),
        model=config.model,
        weights=weights,
        freeze_backbone=True,
        epochs=linear.augmented_epochs,
        seed=config.seed,
        data=FinetuneDataConfig(
            train=data.train,
            val=data.val,
            val_labels=data.val_labels,
            image_size=data.image_size,
            resize=data.resize,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            crop_scale=linear.crop_scale,
        ),
        optim=FinetuneOptimConfig(
            base_lr=linear.augmented_lr * 256 / data.batch_size, nesterov=True, weight_decay=0.0, schedule="cosine"
        ),
        trainer=TrainerConfig(devices=1, strategy="auto", num_nodes=1),
        wandb=config.wandb,
    )


def _augmented_probe(name: str, weights: str | None, config: Config) -> dict:
    from wsl.train.finetune import run_finetuning

    probe = augmented_probe_config(name, weights, config)
    metrics = run_finetuning(probe)["metrics"]
    return {"top1": metrics["val/top1"], "top5": metrics["val/top5"], "run_dir": probe.run_dir}


def neighbour_picture(
    train: Features,
    val: Features,
    neighbours: np.ndarray,
    path: Path,
    queries: int = 8,
    per_query: int = 5,
    size: int = 64,
) -> Path | None:
    """A grid: each row a val image (framed) and its nearest train images, green when their
    class is the query's, red when not. Needs image folders (keys are relative paths)."""
    roots = [Path(f.meta["source"]) for f in (train, val)]
    if not all(root.is_dir() for root in roots):
        return None

    def tile(root: Path, key: str) -> Image.Image:
        found = next(iter(sorted((root / key).parent.glob(Path(key).name + ".*"))), None)
        return Image.open(found) if found else Image.new("RGB", (size, size))

    picks = np.linspace(0, len(val.keys) - 1, min(queries, len(val.keys))).astype(int)
    rows = [
        [(tile(roots[1], str(val.keys[query])), "black")]
        + [
            (tile(roots[0], str(train.keys[n])), "green" if train.labels[n] == val.labels[query] else "red")
            for n in neighbours[query, :per_query]
        ]
        for query in picks
    ]
    return image_grid(rows, path, size)


def summary_table(results: dict) -> str:
    """One screen: a row per backbone, kNN top-1 at every k and the linear probe's top-1/top-5, in per cent."""
    ks = sorted({int(k) for result in results.values() for k in result["knn"]})
    augmented = any("augmented" in result["linear"] for result in results.values())
    header = (
        f"{'backbone':<22}"
        + "".join(f"{f'kNN k={k}':>10}" for k in ks)
        + f"{'linear top-1':>14}{'linear top-5':>14}"
        + (f"{'augm. linear top-1':>20}" if augmented else "")
    )
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        cells = "".join(
            f"{100 * result['knn'][str(k)]['top1']:>10.1f}" if str(k) in result["knn"] else f"{'-':>10}" for k in ks
        )
        extra = f"{100 * result['linear']['augmented']['top1']:>20.1f}" if augmented else ""
        lines.append(
            f"{name:<22}{cells}{100 * result['linear']['top1']:>14.1f}{100 * result['linear']['top5']:>14.1f}{extra}"
        )
    for name, result in results.items():
        lines += _accounted_lines(name, result, ks)
    return "\n".join(
        lines
        + [
            "(top-1 %, val set; kNN votes weighted by exp(cosine / T); the linear probe's lr and weight decay "
            "chosen on a split of train)"
        ]
    )


def _accounted_lines(name: str, result: dict, ks: list[int]) -> list[str]:
    """Lower-bound and ReaL top-1 of one backbone, when `Accounting` gave them."""
    rows = {f"kNN k={k}": result["knn"][str(k)] for k in ks if str(k) in result["knn"]} | {"linear": result["linear"]}
    lines = []
    for number, count, meaning in (
        ("top1_lower_bound", "copied_in_pretraining", "val images copied in pretraining count as errors"),
        ("real_top1", "real_images", "val images with ReaL labels"),
    ):
        if number in result["linear"]:
            label = "lower-bound top-1" if number == "top1_lower_bound" else "ReaL top-1"
            cells = ", ".join(f"{row} {100 * values[number]:.1f}" for row, values in rows.items() if number in values)
            lines.append(f"{name}: {label} {cells} ({result['linear'][count]:.0f} {meaning})")
    return lines


def run_eval(config: Config) -> dict:
    """Evaluate every backbone of `config`; write report.json, the neighbour pictures and W&B."""
    if not config.backbones:
        raise WslError("config key 'backbones' is empty: give {name: weights file or null}")
    for name, weights in config.backbones.items():
        if weights:
            require_file(weights, f"backbones.{name}", "weights file")
    for index, report in enumerate(config.dedup_reports):
        require_file(report, f"dedup_reports[{index}]", "dedup report")
    for value in (config.data.train, config.data.val):
        if not Path(value).is_dir():
            expand_shard_spec(value)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", to_yaml(config))
    results, pictures = {}, {}
    for name, weights in config.backbones.items():
        result = evaluate_backbone(name, weights, config)
        picture = neighbour_picture(
            result.pop("_train"),
            result.pop("_val"),
            result.pop("_neighbours"),
            run_dir / f"neighbours-{name}.png",
            config.picture.queries,
            config.picture.neighbours,
            config.picture.size,
        )
        if picture is not None:
            pictures[name] = picture
            result["picture"] = str(picture)
        results[name] = result
    report = {"model": config.model, "data": to_dict(config.data), "config": to_dict(config), "results": results}
    report_file = write_json(run_dir / "report.json", report)
    return report | {
        "table": summary_table(results),
        "report_file": str(report_file),
        "pictures": [str(p) for p in pictures.values()],
        "wandb_dir": _log_to_wandb(config, results, pictures),
    }


def _log_to_wandb(config: Config, results: dict, pictures: dict) -> str:
    if config.wandb.mode == "disabled":
        return ""
    import wandb

    run = wandb.init(
        project=config.wandb.project,
        dir=str(config.run_dir),
        mode=config.wandb.mode,
        config={k: v for k, v in to_dict(config).items() if k != "wandb"},
        job_type="eval",
    )
    for name, result in results.items():
        numbers = {f"{name}/knn_top1@k={k}": v["top1"] for k, v in result["knn"].items()}
        numbers |= {f"{name}/knn_top5@k={k}": v["top5"] for k, v in result["knn"].items()}
        numbers |= {f"{name}/linear_top1": result["linear"]["top1"], f"{name}/linear_top5": result["linear"]["top5"]}
        for number in ("top1_lower_bound", "real_top1"):  # when `Accounting` gave them
            numbers |= {f"{name}/knn_{number}@k={k}": v[number] for k, v in result["knn"].items() if number in v}
            if number in result["linear"]:
                numbers[f"{name}/linear_{number}"] = result["linear"][number]
        if name in pictures:
            numbers[f"{name}/neighbours"] = wandb.Image(str(pictures[name]), caption="val query | nearest train images")
        run.log(numbers)
    run.summary.update({f"{n}/linear_top1": r["linear"]["top1"] for n, r in results.items()})
    directory = run.dir
    run.finish()
    return str(Path(directory).parent)


def main(config: Config) -> str:
    report = run_eval(config)
    lines = [
        report["table"],
        f"report: {report['report_file']}; neighbour pictures: {', '.join(report['pictures']) or 'none (shards)'}",
    ]
    if report["wandb_dir"]:
        lines.append(f"W&B offline run: {report['wandb_dir']}  (upload with `wandb sync {report['wandb_dir']}`)")
    return "\n".join(lines)
