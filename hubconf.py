"""torch.hub entry points: `torch.hub.load("<path to this checkout>", "<entry>", ..., source="local")`.

`resnext101_32x{8,16,32,48}d_wsl`: Facebook's WSL-Images weights (CC-BY-NC 4.0), from
`weights=PATH` or the torch.hub checkpoints folder; the hash in the file name is checked.
`wsl_backbone`: ours, a release folder from `wsl export` or any weights file `wsl` loads.
Nothing is unpickled with code (safetensors, or torch.load(weights_only=True) on torch >= 2.6).
"""

dependencies = ["torch", "torchvision", "safetensors"]

from wsl.release.export import load_backbone, wsl_images_file  # noqa: E402


def wsl_backbone(name_or_path, num_classes=None, head="auto"):
    """A `wsl export` release folder or a weights file."""
    return load_backbone(name_or_path, num_classes=num_classes, head=head)


def resnext101_32x8d_wsl(weights=None, num_classes=None, head="auto"):
    """ResNeXt-101 32x8d, WSL pretrained on 940M Instagram images, fine-tuned on ImageNet (82.2 top-1)."""
    return load_backbone(wsl_images_file(8, weights), num_classes=num_classes, head=head)


def resnext101_32x16d_wsl(weights=None, num_classes=None, head="auto"):
    """ResNeXt-101 32x16d, WSL + ImageNet fine-tuning (84.2 top-1)."""
    return load_backbone(wsl_images_file(16, weights), num_classes=num_classes, head=head)


def resnext101_32x32d_wsl(weights=None, num_classes=None, head="auto"):
    """ResNeXt-101 32x32d, WSL + ImageNet fine-tuning (85.1 top-1)."""
    return load_backbone(wsl_images_file(32, weights), num_classes=num_classes, head=head)


def resnext101_32x48d_wsl(weights=None, num_classes=None, head="auto"):
    """ResNeXt-101 32x48d, WSL + ImageNet fine-tuning (85.4 top-1)."""
    return load_backbone(wsl_images_file(48, weights), num_classes=num_classes, head=head)
