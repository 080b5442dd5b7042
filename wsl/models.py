"""The model registry: ResNeXt 32xNd built by torchvision, so state dicts match torchvision,
WSL-Images and timm key for key.

Names are `resnext{depth}_{groups}x{width}d`: depth 101 with groups 32 and width 4, 8, 16, 32
or 48 are the paper's models; 26/50/152 are the other torchvision-style depths; 14 (one block
a stage) and narrow widths (`resnext14_8x4d`, `resnext26_32x2d`) are the small variants that
run on a CPU. The classifier head is sized by the vocabulary.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torchvision.models.resnet import Bottleneck, ResNet

from wsl.errors import WslError

STAGE_BLOCKS = {14: [1, 1, 1, 1], 26: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
PAPER_MODELS = [f"resnext101_32x{width}d" for width in (4, 8, 16, 32, 48)]
SMALL_MODELS = ["resnext14_8x4d", "resnext14_32x4d", "resnext26_32x2d", "resnext26_32x4d"]
NAME_PATTERN = f"resnext{{{','.join(map(str, STAGE_BLOCKS))}}}_GxWd"
_NAME = re.compile(r"^resnext(\d+)_(\d+)x(\d+)d$")


def list_models() -> list[str]:
    """Registered names (any `resnext{14,26,50,101,152}_GxWd` also builds)."""
    return PAPER_MODELS + SMALL_MODELS + [f"resnext{d}_32x{w}d" for d in (50, 152) for w in (4, 8)]


def model_name_problem(name: str) -> str | None:
    """What a model name must look like, if `name` is not a registry name (a config check)."""
    try:
        parse_model_name(name)
    except WslError:
        return f"a registry model name: {NAME_PATTERN}, e.g. {', '.join(PAPER_MODELS[:2])}"
    return None


def parse_model_name(name: str) -> tuple[list[int], int, int]:
    """(blocks per stage, groups, width per group) of a model name."""
    match = _NAME.match(name)
    if not match or int(match.group(1)) not in STAGE_BLOCKS:
        raise WslError(f"unknown model '{name}': use {NAME_PATTERN}, e.g. {', '.join(list_models())}")
    return STAGE_BLOCKS[int(match.group(1))], int(match.group(2)), int(match.group(3))


class ResNeXt(ResNet):
    """torchvision's ResNet (same modules, same state-dict keys) with `forward_features`."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier: [batch, 2048] whatever the width."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_model(
    name: str, num_classes: int, device: str | torch.device | None = None, zero_init_residual: bool = False
) -> ResNeXt:
    """torchvision's `ResNet(Bottleneck, blocks, groups=G, width_per_group=W)`; `device="meta"`
    builds it without memory (to count parameters of a 32x48d on a laptop). `zero_init_residual`:
    the last batch-norm gamma of every residual block starts at zero (Goyal et al., the paper's recipe)."""
    blocks, groups, width = parse_model_name(name)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return ResNeXt(
            Bottleneck,
            blocks,
            num_classes=num_classes,
            groups=groups,
            width_per_group=width,
            zero_init_residual=zero_init_residual,
        )


def count_parameters(name: str, num_classes: int = 1000) -> int:
    return sum(p.numel() for p in build_model(name, num_classes, device="meta").parameters())
