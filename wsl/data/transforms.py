"""Image decoding and augmentation that decode only as many JPEG pixels as the crop needs.

Pillow's draft mode lets libjpeg scale by 1/2, 1/4 or 1/8 while decoding. The crop is drawn
first on the full-size image (its size is in the header), then the JPEG is decoded at the
smallest scale that still gives the crop at least the output resolution, so the result is
the same augmentation, decoded at a fraction of the cost.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _draft_scale(crop_short_side: float, target: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4, 8) that keeps the crop at least `target` pixels."""
    scale = 1
    while scale < 8 and crop_short_side / (scale * 2) >= target:
        scale *= 2
    return scale


def decode_drafted(
    image: Image.Image, box: tuple[float, float, float, float], target: int
) -> tuple[Image.Image, tuple]:
    """Decode an opened, not yet loaded image, reduced as far as `box` (left, top, right, bottom) allows.

    Returns the RGB image and the box in its (possibly reduced) coordinates.
    """
    width, height = image.size
    left, top, right, bottom = box
    scale = _draft_scale(min(right - left, bottom - top), target)
    if scale > 1 and image.format == "JPEG":
        image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
    if image.mode != "RGB":
        image = image.convert("RGB")  # grey, CMYK, palette; RGB JPEGs skip this copy
    sx, sy = image.size[0] / width, image.size[1] / height
    return image, (left * sx, top * sy, right * sx, bottom * sy)


class Normalize:
    """uint8 HWC PIL image -> normalised float CHW tensor in one pass."""

    def __init__(self, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std).view(3, 1, 1) * 255)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return (pixels.float() - self.mean) * self.inv_std


class TrainTransform:
    """JPEG bytes -> RandomResizedCrop + horizontal flip + normalise, decoded in draft mode.

    Crop parameters come from torchvision's `RandomResizedCrop.get_params`, so the
    augmentation's distribution is torchvision's.
    """

    def __init__(self, size: int = 224, scale: tuple = (0.08, 1.0), ratio: tuple = (3 / 4, 4 / 3), flip: bool = True):
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.normalize = Normalize()

    def __call__(self, data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))  # reads the header only
        top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        image, box = decode_drafted(image, (left, top, left + width, top + height), self.size)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box, reducing_gap=None)
        if self.flip and torch.rand(1).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return self.normalize(image)


class EvalTransform:
    """JPEG bytes -> Resize(shorter side `resize`) + CenterCrop(`size`) + normalise, in draft mode."""

    def __init__(self, size: int = 224, resize: int = 256):
        self.size = size
        self.resize = resize
        self.normalize = Normalize()

    def __call__(self, data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        ratio = self.resize / min(width, height)
        # The centre crop of the resized image, mapped back to full-size coordinates.
        crop = self.size / ratio
        left, top = (width - crop) / 2, (height - crop) / 2
        image, box = decode_drafted(image, (left, top, left + crop, top + crop), self.size)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box, reducing_gap=None)
        return self.normalize(image)
