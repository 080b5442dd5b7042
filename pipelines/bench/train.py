"""`make bench-train`: images/s of one full pretraining step, and the share of the machine's
matrix-product rate it reaches.

A step is what `wsl pretrain` does per batch: forward, the paper's soft-target cross-entropy,
backward, SGD with Nesterov momentum. It runs on random images and 1/k targets, for any registry
model and resolution, in each of: eager NCHW, channels_last, and `torch.compile` (channels_last);
on a GPU under bf16 autocast, as training runs there. Model FLOP/s are the step's FLOPs (3x the
forward's, as `torch.utils.flop_counter` counts them) times steps/s; the baseline is a large matrix product
measured in the same run (bf16 on a GPU, fp32 on a CPU), so the last line, the best mode's share
of it, is comparable across machines.

    make bench-train                                          # CPU: resnext14_8x4d at 64 px
    python pipelines/bench/train.py --model resnext101_32x8d --image-size 224 --batch-size 128
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from wsl.models import build_model, model_name_problem
from wsl.train.pretrain import soft_target_cross_entropy

MODES = ("eager", "channels_last", "compile")


def matmul_flops_per_second(device: torch.device, seconds: float = 2.0) -> float:
    """FLOP/s of a square matrix product: bf16 8192 on a GPU, fp32 2048 on a CPU."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    _synchronise(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
        _synchronise(device)
    return 2 * size**3 * count / (time.perf_counter() - started)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model_name: str, mode: str, classes: int, device: torch.device):
    """One training step's function (and its model) in `mode`."""
    model = build_model(model_name, classes, zero_init_residual=True).to(device)
    memory_format = torch.contiguous_format if mode == "eager" else torch.channels_last
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    forward = torch.compile(model) if mode == "compile" else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast:
            loss = soft_target_cross_entropy(forward(images.contiguous(memory_format=memory_format)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, model


def step_flops(model_name: str, image_size: int, classes: int) -> int:
    """FLOPs of one image's forward + backward: three times the forward's, which
    `torch.utils.flop_counter` counts on the meta device (shapes only, no arithmetic). The backward
    is taken as two forwards (the input's and the weights' gradients), not counted: the counter
    overcounts grouped convolutions' weight gradients (torch 2.11 and 2.14: 184 GFLOP against 66
    for resnext101_32x8d's backward at 224 px; pytorch/pytorch#183405)."""
    model = build_model(model_name, classes, device="meta").eval()  # one image: batch norm's running statistics
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return 3 * counter.get_total_flops()


def measure(args, mode: str, device: torch.device, flops_per_image: int) -> dict:
    step, _ = make_step(args.model, mode, args.classes, device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    targets = torch.zeros(args.batch_size, args.classes)
    targets[:, :3] = 1 / 3  # three hashtags an image
    targets = targets.to(device)
    for _ in range(args.warmup):  # compile, cudnn autotuning, allocator
        step(images, targets)
    _synchronise(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step(images, targets)
    _synchronise(device)
    seconds = time.perf_counter() - started
    images_per_second = args.batch_size * args.steps / seconds
    return {"mode": mode, "images/s": images_per_second, "flops/s": images_per_second * flops_per_image}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnext14_8x4d")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000, help="head size (the paper's: 1.5k, 8.5k, 17k)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps a mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args(argv)
    if problem := model_name_problem(args.model):
        parser.error(f"--model: {problem}")
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    flops_per_image = step_flops(args.model, args.image_size, args.classes)
    baseline = matmul_flops_per_second(device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(
        f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.classes} classes, {precision}, on {name}"
    )
    print(f"one image's forward + backward: {flops_per_image / 1e9:.2f} GFLOP; matmul: {baseline / 1e12:.3f} TFLOP/s")
    rows = [measure(args, mode, device, flops_per_image) for mode in modes]
    print(f"{'mode':<16}{'images/s':>12}{'model TFLOP/s':>15}{'of matmul':>11}")
    for row in rows:
        row["of_matmul"] = row["flops/s"] / baseline
        print(f"{row['mode']:<16}{row['images/s']:>12.1f}{row['flops/s'] / 1e12:>15.3f}{row['of_matmul']:>10.1%}")
    best = max(rows, key=lambda row: row["images/s"])
    eager = next((row for row in rows if row["mode"] == "eager"), rows[0])
    print(
        f"best ({best['mode']}): {best['of_matmul']:.1%} of the matrix-product rate; "
        f"{best['images/s'] / eager['images/s']:.2f}x {eager['mode']}"
    )
    return rows


if __name__ == "__main__":
    main()
