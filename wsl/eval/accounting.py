"""What an evaluation number must account for: evaluation images whose copies were found in the
pretraining data (the paper's "lower-bound accuracy" counts them as errors), and ImageNet's
ReaL labels (Beyer et al. 2020), the relabelled val set the WSL models are compared on."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from wsl.errors import WslError

IMAGENET_VAL_KEY = re.compile(r"ILSVRC2012_val_(\d{8})$")


def copied_evaluation_keys(reports: list[str]) -> set[str]:
    """The evaluation images `wsl dedup` reports found copied in pretraining data, as the
    evaluation readers key them: a folder image by its path under the folder without extension
    (`n01440764/ILSVRC2012_val_00000293`; dedup names it `val/n01440764/...`), a shard sample
    by its key (dedup: `shard.tar:key`)."""
    keys: set[str] = set()
    for report in reports:
        path = Path(report)
        if not path.is_file():
            raise WslError(f"dedup report not found: {report}")
        try:
            shards = json.loads(path.read_text())["shards"]
            matches = [copy["match"] for shard in shards.values() for copy in shard["copies"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WslError(f"{report} is not a `wsl dedup` report (dedup_report.json)") from None
        keys |= {match.split(":", 1)[1] if ":" in match else match.split("/", 1)[-1] for match in matches}
    return keys


def real_labels(classes: list[str] | None) -> list[list[int]] | None:
    """ImageNet ReaL labels (timm ships `imagenet_real_labels.json`: for val image n, the list at
    n - 1, class indices in sorted-wnid order), when `classes` are ImageNet-1k's 1,000 in that
    order; otherwise None (another dataset, or classes the labels do not index)."""
    if classes is None or len(classes) != 1000:
        return None
    from importlib.resources import files

    from timm.data import ImageNetInfo

    if list(classes) != ImageNetInfo("imagenet-1k").label_names():
        return None
    return json.loads((files("timm.data") / "_info" / "imagenet_real_labels.json").read_text())


def real_label_set(labels: list[list[int]], key: str) -> list[int] | None:
    """The ReaL labels of an ImageNet val image key (`.../ILSVRC2012_val_00000001`), or None
    when the key is not one of ImageNet's 50,000 val images."""
    match = IMAGENET_VAL_KEY.search(Path(key).name)
    if not match or not 1 <= int(match.group(1)) <= len(labels):
        return None
    return labels[int(match.group(1)) - 1]


class Accounting:
    """Beside plain top-1 on one val set: the lower-bound top-1 (val images that dedup reports
    found copied in pretraining count as errors) when reports are given, and ReaL top-1 when the
    classes are ImageNet-1k's. `counts` adds up over batches (and ranks); `rates` reports them.
    The same for fine-tuning's validation and for `wsl eval`'s kNN and linear probe."""

    COUNTS = ("lower_bound_correct", "copied", "real_correct", "real_images")

    def __init__(self, dedup_reports: Sequence[str] = (), classes: list[str] | None = None):
        self.copied = copied_evaluation_keys(list(dedup_reports))
        self.real = real_labels(classes)

    def counts(self, predicted: Sequence[int], labels: Sequence[int], keys: Sequence[str]) -> dict[str, float]:
        """Counts over one batch of top-1 predictions, their labels and the val images' keys."""
        correct = [int(p) == int(t) for p, t in zip(predicted, labels)]
        copied = [key in self.copied for key in keys]
        counts = {
            "lower_bound_correct": float(sum(c and not d for c, d in zip(correct, copied))),
            "copied": float(sum(copied)),
            "real_correct": 0.0,
            "real_images": 0.0,
        }
        if self.real is not None:
            real_sets = [real_label_set(self.real, key) for key in keys]
            scored = [(int(p), r) for p, r in zip(predicted, real_sets) if r]  # an empty ReaL set is left out
            counts["real_correct"] = float(sum(p in r for p, r in scored))
            counts["real_images"] = float(len(scored))
        return counts

    def rates(self, counts: dict[str, float], images: float) -> dict[str, float]:
        """The numbers to report: top1_lower_bound and copied_in_pretraining, real_top1 and real_images."""
        rates = {}
        if self.copied:
            rates["top1_lower_bound"] = float(counts["lower_bound_correct"]) / max(1.0, float(images))
            rates["copied_in_pretraining"] = float(counts["copied"])
        if self.real is not None and counts["real_images"] > 0:
            rates["real_top1"] = float(counts["real_correct"]) / float(counts["real_images"])
            rates["real_images"] = float(counts["real_images"])
        return rates

    def __call__(self, predicted: Sequence[int], labels: Sequence[int], keys: Sequence[str]) -> dict[str, float]:
        """`rates` of one whole val set's predictions."""
        return self.rates(self.counts(predicted, labels, keys), len(keys))
