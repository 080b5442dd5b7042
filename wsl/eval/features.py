"""Frozen-backbone features on disk: every image of a dataset once, in resumable parts.

A dataset (image folder or shards) is cut into units: one per shard, or blocks of
`unit_size` images of a folder. Unit u belongs to rank u % world_size; within a rank the
DataLoader workers share its units. Each unit is written when complete as
`part-NNNNNN.npz` (features, labels, keys, the backbone's id), through a temporary file and
a rename, so an interrupted extraction re-run skips the parts that exist and never holds a
half part. `meta.json` says how many parts make the whole; `load_features` refuses an
incomplete set or parts from two different backbones.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from wsl.config import REQUIRED, option, require_file
from wsl.data.bad_samples import DATA_ERRORS, SkipCounter
from wsl.data.folders import image_key, is_image_folder, labelled_images
from wsl.data.shards import expand_shard_spec, read_shard_samples, sample_image_bytes
from wsl.data.transforms import EvalTransform
from wsl.distributed import dataloader_worker, distributed_rank, local_device
from wsl.errors import WslError
from wsl.files import write_atomic, write_json
from wsl.models import ResNeXt, build_model, model_name_problem
from wsl.parts import PartKeys, this_part
from wsl.release.checkpoints import file_sha256, load_weights

FORMAT = "wsl-features-1"
# The forward pass's type: float32 by default, as DINO extracts; bfloat16 autocast is faster on a GPU.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def backbone_id(model: str, weights: str | None, seed: int = 0) -> str:
    """What identifies a backbone's features: the architecture and the weights file's SHA-256
    (or the seed of a random initialisation)."""
    return f"{model}:{file_sha256(Path(weights))[:16] if weights else f'random-init-seed{seed}'}"


def frozen_backbone(model: str, weights: str | None, seed: int = 0) -> tuple[ResNeXt, str]:
    """The network in eval mode (its `forward_features` gives the pooled 2048-d features) and a report line."""
    torch.manual_seed(seed)
    net = build_model(model, num_classes=1)
    report = load_weights(net, weights, model, head="new") if weights else f"random initialisation (seed {seed})"
    return net.eval().requires_grad_(False), report


@dataclass
class _Unit:
    index: int
    items: list[tuple[str, int]] | None = None  # folder: (path, label)
    url: str | None = None  # shards: one shard


class _UnitImages(IterableDataset):
    """This rank's unfinished units, split among workers; yields one batch at a time with its unit
    and a flag on the unit's last batch. Corrupt images are skipped and counted."""

    def __init__(self, units: list[_Unit], root: Path | None, transform, batch_size: int):
        self.units, self.root, self.transform, self.batch_size = units, root, transform, batch_size

    def _samples(self, unit: _Unit) -> Iterator[tuple[str, bytes | None, int]]:
        if unit.items is not None:
            for path, label in unit.items:
                yield image_key(path, self.root), path, label
            return
        for sample in read_shard_samples([unit.url]):
            yield sample["__key__"], sample, int(sample["cls"]) if "cls" in sample else -1

    def __iter__(self) -> Iterator[dict]:
        worker, workers = dataloader_worker()
        counter = SkipCounter(every=100)
        for unit in self.units[worker::workers]:
            images, keys, labels = [], [], []
            for key, source, label in self._samples(unit):
                try:
                    data = Path(source).read_bytes() if isinstance(source, str) else sample_image_bytes(source)
                    images.append(self.transform(data))
                except DATA_ERRORS as exn:
                    counter.skip("corrupt_image", exn, key)
                    continue
                keys.append(key)
                labels.append(label)
                if len(images) == self.batch_size:
                    yield {
                        "unit": unit.index,
                        "image": torch.stack(images),
                        "key": keys,
                        "label": labels,
                        "last": False,
                    }
                    images, keys, labels = [], [], []
            yield {
                "unit": unit.index,
                "image": torch.stack(images) if images else torch.empty(0, 3, 1, 1),
                "key": keys,
                "label": labels,
                "last": True,
                "skipped": counter.counts["corrupt_image"],
            }


