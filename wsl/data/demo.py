"""A deterministic stand-in for Instagram: photo-like JPEGs with the hashtags a user would type.

Each image is a textured scene (sky, grass, sand, night, brick) holding one to three objects
of a shape (circle, star, ...) with a colour and a pattern, at 96-320 px. Its hashtags name
what is visible, often by a synonym (#circle / #round), plus frequent noise tags (#love,
#instagood); shapes and colours follow Zipf-like frequencies; some true tags are missing and
some are wrong; a fifth of the annotations give a caption holding the hashtags instead of a
list. A few broken files (truncated JPEG, HTML saved as .jpg, empty file, missing file, a
line that is not JSON) are mixed in, as in any scrape.

Beside it, a labelled downstream set in ImageNet's folder layout whose classes are the
shapes, on random scenes and colours: recognising them is what the hashtags teach.

Image i depends only on (seed, i), so any number of worker processes gives the same bytes.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from tqdm import tqdm

from wsl.config import option

# Concept -> the hashtags users write for it (first = canonical; later = synonyms, rarer).
SHAPES = {
    "circle": ["circle", "round", "circles"],
    "square": ["square", "box", "squares"],
    "triangle": ["triangle", "pyramid", "triangles"],
    "star": ["star", "stars", "starshape"],
    "ring": ["ring", "donut", "doughnut"],
    "cross": ["cross", "plus"],
    "hexagon": ["hexagon", "honeycomb", "hex"],
    "crescent": ["crescent", "moon", "halfmoon"],
    "diamond": ["diamond", "rhombus"],
    "arrow": ["arrow", "arrows"],
}
COLOURS = {
    "red": ([200, 30, 30], ["red", "crimson"]),
    "blue": ([30, 60, 210], ["blue", "navy"]),
    "green": ([40, 170, 60], ["green", "emerald"]),
    "yellow": ([235, 210, 40], ["yellow", "gold"]),
    "purple": ([130, 50, 170], ["purple", "violet"]),
    "orange": ([240, 130, 20], ["orange"]),
    "white": ([240, 240, 240], ["white"]),
    "black": ([20, 20, 20], ["black"]),
}
PATTERNS = {
    "plain": [],
    "stripes": ["stripes", "striped"],
    "dots": ["dots", "polkadot"],
    "checks": ["checkered", "plaid"],
}
SCENES = {
    "sky": ["sky", "bluesky"],
    "grass": ["grass", "lawn"],
    "sand": ["sand", "beach"],
    "night": ["night", "dark"],
    "brick": ["brick", "wall"],
}
NOISE_TAGS = [
    "love",
    "instagood",
    "photooftheday",
    "beautiful",
    "happy",
    "picoftheday",
    "cute",
    "tbt",
    "art",
    "summer",
    "like4like",
    "followme",
    "nofilter",
    "weekend",
    "mood",
]
CAPTION_WORDS = [
    "what a day",
    "so good",
    "finally",
    "can't stop looking at this",
    "weekend vibes",
    "look at this",
    "new",
]

SHAPE_NAMES = list(SHAPES)
DOWNSTREAM_CLASSES = SHAPE_NAMES


def _zipf(n: int, s: float = 1.1) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


SHAPE_P, COLOUR_P, NOISE_P = _zipf(len(SHAPES), 0.9), _zipf(len(COLOURS), 0.8), _zipf(len(NOISE_TAGS), 1.0)


def synonyms_text() -> str:
    """The demo's synonym file: every concept with the other hashtags users write for it."""
    groups = [*SHAPES.values(), *(tags for _, tags in COLOURS.values()), *PATTERNS.values(), *SCENES.values()]
    lines = ["# canonical: synonyms (one class a line)"]
    lines += [f"{tags[0]}: {', '.join(tags[1:])}" for tags in groups if len(tags) > 1]
    return "\n".join(lines) + "\n"


