"""The optimiser shared by pretraining and fine-tuning: SGD with momentum, the linear scaling
rule (lr = base_lr x global batch / 256, Goyal et al. 2017), a linear warm-up, then cosine,
step, or the paper's decay, stepped per optimizer step; no weight decay on batch-norm and
bias parameters.

The paper's schedule (`schedule: paper`, Mahajan et al. after Goyal et al.): the warm-up
starts at base_lr (the canonical lr for 256 images) and rises linearly to the peak,
base_lr x global batch / 256 (0.1 -> 3.15 at batch 8,064); after it the lr is multiplied by
`paper_factor` (0.5) at `paper_reductions` (13) equally spaced steps over the rest of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wsl.config import option


@dataclass
class OptimConfig:
    """The `optim:` section of a config."""

    base_lr: float = option(0.1, "lr per 256 images; peak lr = base_lr x global batch / 256 (Goyal et al.)", above=0)
    momentum: float = option(0.9, "SGD momentum", minimum=0)
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(1e-4, "weight decay", minimum=0)
    decay_norm_and_bias: bool = option(False, "weight decay on batch-norm and bias parameters too")
    warmup_steps: int = option(0, "steps of linear warm-up to the peak lr", minimum=0)
    schedule: str = option(
        "cosine",
        "after warm-up: cosine; step (x step_gamma at step_milestones); paper (warm-up from base_lr, then "
        "x paper_factor at paper_reductions equally spaced steps)",
        choices=("cosine", "step", "paper"),
    )
    step_milestones: list[float] = option(
        [0.5, 0.75, 0.9], "fractions of the run where the step schedule decays", minimum=0
    )
    step_gamma: float = option(0.1, "the step schedule's factor", above=0)
    paper_reductions: int = option(13, "the paper schedule: lr reductions after the warm-up", minimum=0)
    paper_factor: float = option(0.5, "the paper schedule: the factor of each reduction", above=0)


def lr_factor(step: int, max_steps: int, config: OptimConfig, global_batch: int = 256) -> float:
    """Multiplier of the peak lr at an optimizer step: linear warm-up, then the schedule's decay."""
    if step < config.warmup_steps:
        if config.schedule == "paper":  # from base_lr (the lr of 256 images) up to the peak
            start = min(1.0, 256 / global_batch)
            return start + (1 - start) * step / config.warmup_steps
        return (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "paper":  # the post-warm-up span cut into paper_reductions + 1 equal intervals
        interval = max(1, max_steps - config.warmup_steps) / (config.paper_reductions + 1)
        done = min(config.paper_reductions, int((step - config.warmup_steps) / interval))
        return config.paper_factor**done
    return config.step_gamma ** sum(step >= m * max_steps for m in config.step_milestones)


def paper_training_length(data_images: float, global_batch: int) -> tuple[int, int]:
    """(images processed, optimizer steps) the paper would train for on `data_images` images:
    it interpolates linearly between its two extremes, 120 epochs of 1.2M images (144M images
    processed) and 2 epochs of 3.5B images (7B), by the data size (RECIPE.md "Training length")."""
    (small, small_seen), (large, large_seen) = (1.2e6, 120 * 1.2e6), (3.5e9, 2 * 3.5e9)
    seen = small_seen + (data_images - small) * (large_seen - small_seen) / (large - small)
    return round(seen), math.ceil(seen / global_batch)


def configure_sgd(
    module: torch.nn.Module,
    config: OptimConfig,
    global_batch: int,
    max_steps: int,
    lr_scales: dict[str, float] | None = None,
) -> dict:
    """SGD over `module`'s trainable parameters and its per-step schedule, as Lightning's
    `configure_optimizers` returns them. `lr_scales` maps a parameter-name prefix to a multiplier
    of the lr (fine-tuning's lower backbone lr)."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        scale = next((s for prefix, s in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
        decay = config.weight_decay if param.ndim > 1 or config.decay_norm_and_bias else 0.0
        groups.setdefault((scale, decay), []).append(param)
    peak_lr = config.base_lr * global_batch / 256
    optimizer = torch.optim.SGD(
        [{"params": params, "lr": peak_lr * scale, "weight_decay": decay} for (scale, decay), params in groups.items()],
        lr=peak_lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, max_steps, config, global_batch)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
