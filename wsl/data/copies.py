"""The edits that copies of an image carry on the web, and photographs to plant them in.

`EDITS` maps an edit's name to a function (image, rng) -> edited image: the transforms the
de-duplication benchmark (`make bench-dedup`) plants, one row each. `photographs`
lists real photographs that ship inside installed Python packages (scikit-image, scikit-learn,
matplotlib), so the benchmark needs no download.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop_fraction(image: Image.Image, rng: np.random.Generator, area: float, aspect: float) -> Image.Image:
    width, height = image.size
    side_w, side_h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
    x0, y0 = rng.uniform(0, 1 - side_w), rng.uniform(0, 1 - side_h)
    box = (x0 * width, y0 * height, (x0 + side_w) * width, (y0 + side_h) * height)
    return image.crop(tuple(round(v) for v in box))


def _resize_jpeg35(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    scale = rng.uniform(0.5, 0.8)
    return _jpeg(image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC), 35)


def _crop_75_80(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    area = rng.uniform(0.75, 0.8)
    return _crop_fraction(image, rng, area, math.exp(rng.uniform(-0.15, 0.15)))


def _square_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    side = min(image.size)
    x0 = int(rng.integers(0, image.width - side + 1))
    y0 = int(rng.integers(0, image.height - side + 1))
    return image.crop((x0, y0, x0 + side, y0 + side))


def _white_frame(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The photo centred on a white frame 1/8 of its longer side wide, as Instagram frames do."""
    border = max(image.size) // 8
    return ImageOps.expand(image, border=border, fill=(255, 255, 255))


