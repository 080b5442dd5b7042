"""The optimiser shared by pretraining and fine-tuning: SGD with momentum, the linear scaling
rule (lr = base_lr x global batch / 256, Goyal et al. 2017), a linear warm-up, then cosine or
step decay, stepped per optimizer step; no weight decay on batch-norm and bias parameters.
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
        "cosine", "after warm-up: cosine, or step (x step_gamma at step_milestones)", choices=("cosine", "step")
    )
    step_milestones: list[float] = option(
        [0.5, 0.75, 0.9], "fractions of the run where the step schedule decays", minimum=0
    )
    step_gamma: float = option(0.1, "the step schedule's factor", above=0)


def lr_factor(step: int, max_steps: int, config: OptimConfig) -> float:
    """Multiplier of the peak lr at an optimizer step: linear warm-up, then cosine or step decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.step_gamma ** sum(step >= m * max_steps for m in config.step_milestones)


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
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, max_steps, config))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
