"""Labelled image folders: ImageNet's class folders, or Kaggle's flat `val/` with
`LOC_val_solution.csv` (or any `image,class` CSV); `LabelledImageFolder` is their map-style
training set (Lightning's DistributedSampler shards it)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from wsl.data.bad_samples import DATA_ERRORS
from wsl.errors import WslError

log = logging.getLogger(__name__)

LABELS_FILE = "LOC_val_solution.csv"  # Kaggle's ImageNet: labels of the flat val/ folder
# torchvision's IMG_EXTENSIONS (a test keeps them equal), here so that reading a folder does not
# import torchvision: ~2 s of every `wsl dedup` run, whose evaluation folders need nothing else of it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_labels_file(path: Path) -> dict[str, str]:
    """Image name (no extension) -> class name, from Kaggle's `LOC_val_solution.csv`
    (`ImageId,PredictionString`; the class is the string's first token) or any `image,class` CSV."""
    labels = {}
    with open(path, newline="") as rows:
        for line, row in enumerate(csv.reader(rows), 1):
            if line == 1 and row[:1] == ["ImageId"]:
                continue
            if len(row) < 2 or not row[1].split():
                raise WslError(f"{path}:{line}: expected 'image,class ...', got {','.join(row)!r}")
            labels[Path(row[0]).stem] = row[1].split()[0]
    return labels


def _find_labels_file(folder: Path) -> Path | None:
    """`LOC_val_solution.csv` in the folder or up to four levels above it, where Kaggle puts it
    (`<root>/LOC_val_solution.csv` beside `<root>/ILSVRC/Data/CLS-LOC/val/`)."""
    return next((p / LABELS_FILE for p in [folder, *folder.parents][:5] if (p / LABELS_FILE).is_file()), None)


def labelled_images(
    root: str | Path, classes: list[str] | None = None, labels_file: str | Path | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, class index)]) of a labelled image folder.

    Class folders (`root/<class>/*.JPEG`, torchvision's ImageFolder layout), or flat images
    with a labels file (given, or Kaggle's found beside the folder). `classes` (the training
    set's) fixes the class indices; a folder whose classes differ from them is an error.
    """
    from torchvision.datasets.folder import find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise WslError(f"image folder not found: {root}")
    if any(entry.is_dir() for entry in root.iterdir()):
        found, _ = find_classes(str(root))
        if classes is not None and found != list(classes):
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise WslError(
                f"the classes of {root} differ from training's: {len(missing)} missing {missing[:3]}, "
                f"{len(extra)} not in training {extra[:3]}"
            )
        classes = found
        try:
            items = make_dataset(str(root), {name: i for i, name in enumerate(classes)}, extensions=IMAGE_EXTENSIONS)
        except FileNotFoundError as exn:  # a class folder without images
            raise WslError(f"no images in {root}: {str(exn).splitlines()[0]}") from None
    else:
        labels_path = Path(labels_file) if labels_file else _find_labels_file(root)
        if labels_path is None or not labels_path.is_file():
            raise WslError(
                f"{root} has no class folders and no labels file ({labels_file or LABELS_FILE} not found): "
                "set data.val_labels"
            )
        labels = read_labels_file(labels_path)
        classes = list(classes) if classes is not None else sorted(set(labels.values()))
        index = {name: i for i, name in enumerate(classes)}
        items = []
        for path in sorted(root.iterdir()):
            if not path.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            name = labels.get(path.stem)
            if name is None:
                raise WslError(f"{path.name} has no label in {labels_path}")
            if name not in index:
                raise WslError(f"{labels_path}: class '{name}' of {path.name} is not one of training's classes")
            items.append((str(path), index[name]))
    if not items:
        raise WslError(f"no images in {root}")
    return classes, items


def is_image_folder(source: str | Path) -> bool:
    """A folder of images (not of shards, not a shard spec)."""
    path = Path(str(source))
    return path.is_dir() and not any(path.glob("*.tar"))


def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, sorted (the one folder walker)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))


def image_key(path: str, root: Path) -> str:
    """A folder image's key: its path under the folder, without extension (`n01440764/x`)."""
    return str(Path(path).relative_to(root).with_suffix(""))


class LabelledImageFolder(torch.utils.data.Dataset):
    """Map-style training set of a labelled folder: {"key", "image", "label"}, or None for a
    corrupt image (`collate_labelled` drops and counts it)."""

    def __init__(self, root: str | Path, items: list[tuple[str, int]], transform):
        self.root = Path(root)
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict | None:
        path, label = self.items[index]
        try:
            return {"key": image_key(path, self.root), "image": self.transform(Path(path).read_bytes()), "label": label}
        except DATA_ERRORS as exn:
            log.warning("skipped corrupt image %s: %s", path, exn)
            return None


def collate_labelled(samples: list[dict | None]) -> dict:
    """Batch of labelled samples; `skipped` counts the corrupt images left out."""
    kept = [s for s in samples if s is not None]
    return {
        "image": torch.stack([s["image"] for s in kept]) if kept else torch.empty(0, 3, 1, 1),
        "target": torch.tensor([s["label"] for s in kept], dtype=torch.long),
        "key": [s["key"] for s in kept],
        "skipped": len(samples) - len(kept),
    }
