"""Linear probe on cached frozen features, at ImageNet size: lr and weight decay chosen on a
split held out from train (never on val), then the chosen setting retrained on all of train
and reported on val.

As DINOv2's linear evaluation does (`setup_linear_classifiers`), every (lr, weight decay) of
the grid is a head trained at the same time: one pass over a batch of features feeds all the
heads (one matrix product into [batch, heads x classes]), so a 9-point grid costs about one
run, not nine. Features stay as they are stored (float16 from `wsl features`) and are
standardised on the fly, a batch at a time, with train statistics computed in float64 blocks:
no float32 copy of 1.28M x 2048 features is ever made. Each head: SGD momentum 0.9, a cosine
schedule, cross-entropy, its own lr and weight decay (applied by hand, per head). On a GPU
when there is one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from wsl.distributed import local_device
from wsl.errors import WslError

STATISTICS_BLOCK = 8_192  # rows a block when computing the train mean and std (float64: 128 MiB at 2048-d)


def _statistics(features: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of `features[rows]` in float64, a block at a time (no full-size copy)."""
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for start in range(0, len(rows), STATISTICS_BLOCK):
        block = features[rows[start : start + STATISTICS_BLOCK]].astype(np.float64)
        total += block.sum(0)
        squares += (block**2).sum(0)
    mean = total / len(rows)
    std = np.sqrt(np.maximum(squares / len(rows) - mean**2, 0) * len(rows) / max(1, len(rows) - 1))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float().clamp(min=1e-6)


class Heads:
    """`len(settings)` linear heads over the same features, each with its (lr, weight decay)."""

    def __init__(self, dim: int, num_classes: int, settings: list[tuple[float, float]], device: torch.device):
        self.settings, self.num_classes = settings, num_classes
        heads = len(settings)
        self.weight = torch.zeros(dim, heads * num_classes, device=device, requires_grad=True)
        self.bias = torch.zeros(heads * num_classes, device=device, requires_grad=True)
        self.lr = torch.tensor([lr for lr, _ in settings], device=device).repeat_interleave(num_classes)
        self.decay = torch.tensor([wd for _, wd in settings], device=device).repeat_interleave(num_classes)
        self.velocity = [torch.zeros_like(self.weight), torch.zeros_like(self.bias)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, heads, classes]."""
        return torch.addmm(self.bias, x, self.weight).view(len(x), len(self.settings), self.num_classes)

    def step(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> None:
        """One SGD step of every head on its own mean cross-entropy (`scale`: the cosine factor)."""
        logits = self.logits(x)
        heads = len(self.settings)
        loss = F.cross_entropy(logits.reshape(-1, self.num_classes), y.repeat_interleave(heads)) * heads
        gradients = torch.autograd.grad(loss, [self.weight, self.bias])
        with torch.no_grad():  # in place: the grid's weights are [dim, heads x classes], no temporaries of that size
            rate = self.lr * -scale
            self.velocity[0].mul_(0.9).add_(gradients[0]).addcmul_(self.weight, self.decay.expand_as(self.weight))
            self.velocity[1].mul_(0.9).add_(gradients[1])
            self.weight.addcmul_(self.velocity[0], rate.expand_as(self.weight))
            self.bias.addcmul_(self.velocity[1], rate)


class _Batches:
    """Standardised float32 batches of rows of float16/float32 features (gathered per batch)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device):
        self.features, self.labels, self.device = features, labels, device
        self.mean, self.std = mean.to(device), std.to(device)

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.features[np.sort(rows)]).to(self.device, torch.float32)
        y = torch.from_numpy(self.labels[np.sort(rows)]).to(self.device, torch.int64)
        return (x - self.mean) / self.std, y


def train_heads(
    batches: _Batches,
    rows: np.ndarray,
    num_classes: int,
    settings: list[tuple[float, float]],
    epochs: int,
    batch_size: int,
    seed: int,
) -> Heads:
    """Train one head per (lr, weight decay) on `rows`, all at once."""
    heads = Heads(batches.features.shape[1], num_classes, settings, batches.device)
    rng = np.random.default_rng(seed)
    steps = epochs * math.ceil(len(rows) / batch_size)
    step = 0
    for _ in range(epochs):
        order = rows[rng.permutation(len(rows))]
        for start in range(0, len(order), batch_size):
            heads.step(*batches(order[start : start + batch_size]), 0.5 * (1 + math.cos(math.pi * step / steps)))
            step += 1
    return heads


@torch.no_grad()
def _predictions(heads: Heads, batches: _Batches, rows: np.ndarray, block: int = 4096) -> np.ndarray:
    """The first head's top-1 class for each of `rows`."""
    blocks = (batches(rows[start : start + block])[0] for start in range(0, len(rows), block))
    return np.concatenate([heads.logits(x)[:, 0].argmax(1).cpu().numpy() for x in blocks])


@torch.no_grad()
def _accuracies(heads: Heads, batches: _Batches, rows: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """Top-k accuracy of every head on `rows`: [heads]."""
    hits = torch.zeros(len(heads.settings), device=batches.device)
    for start in range(0, len(rows), block):
        x, y = batches(rows[start : start + block])
        best = heads.logits(x).topk(min(k, heads.num_classes), dim=2).indices  # [batch, heads, k]
        hits += (best == y[:, None, None]).any(2).float().sum(0)
    return (hits / max(1, len(rows))).cpu().numpy()


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
    device: torch.device | None = None,
    account: Callable[[np.ndarray], dict[str, float]] | None = None,
) -> dict:
    """Val top-1/top-5 of the linear classifier whose (lr, weight decay) did best on the held-out split.

    Features may be float16 (as stored) or float32, numpy arrays or memory maps: they are read a
    batch at a time. The grid is one run on the fit split; the chosen setting, one more on all of train.
    `account` maps the val top-1 predictions to more numbers for the result (lower-bound, ReaL).
    """
    if not 0 < holdout < 1:
        raise WslError(f"linear.holdout must be between 0 and 1, not {holdout}")
    device = device or local_device()
    train_labels = np.asarray(train_labels, np.int64)
    order = np.random.default_rng(seed).permutation(len(train_features))
    cut = max(1, int(len(order) * holdout))
    held, fit = np.sort(order[:cut]), np.sort(order[cut:])
    settings = list(itertools.product(lrs, weight_decays))
    batches = _Batches(train_features, train_labels, *_statistics(train_features, fit), device)
    grid_heads = train_heads(batches, fit, num_classes, settings, epochs, batch_size, seed)
    grid = dict(zip(settings, _accuracies(grid_heads, batches, held, 1).tolist()))
    lr, weight_decay = max(grid, key=lambda s: (grid[s], -s[1], -s[0]))  # ties: less decay, smaller lr
    everything = np.arange(len(train_features))
    batches = _Batches(train_features, train_labels, *_statistics(train_features, everything), device)
    final = train_heads(batches, everything, num_classes, [(lr, weight_decay)], epochs, batch_size, seed)
    val = _Batches(val_features, np.asarray(val_labels, np.int64), batches.mean, batches.std, device)
    rows = np.arange(len(val_features))
    accounted = account(_predictions(final, val, rows)) if account is not None else {}
    return {
        "top1": float(_accuracies(final, val, rows, 1)[0]),
        "top5": float(_accuracies(final, val, rows, 5)[0]),
        **accounted,
        "lr": lr,
        "weight_decay": weight_decay,
        "holdout_top1": {f"lr={a},wd={b}": v for (a, b), v in grid.items()},
    }