def scene_background(rng: np.random.Generator, scene: str, width: int, height: int) -> np.ndarray:
    """A textured background, HxWx3 float."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 1, (height // 4 + 1, width // 4 + 1, 1)).astype(np.float32)
    noise = np.kron(noise, np.ones((4, 4, 1), np.float32))[:height, :width]
    if scene == "sky":
        img = (1 - y) * np.array([70, 130, 230]) + y * np.array([190, 220, 250]) + 6 * noise
    elif scene == "grass":
        img = np.array([50, 140, 50]) + 25 * noise + 15 * np.sin(x * rng.uniform(60, 120))
    elif scene == "sand":
        img = np.array([220, 195, 140]) + 12 * noise + 10 * np.sin((x + y) * rng.uniform(10, 30))
    elif scene == "night":
        img = np.array([15, 20, 45]) + 5 * noise
        stars = rng.random((height, width)) > 0.995
        img = np.where(stars[..., None], 230.0, img)
    else:  # brick
        rows = (y * height // 16) % 2
        mortar = ((y * height) % 16 < 2) | (((x * width) + rows * 16) % 32 < 2)
        img = np.where(mortar, 190.0, np.array([160, 60, 45]) + 12 * noise)
    return img + rng.uniform(-20, 20, 3)


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for the round ones, drawn as ellipses)."""

    def ring_points(n: int, radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        k = len(radii)
        return [
            (
                cx + radii[i % k] * r * math.cos(angle + offset + 2 * math.pi * i / n),
                cy + radii[i % k] * r * math.sin(angle + offset + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    if shape == "square":
        return ring_points(4, [1.0], math.pi / 4)
    if shape == "triangle":
        return ring_points(3, [1.0], -math.pi / 2)
    if shape == "star":
        return ring_points(10, [1.0, 0.45], -math.pi / 2)
    if shape == "hexagon":
        return ring_points(6, [1.0])
    if shape == "diamond":
        return ring_points(4, [1.0, 0.55])
    if shape == "cross":
        a, b = 0.33, 1.0
        pts = [
            (a, b),
            (a, a),
            (b, a),
            (b, -a),
            (a, -a),
            (a, -b),
            (-a, -b),
            (-a, -a),
            (-b, -a),
            (-b, a),
            (-a, a),
            (-a, b),
        ]
    elif shape == "arrow":
        pts = [(-1, -0.3), (0.2, -0.3), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3)]
    else:
        return None
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in pts]


def draw_object(rng: np.random.Generator, img: np.ndarray, shape: str, colour: str, pattern: str, scale: float) -> None:
    height, width = img.shape[:2]
    r = scale * min(width, height) / 2
    cx, cy = rng.uniform(r * 0.8, width - r * 0.8), rng.uniform(r * 0.8, height - r * 0.8)
    angle = rng.uniform(0, 2 * math.pi) if shape not in ("circle", "ring") else 0.0
    mask_img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask_img)
    polygon = _shape_polygon(shape, cx, cy, r, angle)
    if polygon is not None:
        draw.polygon(polygon, fill=255)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    else:  # crescent
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        dx = r * 0.45 * math.cos(rng.uniform(0, 2 * math.pi))
        draw.ellipse([cx - r + dx, cy - r * 0.9, cx + r + dx, cy + r * 0.9], fill=0)
    # Texture and blend only inside the object's bounding box: most pixels are background.
    x0, y0 = max(0, int(cx - r) - 1), max(0, int(cy - r) - 1)
    x1, y1 = min(width, int(cx + r) + 2), min(height, int(cy + r) + 2)
    mask = np.asarray(mask_img, dtype=np.float32)[y0:y1, x0:x1, None] / 255
    base = np.array(COLOURS[colour][0], np.float32) + rng.uniform(-25, 25, 3)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    period = rng.uniform(6, 14)
    if pattern == "stripes":
        shade = (np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period) > 0)[..., None]
        fill = np.where(shade, base, base * 0.45 + 120)
    elif pattern == "dots":
        dots = ((np.sin(x * 2 * math.pi / period) * np.sin(y * 2 * math.pi / period)) > 0.5)[..., None]
        fill = np.where(dots, 255 - base, base)
    elif pattern == "checks":
        checks = (((x // period) + (y // period)) % 2 == 0)[..., None]
        fill = np.where(checks, base, base * 0.55)
    else:
        fill = base + 20 * (y / height - 0.5)[..., None]  # plain, lit from above
    region = img[y0:y1, x0:x1]
    region *= 1 - mask
    region += mask * fill


def _render(rng: np.random.Generator, scene: str, objects: list[tuple[str, str, str, float]]) -> bytes:
    # Aspect ratios within 3:4..4:3, as most photos: random-resized and centre crops keep the objects.
    width = int(rng.integers(96, 321))
    height = int(np.clip(width * rng.uniform(0.75, 4 / 3), 96, 320))
    img = scene_background(rng, scene, width, height)
    for shape, colour, pattern, scale in objects:
        draw_object(rng, img, shape, colour, pattern, scale)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(rng.integers(60, 96))
    )
    return buffer.getvalue()


def random_object(rng: np.random.Generator, shape: str | None = None, scale: float | None = None) -> tuple:
    return (
        shape or SHAPE_NAMES[rng.choice(len(SHAPES), p=SHAPE_P)],
        list(COLOURS)[rng.choice(len(COLOURS), p=COLOUR_P)],
        list(PATTERNS)[rng.integers(len(PATTERNS))],
        scale or rng.uniform(0.5, 0.9),
    )


def _user_hashtags(rng: np.random.Generator, scene: str, objects: list[tuple]) -> list[str]:
    """What a user types: visible concepts (often by a synonym), noise, omissions and errors."""

    def variant(tags: list[str]) -> str:
        return tags[rng.choice(len(tags), p=_zipf(len(tags), 1.5))]

    tags: list[str] = []
    for shape, colour, pattern, _ in objects:
        if rng.random() < 0.85:
            tags.append(variant(SHAPES[shape]))
        if rng.random() < 0.5:
            tags.append(variant(COLOURS[colour][1]))
        if PATTERNS[pattern] and rng.random() < 0.4:
            tags.append(variant(PATTERNS[pattern]))
    if rng.random() < 0.4:
        tags.append(variant(SCENES[scene]))
    if rng.random() < 0.1:  # a wrong tag
        tags.append(SHAPE_NAMES[rng.integers(len(SHAPES))])
    for _ in range(rng.poisson(1.5)):
        tags.append(NOISE_TAGS[rng.choice(len(NOISE_TAGS), p=NOISE_P)])
    tags = list(dict.fromkeys(tags))
    rng.shuffle(tags)
    styled = []
    for tag in tags:  # how people type them
        roll = rng.random()
        styled.append(tag.capitalize() if roll < 0.1 else tag.upper() if roll < 0.13 else tag)
    return styled


def _pretrain_item(seed: int, index: int) -> tuple[bytes, dict]:
    rng = np.random.default_rng([seed, 0, index])
    scene = list(SCENES)[rng.integers(len(SCENES))]
    objects = [random_object(rng)]
    for _ in range(rng.choice(3, p=[0.7, 0.25, 0.05])):
        objects.append(random_object(rng, scale=rng.uniform(0.2, 0.4)))
    tags = _user_hashtags(rng, scene, objects)
    path = f"images/{index // 1000:03d}/{index:06d}.jpg"
    if rng.random() < 0.2:
        words = CAPTION_WORDS[rng.integers(len(CAPTION_WORDS))]
        record = {"path": path, "caption": f"{words} " + " ".join(f"#{t}" for t in tags)}
    else:
        record = {"path": path, "hashtags": tags}
    return _render(rng, scene, objects), record


def _downstream_item(seed: int, split: str, index: int) -> tuple[bytes, str]:
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, index])
    label = DOWNSTREAM_CLASSES[index % len(DOWNSTREAM_CLASSES)]
    scene = list(SCENES)[rng.integers(len(SCENES))]
    objects = [random_object(rng, shape=label, scale=rng.uniform(0.5, 0.85))]
    if rng.random() < 0.5:  # a small distractor of another shape
        other = [s for s in SHAPE_NAMES if s != label][rng.integers(len(SHAPES) - 1)]
        objects.append(random_object(rng, shape=other, scale=rng.uniform(0.15, 0.3)))
    return _render(rng, scene, objects), label


