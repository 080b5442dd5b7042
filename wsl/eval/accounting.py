"""What an evaluation number must account for: evaluation images whose copies were found in the
pretraining data (the paper's "lower-bound accuracy" counts them as errors), and ImageNet's
ReaL labels (Beyer et al. 2020), the relabelled val set the WSL models are compared on."""

from __future__ import annotations

import json
import re
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
    from importlib.resources import files

    from timm.data import ImageNetInfo

    if classes is None or list(classes) != ImageNetInfo("imagenet-1k").label_names():
        return None
    return json.loads((files("timm.data") / "_info" / "imagenet_real_labels.json").read_text())


def real_label_set(labels: list[list[int]], key: str) -> list[int] | None:
    """The ReaL labels of an ImageNet val image key (`.../ILSVRC2012_val_00000001`), or None
    when the key is not one of ImageNet's 50,000 val images."""
    match = IMAGENET_VAL_KEY.search(Path(key).name)
    if not match or not 1 <= int(match.group(1)) <= len(labels):
        return None
    return labels[int(match.group(1)) - 1]
