"""Linear probe on cached frozen features: lr and weight decay chosen on a split held out from
train (never on val), then the chosen setting retrained on all of train and reported on val.

A linear layer on standardised features (train mean and std), SGD momentum 0.9 with a cosine
schedule, cross-entropy; on a few thousand features a whole grid takes seconds on a CPU.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

from wsl.errors import WslError


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    xs = (x - mean) / std
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(linear(xs[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model = torch.nn.Sequential(_Standardise(mean, std), linear)
    return model.eval()


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    best = model(x).topk(min(k, model[1].out_features), dim=1).indices
    return float((best == y[:, None]).any(1).float().mean())


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    lrs: tuple[float, ...] = (0.001, 0.01, 0.1),
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3),
    epochs: int = 100,
    batch_size: int = 256,
    holdout: float = 0.2,
    seed: int = 0,
) -> dict:
    """Val top-1/top-5 of the linear classifier whose (lr, weight decay) did best on the held-out split."""
    if not 0 < holdout < 1:
        raise WslError(f"linear.holdout must be between 0 and 1, not {holdout}")
    x, y = (
        torch.from_numpy(np.asarray(train_features, np.float32)),
        torch.from_numpy(np.asarray(train_labels, np.int64)),
    )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(len(x) * holdout))
    held, fit = order[:cut], order[cut:]
    grid = {}
    torch.set_grad_enabled(True)
    for lr, weight_decay in itertools.product(lrs, weight_decays):
        model = _fit(x[fit], y[fit], num_classes, lr, weight_decay, epochs, batch_size, seed)
        grid[(lr, weight_decay)] = _accuracy(model, x[held], y[held], 1)
    lr, weight_decay = max(
        grid, key=lambda setting: (grid[setting], -setting[1], -setting[0])
    )  # ties: less decay, smaller lr
    model = _fit(x, y, num_classes, lr, weight_decay, epochs, batch_size, seed)
    xv, yv = torch.from_numpy(np.asarray(val_features, np.float32)), torch.from_numpy(np.asarray(val_labels, np.int64))
    return {
        "top1": _accuracy(model, xv, yv, 1),
        "top5": _accuracy(model, xv, yv, 5),
        "lr": lr,
        "weight_decay": weight_decay,
        "holdout_top1": {f"lr={a},wd={b}": v for (a, b), v in grid.items()},
    }