def planted_copy(data: bytes, rng: np.random.Generator) -> bytes:
    """A web copy of an image, as de-duplication must catch it: a crop keeping 70-100% of the
    area (any aspect), resized 0.5-2x, brightness/contrast/saturation within 15%, mirrored half
    the time, re-encoded at JPEG quality 30-95."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    area = rng.uniform(0.7, 1.0)
    aspect = math.exp(rng.uniform(math.log(area), -math.log(area)))  # keeps both sides within the image
    crop_w, crop_h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
    x0, y0 = rng.uniform(0, 1 - crop_w), rng.uniform(0, 1 - crop_h)
    image = image.crop(
        (round(x0 * width), round(y0 * height), round((x0 + crop_w) * width), round((y0 + crop_h) * height))
    )
    scale = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.85, 1.15))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(30, 96)))
    return buffer.getvalue()


def planted_duplicates(
    out: str | Path,
    num_eval: int = 300,
    copies_per_image: int = 2,
    num_others: int = 5000,
    shard_size: int = 500,
    seed: int = 0,
) -> dict[str, str]:
    """A de-duplication benchmark: demo downstream val images as the evaluation set
    (`out/eval/<class>/*.JPEG`) and demo pretraining images with `planted_copy` copies of them
    mixed in (`out/shards/pretrain-NNNNNN.tar`). Returns {copy's sample key: its original's
    evaluation key}; the other samples' keys start with "img"."""
    import webdataset as wds

    from wsl.data.shards import TAR_MTIME, shard_name  # the shard format's writer settings

    out = Path(out)
    rng = np.random.default_rng([seed, 3])
    originals = []
    for index in range(num_eval):
        data, label = _downstream_item(seed, "val", index)
        path = out / "eval" / label / f"val_{index:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        originals.append((f"eval/{label}/val_{index:06d}", data))
    samples = [(f"img{index:07d}", _pretrain_item(seed, index)[0]) for index in range(num_others)]
    truth = {}
    for copy in range(copies_per_image):
        for index, (key, data) in enumerate(originals):
            sample_key = f"copy{copy}_{index:06d}"
            truth[sample_key] = key
            samples.append((sample_key, planted_copy(data, rng)))
    order = rng.permutation(len(samples))
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), shard_size):
        with wds.TarWriter(
            str(out / "shards" / shard_name("pretrain", start // shard_size)), encoder=False, mtime=TAR_MTIME
        ) as writer:
            for i in order[start : start + shard_size]:
                key, data = samples[i]
                writer.write({"__key__": key, "jpg": data, "json": b'{"hashtags": []}'})
    return truth


def _pretrain_chunk(seed: int, out: str, indices: range) -> list[dict]:
    records = []
    for index in indices:
        data, record = _pretrain_item(seed, index)
        path = Path(out) / "pretrain" / record["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        records.append(record)
    return records


def _downstream_chunk(seed: int, out: str, split: str, indices: range) -> int:
    for index in indices:
        data, label = _downstream_item(seed, split, index)
        path = Path(out) / "downstream" / split / label / f"{split}_{index:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return len(indices)


def _write_broken_files(out: Path, seed: int) -> list[str]:
    """Broken inputs of a real scrape; returns their annotation lines."""
    broken = out / "pretrain" / "images" / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    good, _ = _pretrain_item(seed, 10**9)
    (broken / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (broken / "error_page.jpg").write_bytes(b"<html><body><h1>404 Not Found</h1></body></html>\n")
    (broken / "empty.jpg").write_bytes(b"")
    return [
        json.dumps({"path": "images/broken/truncated.jpg", "hashtags": ["circle", "red"]}),
        json.dumps({"path": "images/broken/error_page.jpg", "hashtags": ["star"]}),
        json.dumps({"path": "images/broken/empty.jpg", "hashtags": ["square"]}),
        json.dumps({"path": "images/broken/missing.jpg", "hashtags": ["ring"]}),
        '{"path": "images/broken/half-written-line.jpg", "hashtags": ["cro',
    ]


def generate(
    out: str | Path,
    num_images: int = 20000,
    downstream_train_per_class: int = 60,
    downstream_val_per_class: int = 30,
    seed: int = 0,
    workers: int = 1,
) -> dict:
    """Write the demo data under `out`; skip if a finished identical one is there."""
    out = Path(out)
    params = {
        "num_images": num_images,
        "downstream_train_per_class": downstream_train_per_class,
        "downstream_val_per_class": downstream_val_per_class,
        "seed": seed,
        "version": 3,
    }
    manifest = out / "demo.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("params") == params:
        return json.loads(manifest.read_text()) | {"reused": True}
    out.mkdir(parents=True, exist_ok=True)
    chunk = 250
    records: list[dict] = []
    with cf.ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [
            pool.submit(_pretrain_chunk, seed, str(out), range(i, min(i + chunk, num_images)))
            for i in range(0, num_images, chunk)
        ]
        splits = {"train": downstream_train_per_class, "val": downstream_val_per_class}
        down_jobs = [
            pool.submit(_downstream_chunk, seed, str(out), split, range(i, min(i + chunk, n * len(DOWNSTREAM_CLASSES))))
            for split, n in splits.items()
            for i in range(0, n * len(DOWNSTREAM_CLASSES), chunk)
        ]
        for job in tqdm(jobs, desc="demo pretraining images", unit=f" x{chunk}", dynamic_ncols=True):
            records += job.result()
        for job in down_jobs:
            job.result()
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    broken = _write_broken_files(out, seed)
    for offset, line in enumerate(broken):  # spread through the file, deterministically
        lines.insert((offset + 1) * len(lines) // (len(broken) + 1), line)
    (out / "pretrain" / "annotations.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "synonyms.txt").write_text(synonyms_text(), encoding="utf-8")
    summary = {
        "params": params,
        "pretrain_images": num_images,
        "broken_entries": len(broken),
        "annotations": str(out / "pretrain" / "annotations.jsonl"),
        "downstream": str(out / "downstream"),
        "downstream_classes": DOWNSTREAM_CLASSES,
        "synonyms": str(out / "synonyms.txt"),
    }
    manifest.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@dataclass
class Config:
    """`wsl demo-data`: generate the embedded demo hashtag dataset and its downstream set."""

    out: str = option("data/demo", "output folder")
    num_images: int = option(20000, "pretraining images", minimum=1)
    downstream_train_per_class: int = option(60, "downstream training images per class", minimum=1)
    downstream_val_per_class: int = option(30, "downstream val images per class", minimum=1)
    seed: int = option(0, "seed of everything drawn")
    workers: int = option(os.cpu_count() or 1, "processes", minimum=1)


def main(config: Config) -> str:
    summary = generate(
        config.out,
        config.num_images,
        config.downstream_train_per_class,
        config.downstream_val_per_class,
        config.seed,
        config.workers,
    )
    state = "already there (same parameters), reused" if summary.get("reused") else "written"
    return "\n".join(
        [
            f"demo data {state}: {config.out}",
            f"  pretraining annotations: {summary['annotations']}  ({summary['pretrain_images']} images"
            f" + {summary['broken_entries']} broken entries)",
            f"  downstream set (ImageNet folder layout): {summary['downstream']}",
            f"  synonym file: {summary['synonyms']}",
        ]
    )


def synthetic_decisions(folder: str | Path, samples: int, per_shard: int = 1000, seed: int = 0) -> list[Path]:
    """`wsl dedup` decision files without images, for measuring the decision step at any size:
    1 in 200 samples repeats an earlier one's bytes, 1 in 1,000 is a copy of an evaluation
    image (score 0.9), 1 in 1,000 is undecodable. Returns the files in shard order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard, start in enumerate(range(0, samples, per_shard)):
        records = []
        for index in range(start, min(samples, start + per_shard)):
            draw = rng.random()
            source = int(rng.integers(0, index)) if draw < 0.005 and index else index  # a byte duplicate
            record = {"key": f"s{index:010d}", "sha256": hashlib.sha256(str(source).encode()).hexdigest()}
            if 0.005 <= draw < 0.006:
                record["corrupt"] = "not an image"
            else:
                copy = 0.006 <= draw < 0.007
                record |= {
                    "score": 0.9 if copy else round(float(rng.random()) * 0.7, 4),
                    "match": "eval/x" if copy else None,
                }
            records.append(record)
        path = folder / f"shard-{shard:06d}.tar.json"
        path.write_text(json.dumps({"shard": f"shard-{shard:06d}.tar", "samples": records}))
        paths.append(path)
    return paths