def _units(
    source: str, classes: list[str] | None, labels_file: str | None, unit_size: int
) -> tuple[list[_Unit], list[str] | None, Path | None]:
    if is_image_folder(source):
        classes, items = labelled_images(source, classes, labels_file)
        blocks = range(0, len(items), unit_size)
        return (
            [_Unit(i, items=items[start : start + unit_size]) for i, start in enumerate(blocks)],
            classes,
            Path(source),
        )
    urls = expand_shard_spec(source)
    return [_Unit(i, url=url) for i, url in enumerate(urls)], classes, None


def extract_features(
    source: str,
    out: str | Path,
    model: str,
    weights: str | None,
    *,
    classes: list[str] | None = None,
    labels_file: str | None = None,
    image_size: int = 224,
    resize: int = 256,
    batch_size: int = 64,
    num_workers: int = 4,
    dtype: str = "float16",
    precision: str = "float32",
    unit_size: int = 1024,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the features of every image of `source` under `out` (this rank's share); returns `out`."""
    if dtype not in ("float16", "float32"):
        raise WslError(f"features dtype must be float16 or float32, not {dtype}")
    if precision not in COMPUTE_DTYPES:
        raise WslError(f"features precision must be one of {', '.join(COMPUTE_DTYPES)}, not {precision}")
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    units, classes, root = _units(source, classes, labels_file, unit_size)
    if not units:
        raise WslError(f"no images in {source}")
    ident = backbone_id(model, weights, seed)
    meta = {
        "format": FORMAT,
        "backbone": ident,
        "model": model,
        "weights": weights,
        "source": str(source),
        "classes": classes,
        "parts": len(units),
        "dtype": dtype,
        "precision": precision,
        "image_size": image_size,
        "resize": resize,
    }
    meta_file = out / "meta.json"
    if meta_file.is_file():
        previous = json.loads(meta_file.read_text())
        if previous.get("backbone") != ident or previous.get("source") != str(source):
            raise WslError(
                f"{out} holds features of {previous.get('backbone')} on {previous.get('source')}, "
                f"not {ident} on {source}: use another folder"
            )
    else:  # by any rank or part that finds it missing (the same bytes), through a rename: another may be reading it
        write_json(meta_file, meta)
    todo = [u for u in units[rank::world_size] if not (out / f"part-{u.index:06d}.npz").is_file()]
    if not todo:
        return out
    net, report = frozen_backbone(model, weights, seed)
    device = local_device()
    net = net.to(device)
    loader = torch.utils.data.DataLoader(
        _UnitImages(todo, root, EvalTransform(image_size, resize), batch_size),
        batch_size=None,
        num_workers=min(num_workers, len(todo)),
        pin_memory=device.type == "cuda",
    )
    pending: dict[int, dict[str, list]] = {}
    images_done, started = 0, time.time()
    total = sum(len(u.items) for u in todo) if root is not None else None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=f"features {Path(str(source)).name} (rank {rank}/{world_size})")
    autocast = torch.autocast(device.type, dtype=COMPUTE_DTYPES[precision], enabled=precision != "float32")
    with torch.inference_mode(), autocast:
        for batch in loader:
            part = pending.setdefault(batch["unit"], {"features": [], "label": [], "key": []})
            if len(batch["key"]):
                features = net.forward_features(batch["image"].to(device, non_blocking=True)).float().cpu().numpy()
                part["features"].append(features.astype(dtype))
                part["label"] += batch["label"]
                part["key"] += batch["key"]
                images_done += len(batch["key"])
                if bar is not None:
                    bar.update(len(batch["key"]))
                    bar.set_postfix(images_per_sec=f"{images_done / (time.time() - started):.0f}")
            if batch["last"]:
                _write_part(out / f"part-{batch['unit']:06d}.npz", pending.pop(batch["unit"]), ident, dtype)
    if bar is not None:
        bar.close()
    return out


def _write_part(path: Path, part: dict[str, list], ident: str, dtype: str) -> None:
    features = np.concatenate(part["features"]) if part["features"] else np.zeros((0, 0), dtype)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:  # a file object: np.savez would add ".npz" to a name
            np.savez(
                stream,
                features=features,
                label=np.asarray(part["label"], np.int64),
                key=np.asarray(part["key"], dtype=str),
                backbone=np.asarray(ident),
            )

    write_atomic(path, write)


@dataclass
class Features:
    features: np.ndarray  # [n, d] as stored: float16 (the default) or float32
    labels: np.ndarray  # [n] int64
    keys: np.ndarray  # [n] str
    meta: dict


def load_features(folder: str | Path) -> Features:
    """All parts of an extraction, checked complete and from one backbone."""
    folder = Path(folder)
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise WslError(f"no features in {folder} (meta.json missing): run the extraction first")
    meta = json.loads(meta_file.read_text())
    paths = [folder / f"part-{i:06d}.npz" for i in range(meta["parts"])]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise WslError(
            f"{folder} is incomplete: {len(missing)} of {len(paths)} parts missing ({missing[0]}...): "
            "re-run the extraction to finish it"
        )
    features, labels, keys = [], [], []
    for path in paths:
        with np.load(path, allow_pickle=False) as part:
            if str(part["backbone"]) != meta["backbone"]:
                raise WslError(
                    f"{path} holds features of backbone {part['backbone']}, the rest of {folder} of "
                    f"{meta['backbone']}: features from two backbones cannot be mixed"
                )
            if len(part["key"]):
                features.append(part["features"])  # as stored (float16 by default): half the memory
                labels.append(part["label"])
                keys.append(part["key"])
    if not features:
        raise WslError(f"{folder} holds no features (every image was unreadable, or the dataset is empty)")
    return Features(np.concatenate(features), np.concatenate(labels), np.concatenate(keys), meta)


@dataclass
class Config(PartKeys):
    """`wsl features`: pooled features of a frozen backbone for every image of a dataset, written in parts
    under `out`. On many GPUs run one process per GPU (torchrun): each writes its share, every image once.
    In a job array, part=I parts=N writes units I mod N (and torchrun inside a task is not needed);
    `merge=true` checks that every unit is there. Re-running finishes an interrupted extraction."""

    source: str = option(REQUIRED, "image folder (class folders, or flat + labels file) or shards")
    out: str = option(REQUIRED, "features folder (meta.json + part-NNNNNN.npz)")
    model: str = option(REQUIRED, "architecture, e.g. resnext101_32x8d", check=model_name_problem)
    weights: str | None = option(None, "checkpoint (.ckpt, .pth, .safetensors); null: a random initialisation")
    val_labels: str | None = option(None, "labels file of a flat folder (null: LOC_val_solution.csv, found)")
    image_size: int = option(224, "CenterCrop side", minimum=8)
    resize: int = option(256, "shorter side before the center crop", minimum=8)
    batch_size: int = option(64, "images per forward pass", minimum=1)
    workers: int = option(min(os.cpu_count() or 1, 8), "DataLoader workers", minimum=0)
    dtype: str = option("float16", "stored feature type", choices=("float16", "float32"))
    precision: str = option(
        "float32", "the forward pass's type (bfloat16: autocast, faster on a GPU)", choices=tuple(COMPUTE_DTYPES)
    )
    unit_size: int = option(1024, "images a part, for folders", minimum=1)
    seed: int = option(0, "seed of a random initialisation")


def main(config: Config) -> str:
    if config.merge:
        features = load_features(config.out)
        return f"every part is there: {len(features.labels)} features ({features.meta['backbone']}) in {config.out}"
    if config.weights:
        require_file(config.weights, "weights", "weights file")
    part = this_part(config)
    rank, world_size = part if part is not None else distributed_rank()
    out = extract_features(
        config.source,
        config.out,
        config.model,
        config.weights,
        labels_file=config.val_labels,
        image_size=config.image_size,
        resize=config.resize,
        batch_size=config.batch_size,
        num_workers=config.workers,
        dtype=config.dtype,
        precision=config.precision,
        unit_size=config.unit_size,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
    )
    if part is not None:
        return f"part {part[0]} of {part[1]} written to {out}; when every part has finished: merge=true"
    if rank != 0:
        return ""
    try:
        features = load_features(out)
    except WslError as exn:  # other ranks are still writing their parts
        return f"this rank's parts are written; {exn}"
    return (
        f"{len(features.labels)} features of {features.features.shape[1]} dims ({features.meta['backbone']}) in {out}"
    )