def _letterbox_square(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Padded to a square with black bars (letterboxing)."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _story_blurred(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A story (9:16): the photo across the width, on a blurred, enlarged copy of itself."""
    width = image.width
    height = round(width * 16 / 9)
    background = image.resize((height * image.width // image.height, height), Image.BILINEAR)
    left = (background.width - width) // 2
    background = background.crop((left, 0, left + width, height)).filter(ImageFilter.GaussianBlur(width / 25))
    background = ImageEnhance.Brightness(background).enhance(0.7)
    background.paste(image, (0, (height - image.height) // 2))
    return background


def _screenshot(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A phone screenshot: grey status and navigation bars with a few light marks, a white margin."""
    width = image.width + 2 * (image.width // 20)
    top, bottom = image.width // 6, image.width // 4
    canvas = Image.new("RGB", (width, image.height + top + bottom), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, top // 2), fill=(40, 40, 40))
    draw.rectangle((0, canvas.height - bottom // 2, width, canvas.height), fill=(40, 40, 40))
    for i in range(4):
        x = width * (0.1 + 0.25 * i)
        draw.ellipse(
            (x, canvas.height - bottom * 0.4, x + bottom * 0.25, canvas.height - bottom * 0.15), fill=(200,) * 3
        )
    draw.text((width * 0.05, top * 0.6), "user_name  follow", fill=(20, 20, 20))
    canvas.paste(image, (image.width // 20, top))
    return canvas


def _caption_band(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A black caption band with white text over the bottom 16% of the image."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    band = round(image.height * 0.16)
    draw.rectangle((0, image.height - band, image.width, image.height), fill=(0, 0, 0))
    font = ImageFont.load_default(size=max(8, band // 3))
    words = ["when the weekend", "finally arrives", "#blessed #nofilter", "tag a friend who"]
    draw.text((image.width * 0.05, image.height - band * 0.8), words[int(rng.integers(0, 4))], fill="white", font=font)
    draw.text((image.width * 0.05, image.height - band * 0.4), words[int(rng.integers(0, 4))], fill="white", font=font)
    return image


def _stickers(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Emoji-like stickers (yellow faces, hearts) and a line of text, covering up to ~20% of the image."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    side = min(image.size)
    for _ in range(3):
        r = side * rng.uniform(0.08, 0.12)
        cx, cy = rng.uniform(r, image.width - r), rng.uniform(r, image.height - r)
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 204, 0), outline=(120, 80, 0), width=2)
            draw.ellipse((cx - r / 3, cy - r / 3, cx - r / 6, cy), fill=(60, 30, 0))
            draw.ellipse((cx + r / 6, cy - r / 3, cx + r / 3, cy), fill=(60, 30, 0))
            draw.arc((cx - r / 2, cy - r / 4, cx + r / 2, cy + r / 2), 20, 160, fill=(60, 30, 0), width=3)
        else:
            draw.polygon(
                [
                    (cx, cy + r),
                    (cx - r, cy - r / 4),
                    (cx - r / 2, cy - r),
                    (cx, cy - r / 2),
                    (cx + r / 2, cy - r),
                    (cx + r, cy - r / 4),
                ],
                fill=(230, 20, 60),
            )
    font = ImageFont.load_default(size=max(10, side // 12))
    draw.text(
        (image.width * 0.1, image.height * rng.uniform(0.1, 0.3)),
        "omg so cute",
        fill="white",
        font=font,
        stroke_width=2,
        stroke_fill="black",
    )
    return image


def _rotate(degrees: float) -> Edit:
    def rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Rotated, then cropped to the largest centred rectangle without filled corners."""
        angle = degrees * (1 if rng.random() < 0.5 else -1)
        rotated = image.rotate(angle, Image.BICUBIC, expand=False)
        w, h = image.size
        a = math.radians(abs(angle))
        # largest axis-aligned rectangle of the image's aspect inside the rotated image
        scale = 1 / (math.cos(a) + math.sin(a) * max(w / h, h / w))
        cw, ch = w * scale, h * scale
        return rotated.crop(tuple(round(v) for v in ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)))

    return rotate


def _keystone(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A mild perspective (a print or screen photographed slightly off-axis): one edge of the
    photo 12% shorter than the opposite one, no corner filled."""
    w, h = image.size
    d = 0.06 * w
    if rng.random() < 0.5:  # source quad (upper left, lower left, lower right, upper right)
        quad = (d, 0, 0, h, w, h, w - d, 0)
    else:
        quad = (0, 0, d, h, w - d, h, w, 0)
    return image.transform((w, h), Image.Transform.QUAD, quad, Image.BICUBIC)


def _grayscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(max(image.size) / 200))


def _colour_filter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A warm 'vintage' filter: channel curves, lower saturation, a vignette."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * np.array([1.1, 1.0, 0.8]) + np.array([12, 6, 0])
    yy, xx = np.mgrid[0 : image.height, 0 : image.width]
    r = np.hypot((xx - image.width / 2) / image.width, (yy - image.height / 2) / image.height)
    pixels *= (1 - 0.5 * r**2)[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return ImageEnhance.Color(image).enhance(0.7)


def _brighter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.35)


EDITS: dict[str, Edit] = {
    # the transforms of issue 7
    "resize+jpeg35": _resize_jpeg35,
    "crop 75-80%": _crop_75_80,
    "mirror": lambda image, rng: ImageOps.mirror(image),
    "square crop": _square_crop,
    "grayscale": _grayscale,
    "blur": _blur,
    "colour filter": _colour_filter,
    "brightness +35%": _brighter,
    # the copy inside a larger canvas
    "white frame": _white_frame,
    "letterbox square": _letterbox_square,
    "story, blurred bg": _story_blurred,
    "screenshot bars": _screenshot,
    # overlays
    "caption band 16%": _caption_band,
    "stickers + text": _stickers,
    # geometry
    "rotate 5": _rotate(5),
    "rotate 10": _rotate(10),
    "keystone": _keystone,
}


def edited_copy(data: bytes, edit: str, rng: np.random.Generator) -> bytes:
    """`data` (an encoded image) with `edit` applied, re-encoded as a JPEG (quality 70-90)."""
    image = EDITS[edit](Image.open(io.BytesIO(data)).convert("RGB"), rng)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(rng.integers(70, 91)))
    return buffer.getvalue()


def _package_file(package: str, *parts: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


# (package, path inside it): photographs of varied content
_EVALUATION_PHOTOS = [
    ("skimage", "data", "astronaut.png"),
    ("skimage", "data", "chelsea.png"),
    ("skimage", "data", "coffee.png"),
    ("skimage", "data", "rocket.jpg"),
    ("skimage", "data", "camera.png"),
    ("skimage", "data", "motorcycle_left.png"),
    ("sklearn", "datasets", "images", "china.jpg"),
    ("sklearn", "datasets", "images", "flower.jpg"),
    ("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
]
# photographs that are not evaluation images: non-copies are cut from them (the same scene as an
# evaluation photo from another viewpoint: motorcycle_right; textures: grass, gravel, brick, stars)
_OTHER_PHOTOS = [
    ("skimage", "data", "motorcycle_right.png"),
    ("skimage", "data", "hubble_deep_field.jpg"),
    ("skimage", "data", "grass.png"),
    ("skimage", "data", "gravel.png"),
    ("skimage", "data", "brick.png"),
    ("skimage", "data", "coins.png"),
    ("skimage", "data", "ihc.png"),
    ("skimage", "data", "moon.png"),
    ("skimage", "data", "retina.jpg"),
    ("skimage", "data", "cell.png"),
    ("skimage", "data", "color.png"),
    ("skimage", "data", "clock_motion.png"),
    ("skimage", "data", "page.png"),
]


def photographs() -> tuple[dict[str, Image.Image], dict[str, Image.Image]]:
    """(evaluation photographs, other photographs), by file name, RGB."""
    found = {}
    for package, *parts in [*_EVALUATION_PHOTOS, *_OTHER_PHOTOS]:
        path = _package_file(package, *parts)
        if path is None:
            raise FileNotFoundError(f"{package} does not ship {'/'.join(parts)}: install the dev extra")
        found[parts[-1]] = Image.open(path).convert("RGB")
    return {name: found[name] for *_, name in _EVALUATION_PHOTOS}, {name: found[name] for *_, name in _OTHER_PHOTOS}


def write_evaluation_photographs(folder: Path) -> dict[str, bytes]:
    """The evaluation photographs written into `folder` as `<name>.jpg` (JPEG quality 92), as
    an evaluation set holds them; returns {name: the file's bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, image in sorted(photographs()[0].items()):
        path = folder / f"{Path(name).stem}.jpg"
        image.save(path, format="JPEG", quality=92)
        written[path.stem] = path.read_bytes()
    return written


def non_copy_crops(others: dict[str, Image.Image], count: int, rng: np.random.Generator) -> list[bytes]:
    """`count` crops (25-60% of the area) of the other photographs, resized and JPEG-encoded."""
    crops = []
    names = sorted(others)
    for i in range(count):
        image = others[names[i % len(names)]]
        crop = _crop_fraction(image, rng, rng.uniform(0.25, 0.6), math.exp(rng.uniform(-0.4, 0.4)))
        scale = rng.uniform(0.4, 1.0)
        crop = crop.resize((max(32, round(crop.width * scale)), max(32, round(crop.height * scale))), Image.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=int(rng.integers(60, 95)))
        crops.append(buffer.getvalue())
    return crops
