"""The evaluation-side index of `wsl dedup` and its descriptors: see `wsl.dedup` for the method."""

from __future__ import annotations

import functools
import io
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsl.config import option
from wsl.data.folders import image_files, is_image_folder
from wsl.data.shards import expand_shard_spec, read_shard_samples, sample_image_bytes
from wsl.errors import WslError
from wsl.files import write_atomic, write_json

if TYPE_CHECKING:
    from wsl.dedup.sscd import SscdIndex

COARSE = 16  # retrieval thumbnail side
RETRIEVAL_CLIP = 2.5  # retrieval cells farther from the median than this many deviations are clipped
FINE = 48  # verification thumbnail side
FLAT_SHARE = 0.35  # share of a line on a border that is the border's colour (text on a bar)
MIN_BOX_AREA = 0.2  # a smaller box is left out: a detail of the photo, not the photo
MAX_BOX_AREA = 0.995  # a box nearly the whole image is a view still: bars 1% thick change a thumbnail's detail
INNER_TRIM = 0.03  # a box found inside another's is a view where it trims this share of a side (`content_boxes`)
THIN_BARS = 0.98  # a box over this share of the area is kept only inside black or white bars (letterboxing)
STORE = 96  # evaluation images kept as STORE x STORE RGB for verification (windows are fractions)
ROTATED_SIDES = (0.8, 0.85, 0.9, 0.95)  # centred windows of a rotated evaluation image (below)
SMALL_WINDOW = 0.9  # share of `min_area` under which a verified window pays `small_window_penalty`
FORMAT = "wsl-dedup-10"
# Workers are spawned, not forked: a fork after FAISS's OpenMP threads have run (building the
# IVF index) deadlocks the child's first OpenMP call.
RERANK = 64  # the IVF index's nearest hits, re-ranked by exact similarity with those `_spread` adds
RERANK_PER_IMAGE = 4  # windows `_spread` adds of each further evaluation image
IVF_HITS = 256  # windows the IVF index returns per query (`_spread` reads past the RERANK nearest)
ROUNDING = 1e-3  # added to `IvfBound`'s bound: float32 rounding of the terms it adds up
START_WINDOWS = 10  # nearest windows of a candidate image among which verification starts (`_starts`)
SHORTLIST = 10  # nearest evaluation images re-ordered with an overlay's cells discounted (`_shortlist`)
OVERLAY_CELLS = 0.1  # share of the coarse cells `_trimmed_similarity` leaves out
OVERLAY_SHARE = 0.15  # share of the coarse cells verification leaves out where it lines up past an overlay
OVERLAY_GATE = 0.9  # correlation outside those cells at verification's start above which it lines up there
NEXT_TRIMMED = 0.9  # `_trimmed_similarity` from which the image after the verified ones is lined up past an overlay
NEXT_GATE = 0.95  # and the correlation outside the overlay's cells at its start from which it is
# detail after the ascent's 0.5% steps below which it takes no 0.25% steps: on `make bench-dedup` those moved
# it by 0.068 at most (0.032 at the 99th percentile), and 44% of verified non-copies reach the detail ascent
DETAIL_GIVE_UP = 0.5
# detail at the aligned window below which there is no detail ascent: on `make bench-dedup` every one that
# reached 0.6 started at 0.59 or more, those of copies found past an overlay at 0.33 or more, and 58% of the
# non-copies' below 0.3
DETAIL_START = 0.3
# whole-image correlation after the alignment's first pass over its moves (steps of 2%) below which it gives up:
# on `make bench-dedup` every alignment that reached 0.6 was at 0.349 or more there, every one of a copy found
# at 0.409 or more, and 803 of the 2,679 alignments of non-copies (30%) were below 0.35
FIRST_PASS_GIVE_UP = 0.35
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError)


PIXELS_THRESHOLD = 0.77  # chosen on `make bench-dedup`'s curve (BENCHMARKS.md)
SSCD_THRESHOLD = 0.75  # SSCD's authors: 90% precision on DISC2021


@dataclass
class DedupConfig:
    """The settings that decide what is a copy (stored with the decisions: changing one starts over)."""

    threshold: float = option(
        0.0,
        "score at or above which a sample is a copy; 0: the descriptor's own (pixels: verified detail "
        f"correlation {PIXELS_THRESHOLD}, SSCD: cosine {SSCD_THRESHOLD}; BENCHMARKS.md)",
        minimum=0,
    )
    prefilter: float = option(0.6, "retrieval similarity below which a sample is not verified (see overlay_prefilter)")
    overlay_prefilter: float = option(
        0.8,
        "similarity without the cells an overlay covers (`_trimmed_similarity`) of one of the 10 nearest images, "
        "at its nearest window or its whole one, at or above which a sample below `prefilter` is verified still: "
        "on `make bench-dedup` 4 of 49 copies under stickers reach it from below 0.6, and 3 of the 512 "
        "non-copies below 0.6 (none at 0.85)",
    )
    candidates: int = option(
        1, "evaluation images verified per sample, the shortlist's first: verification is the cost", minimum=1
    )
    max_rotation: float = option(
        10.0,
        "largest rotation (degrees, in steps of 5, both ways) of a copy that the index holds windows for",
        minimum=0,
    )
    give_up: float = option(
        0.5,
        "whole-image correlation after the coarse alignment (steps of 2%) below which a candidate is scored "
        "where it stands: no finer alignment, no detail ascent (no copy found on `make bench-dedup` lined up "
        "below 0.68; 45% of the verified non-copies stop below 0.5)",
    )
    align_min: float = option(
        0.6,
        "whole-image correlation, once aligned, below which the detail is scored where it stands instead of "
        "refined (no copy on `make bench-dedup` aligned below 0.68; most verified non-copies do)",
    )
    overlay_penalty: float = option(
        0.16,
        "subtracted from the detail correlation over the blocks whose colours agree, which scores a copy "
        "under stickers, text or a band (`_uncovered_correlation`): on `make bench-dedup` it reached 0.89 "
        "for verified non-copies (0.73 after the penalty), 0.82-1.0 for copies under stickers",
        minimum=0,
    )
    realigned_penalty: float = option(
        0.1,
        "subtracted from the detail correlation of a candidate lined up again without the coarse cells an "
        "overlay covers (where the whole image did not reach the threshold): on `make bench-dedup` verified "
        "non-copies reached up to 0.84 there, 44 of 49 copies under stickers 0.83-0.995",
        minimum=0,
    )
    small_window_penalty: float = option(
        0.08,
        f"subtracted from the score of a candidate lined up on a window under {SMALL_WINDOW:.0%} of `min_area` "
        "(verification may shrink a window to half of each side): on `make bench-dedup`, crops of a stereo "
        "twin of an evaluation photo lined up on 42-60% of it and scored up to 0.81; every copy found on 64% or more",
        minimum=0,
    )
    min_area: float = option(0.68, "smallest crop (fraction of the area) the windows cover", above=0)
    min_side: float = option(0.7, "smallest crop side (fraction) the windows cover", above=0)
    window_step: float = option(0.05, "grid of the windows' edges (fraction)", above=0)
    descriptor: str = option(
        "pixels", "pixels (no weights needed), or sscd:PATH (SSCD copy-detection weights, torchvision format)"
    )
    index: str = option(
        "auto",
        "window index: flat (exact, 1 KB a window), ivf (PCA + IVF + 8-bit codes, ~136 B "
        "a window, and 12 B of `IvfBound` terms), auto: ivf above ivf_above windows (~4,000 images)",
        choices=("auto", "flat", "ivf"),
    )
    ivf_above: int = option(2_000_000, "windows above which `auto` compresses", minimum=1)
    nlist: int = option(0, "IVF lists (0: 4 sqrt(windows))", minimum=0)
    nprobe: int = option(64, "IVF lists searched per query", minimum=1)
    pca_dim: int = option(128, "IVF: PCA dimensions", minimum=1)

    def __post_init__(self) -> None:
        if self.descriptor != "pixels" and not self.descriptor.startswith("sscd:"):
            raise WslError(f"descriptor={self.descriptor}: expected pixels or sscd:PATH (an SSCD .torchvision.pt file)")

    @property
    def copy_threshold(self) -> float:
        """`threshold`, or the descriptor's own where it is 0."""
        return self.threshold or (PIXELS_THRESHOLD if self.descriptor == "pixels" else SSCD_THRESHOLD)


def decode_small(data: bytes, short_side: int) -> Image.Image:
    """RGB image with its shorter side at least `short_side`, decoded at 1/2..1/8 scale when JPEG."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (short_side, short_side))
        return image.convert("RGB")


def pixels_of(image: Image.Image) -> np.ndarray:
    """An RGB or grayscale ("L") image as an H x W x C uint8 array."""
    return np.asarray(image).reshape(image.height, image.width, -1)


def luminance(pixels: np.ndarray) -> np.ndarray:
    """H x W x 3 RGB -> H x W x 1 luminance (ITU-R 601, as PIL's "L"), float32."""
    return (pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def is_grayscale(image: Image.Image) -> bool:
    """Whether an RGB image has (next to) no colour: a grayscale copy is compared on luminance alone."""
    pixels = np.asarray(image.resize((32, 32), Image.BOX, reducing_gap=None), dtype=np.int16)
    return int(np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max()) <= 6


def normalised(thumbnail: np.ndarray) -> np.ndarray:
    """A thumbnail (H x W x C) as a unit vector, blind to its mean colour and its contrast; a
    stack of them (N x H x W x C) as N unit vectors."""
    t = thumbnail.astype(np.float32)
    t -= t.mean(axis=(-3, -2), keepdims=True)
    t /= t.std(axis=(-3, -2, -1), keepdims=True) + 4.0  # + 4: flat images stay near zero, not amplified noise
    flat = t.reshape(*t.shape[:-3], -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-6)


def robust_normalised(cells: np.ndarray) -> np.ndarray:
    """Single-channel thumbnails (... x H x W x 1) as unit vectors, measured from their median in
    units of their median absolute deviation and clipped at RETRIEVAL_CLIP of them: a few cells
    far from the rest (stickers, text, a caption band on a dark scene) weigh no more than a
    strong edge, and do not shrink the rest of the image as a standard deviation they inflate
    would (+ 4 grey levels: flat images stay near zero, not amplified noise)."""
    flat = cells.astype(np.float32).reshape(*cells.shape[:-3], -1)
    centre = _last_axis_median(flat)
    spread = 1.4826 * _last_axis_median(np.abs(flat - centre)) + 4.0
    t = np.clip((flat - centre) / spread, -RETRIEVAL_CLIP, RETRIEVAL_CLIP)
    t -= t.mean(axis=-1, keepdims=True)
    return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-6)


def _last_axis_median(values: np.ndarray) -> np.ndarray:
    """`np.median(values, axis=-1, keepdims=True)`, the same floats, from a partial sort at one
    position (numpy selects at one position with SIMD, 7-9x faster on an image's windows' cells
    than at the two an even count's median takes): the lower middle value is then the largest
    of those before it."""
    middle = values.shape[-1] // 2
    ordered = np.partition(values, middle, axis=-1)
    upper = ordered[..., middle : middle + 1]
    if values.shape[-1] % 2:
        return upper
    return (ordered[..., :middle].max(axis=-1, keepdims=True) + upper) / values.dtype.type(2)


def detail(pixels: np.ndarray, block: int = 4) -> np.ndarray:
    """What a thumbnail holds beyond its block x block averages (texture, edges), as a unit vector."""
    t = pixels.astype(np.float32)
    n = t.shape[0] // block
    low = t.reshape(n, block, n, block, t.shape[2]).mean(axis=(1, 3))
    t -= np.repeat(np.repeat(low, block, axis=0), block, axis=1)
    flat = t.ravel()
    return flat / max(float(np.linalg.norm(flat)), 1e-6)


def retrieval_cells(image: Image.Image) -> np.ndarray:
    """The luminance of `image` area-averaged to COARSE x COARSE (grayscale copies and colour
    filters look like their originals): COARSE x COARSE x 1."""
    return luminance(np.asarray(image.resize((COARSE, COARSE), Image.BOX, reducing_gap=None)))


def retrieval_descriptor(image: Image.Image) -> np.ndarray:
    """What retrieval compares: `retrieval_cells`, `robust_normalised`."""
    return robust_normalised(retrieval_cells(image))


def content_boxes(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Boxes (pixels) that may hold a photo placed inside a larger canvas, found three ways:
    - inside borders that are flat (a frame, letterbox or screenshot bars): lines (rows, then
      columns) where 90% of the pixels are within 2 grey levels of the line's median (digital
      borders are; photographed skies and walls are not), or a third of them within 2 grey
      levels of the nearest such line (text or icons on a bar, a caption band's text);
    - inside borders that are smooth (a story's blurred background): lines whose mean step
      between neighbouring pixels, along and across, is under a quarter of the image's
      90th-percentile line's;
    - between a symmetric pair of straight horizontal edges with quieter rows outside them (a
      story's photo, whatever its own edge rows hold: `_between_straight_edges`).
    A border starts at the image's edge and runs inward over border lines and over gaps of at
    most 8% of the side between runs of border lines at least half as long (flat borders only:
    `_inside_borders`); rows first, then columns within them. Then each kind is searched once
    more inside the other's box, kept where it trims at least INNER_TRIM of a side: layers of
    canvas whose lines are not all border across the outer layer (a screenshot's white margins,
    ringing with JPEG near the photo, inside its bars of text and icons). Each box is
    moved 1% inward; boxes over MAX_BOX_AREA of the area or under MIN_BOX_AREA of it are left out, and so
    is a repeated one, and one over THIN_BARS unless what lies outside it is black or white."""
    grey = np.asarray(image.convert("L"), dtype=np.int16)
    flat, smooth = (_inside_borders_of(grey, *kind) for kind in _BORDER_KINDS)
    found = [flat, smooth, (*_between_straight_edges(grey), 0, grey.shape[1])]
    for (top, bottom, left, right), kind in zip((flat, smooth), _BORDER_KINDS[::-1]):
        if MIN_BOX_AREA * grey.size <= (bottom - top) * (right - left) < grey.size:  # a border: the other kind inside
            inner_top, inner_bottom, inner_left, inner_right = _inside_borders_of(grey[top:bottom, left:right], *kind)
            trimmed = (
                max(inner_top, bottom - top - inner_bottom) / (bottom - top),
                max(inner_left, right - left - inner_right) / (right - left),
            )
            if max(trimmed) >= INNER_TRIM:
                found.append((top + inner_top, top + inner_bottom, left + inner_left, left + inner_right))
    boxes: list[tuple[int, int, int, int]] = []
    for top, bottom, left, right in found:
        area = (bottom - top) * (right - left) / grey.size
        if area > THIN_BARS and not _black_or_white_outside(grey, top, bottom, left, right):
            continue  # thin flat lines of another colour at an edge: mostly the photo's own
        if MIN_BOX_AREA <= area <= MAX_BOX_AREA:
            dy, dx = round(0.01 * (bottom - top)), round(0.01 * (right - left))
            box = (left + dx, top + dy, right - dx, bottom - dy)
            if box not in boxes:
                boxes.append(box)
    return boxes


def _inside_borders_of(grey: np.ndarray, border: Callable[[np.ndarray], np.ndarray], gap: float) -> tuple[int, ...]:
    """(top, bottom, left, right) of what lies inside a grey image's borders of one kind
    (`_inside_borders`): rows first, then columns within them."""
    top, bottom = _inside_borders(border(grey), gap)
    return (top, bottom, *_inside_borders(border(grey[top:bottom].T), gap))


def _black_or_white_outside(grey: np.ndarray, top: int, bottom: int, left: int, right: int) -> bool:
    """Whether the pixels of a grey image outside a box are mostly black (under 16) or white (over 239)."""
    outside = np.ones(grey.shape, bool)
    outside[top:bottom, left:right] = False
    if not outside.any():
        return False
    median = float(np.median(grey[outside]))
    return median < 16 or median > 239


def _flat_lines(grey: np.ndarray) -> np.ndarray:
    """Which rows of a grey image are flat: 90% of their pixels within 2 grey levels of their
    median, or a third of them within 2 grey levels of the nearest such row above or below (a
    line of text or icons on a bar)."""
    if not grey.size:
        return np.zeros(len(grey), bool)
    median = _middle(grey)
    flat = (np.abs(grey - median[:, None]) <= 2).mean(axis=1) >= 0.9
    if not flat.any():
        return flat
    rows = np.arange(len(grey))
    above = np.maximum.accumulate(np.where(flat, rows, -1))
    below = np.minimum.accumulate(np.where(flat, rows, len(grey))[::-1])[::-1]
    for nearest in (above, below):
        valid = (nearest >= 0) & (nearest < len(grey))
        colour = median[np.clip(nearest, 0, len(grey) - 1)]
        flat |= valid & ((np.abs(grey - colour[:, None]) <= 2).mean(axis=1) >= FLAT_SHARE)
    return flat


def _smooth_lines(grey: np.ndarray) -> np.ndarray:
    """Which rows of a grey image are smooth: their mean step between neighbouring pixels, along
    the row and to the next row, under a quarter of the 90th percentile of the rows' (a line of
    a textured photo may be smooth along itself, not also across: brick mortar)."""
    if grey.shape[1] < 2 or len(grey) < 2:
        return np.zeros(len(grey), bool)
    along = np.abs(np.diff(grey, axis=1)).mean(axis=1)
    across = np.abs(np.diff(grey, axis=0)).mean(axis=1)
    across = np.concatenate(([0.0], across, [0.0]))  # a row's steps to the rows above and below
    across = np.maximum(across[1:], across[:-1])
    steps = np.maximum(along, across)
    return steps < 0.25 * _percentile_90(steps)


_BORDER_KINDS = ((_flat_lines, 0.08), (_smooth_lines, 0.0))  # (which lines are border, gap bridged)


def _between_straight_edges(grey: np.ndarray) -> tuple[int, int]:
    """(top, bottom) rows between the strongest pair of straight horizontal edges placed
    symmetrically (within 2 rows): lines where most of the row steps by at least 6 grey levels
    and 4x the image's typical line, as a photo across a story's width makes on its blurred
    background, smooth as that photo's own edge rows may be, where the rows outside them are
    less than half as busy as those between them; (0, height) if there are none."""
    height = len(grey)
    if height < 20:
        return 0, height
    steps = _middle(np.abs(np.diff(grey, axis=0)))  # steps[y]: between rows y and y + 1
    wrapped = np.concatenate((steps[-2:], steps, steps[:2]))
    near = np.lib.stride_tricks.sliding_window_view(wrapped, 5).max(axis=1)  # the best within 2 rows (cyclic)
    upper = np.arange(round(0.05 * height), round(0.45 * height))
    pair = np.minimum(steps[upper], near[height - 2 - upper])
    best = int(np.argmax(pair))
    if pair[best] < max(6.0, 4 * (np.median(steps) + 1)):
        return 0, height
    top = int(upper[best]) + 1
    partner = height - 2 - top + 1
    bottom = partner - 2 + int(np.argmax(steps[partner - 2 : partner + 3])) + 1
    along = np.abs(np.diff(grey, axis=1)).mean(axis=1)
    if np.concatenate((along[:top], along[bottom:])).mean() >= 0.5 * along[top:bottom].mean():
        return 0, height  # outside as busy as inside: lines of the photo itself (brick courses)
    return top, bottom


def _middle(lines: np.ndarray) -> np.ndarray:
    """The median of each row of an integer array of grey levels or their steps (the upper one of
    an even count), by a partial sort: numpy's selection ran 5-7x faster than a running count
    over one histogram of all rows (which was 3x faster than `np.median`) on these small arrays."""
    return np.partition(lines, lines.shape[1] // 2, axis=1)[:, lines.shape[1] // 2]


def _percentile_90(values: np.ndarray) -> float:
    """`np.percentile(values, 90)` (linear interpolation, the same float) from a partial sort:
    10x faster on a few hundred values, where numpy's general path is mostly overhead."""
    position = (len(values) - 1) * 0.9
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    ordered = np.partition(values, (low, high))
    a, b, fraction = ordered[low], ordered[high], position - low
    return float(b - (b - a) * (1 - fraction) if fraction >= 0.5 else a + (b - a) * fraction)


def _inside_borders(border: np.ndarray, gap: float = 0.08) -> tuple[int, int]:
    """(start, end) of what lies between the borders at both ends of a 1-d mask of border
    lines: each border runs from its end inward over border lines and over gaps of other lines
    at most `gap` of the length long whose runs of border lines on both sides (beyond the end,
    all) are each at least half as long as the gap: JPEG ringing between a bar and a band, a
    caption's line of text, a screenshot's bar of icons at the edge; not the one-line courses
    of a brick wall, or stripes, a few lines apart. (0, 0) if the borders meet."""
    length = len(border)
    closed = border.copy()
    edges = np.flatnonzero(np.diff(np.concatenate(([0], border.astype(np.int8), [0]))))
    runs = [(-length, 0), *zip(edges[::2], edges[1::2]), (length, 2 * length)]  # of border lines
    for (start, end), (next_start, next_end) in zip(runs, runs[1:]):
        between = next_start - end
        if between <= gap * length and 2 * min(end - start, next_end - next_start) >= between:
            closed[end:next_start] = True
    inside = np.flatnonzero(~closed)
    return (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)


def _coverage(intervals: np.ndarray, size: int, length: int) -> np.ndarray:
    """[K, size, length]: the weights that average `size` equal cells between each interval's
    ends (pixels, fractional) over `length` pixels: each cell's overlap with each pixel, summing to 1."""
    edges = intervals[:, :1] + (intervals[:, 1:] - intervals[:, :1]) * np.linspace(0, 1, size + 1)
    pixel = np.arange(length)
    overlap = np.minimum(edges[:, 1:, None], pixel + 1) - np.maximum(edges[:, :-1, None], pixel)
    overlap = np.clip(overlap, 0, None)
    return overlap / overlap.sum(axis=2, keepdims=True)


def window_thumbnails(pixels: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """The retrieval descriptors [W, size * size] of windows (fractions) of an H x W x 3 image: the
    luminance of each window area-averaged to size x size, normalised as `retrieval_descriptor`.
    Windows share few distinct x and y intervals, so every row interval is averaged once, then
    every column interval, by two matrix products (exact area averages; ~5x faster than one PIL
    resize a window)."""
    pixels = luminance(pixels)
    height, width, channels = pixels.shape
    across, down, x_of, y_of = _window_weights(windows, size, height, width)
    rows = (down @ pixels.astype(np.float32).reshape(height, width * channels)).reshape(-1, width, channels)
    cells = rows.transpose(0, 2, 1).reshape(-1, width) @ across.T  # [Ky * size * C, Kx * size]
    cells = cells.reshape(len(down) // size, size, channels, len(across) // size, size).transpose(0, 3, 1, 4, 2)
    return robust_normalised(cells[y_of, x_of])


def _window_weights(windows: np.ndarray, size: int, height: int, width: int) -> tuple[np.ndarray, ...]:
    """`_area_weights` of windows (fractions, [W, >= 4]; the first 4 columns are read), cached by them."""
    return _area_weights(np.ascontiguousarray(windows[:, :4], np.float64).tobytes(), size, height, width)


@functools.lru_cache(maxsize=16)
def _area_weights(windows: bytes, size: int, height: int, width: int) -> tuple[np.ndarray, ...]:
    """`window_thumbnails`' averaging weights for windows (fractions, float64 [W, 4] as bytes) of a
    height x width image: (across [Kx * size, width], down [Ky * size, height], each window's x and
    y interval). The same for every image of a size: an index computes them once, not per image."""
    fractions = np.frombuffer(windows, np.float64).reshape(-1, 4)
    xs, x_of = np.unique(fractions[:, [0, 2]], axis=0, return_inverse=True)
    ys, y_of = np.unique(fractions[:, [1, 3]], axis=0, return_inverse=True)
    across = _coverage(xs * width, size, width).astype(np.float32).reshape(-1, width)
    down = _coverage(ys * height, size, height).astype(np.float32).reshape(-1, height)
    weights = across, down, x_of.ravel(), y_of.ravel()
    for array in weights:
        array.flags.writeable = False  # shared by every call that hits the cache
    return weights


def crop_windows(config: DedupConfig) -> np.ndarray:
    """(x0, y0, x1, y1, degrees) of every window: [W, 5]. The crops on the grid (fractions,
    upright: 0 degrees), then centred windows of the image rotated by every 5 degrees up to
    `max_rotation` both ways (ROTATED_SIDES of each side): a copy rotated by 5-10 degrees with
    its corners cropped keeps 80-92% of each side, and upright windows do not retrieve it."""
    step = config.window_step
    sides = np.round(np.arange(config.min_side, 1.0 + 1e-9, step), 6)
    windows = []
    for fw in sides:
        for fh in sides:
            if fw * fh < config.min_area - 1e-9:
                continue
            for x0 in np.linspace(0, 1 - fw, max(1, round((1 - fw) / step) + 1)):
                for y0 in np.linspace(0, 1 - fh, max(1, round((1 - fh) / step) + 1)):
                    windows.append((x0, y0, x0 + fw, y0 + fh, 0.0))
    for turns in range(1, int(config.max_rotation / 5 + 1e-9) + 1):
        for degrees in (5.0 * turns, -5.0 * turns):
            for side in ROTATED_SIDES:
                margin = (1 - side) / 2
                windows.append((margin, margin, 1 - margin, 1 - margin, degrees))
    return np.array(windows, dtype=np.float64)


def _pixel_box(window, size: int) -> tuple[float, float, float, float]:
    """A window's fractions (x0, y0, x1, y1) as pixels of a size x size image."""
    x0, y0, x1, y1 = (float(v) * size for v in window)
    return x0, y0, x1, y1


def evaluation_images(source: str) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of every image of an evaluation set: a folder (searched recursively) or shards."""
    if is_image_folder(source):
        root = Path(source)
        for path in image_files(root):
            yield f"{root.name}/{path.relative_to(root).with_suffix('')}", path.read_bytes()
        return
    for sample in read_shard_samples(expand_shard_spec(source)):
        yield f"{Path(sample['__url__']).name}:{sample['__key__']}", sample_image_bytes(sample)


def read_evaluation(
    sources: list[str], short_side: int, on_image: Callable[[Image.Image], None] | None = None
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(keys, STORE x STORE RGB images, skipped (key, reason)) of every image of
    `sources`, each decoded with its shorter side at least `short_side` and handed to `on_image`."""
    keys, pixels, skipped = [], [], []
    for source in sources:
        if not Path(source).exists() and "{" not in source and "://" not in source:
            raise WslError(f"evaluation set not found: {source}")
        for key, data in tqdm(evaluation_images(source), desc=f"reading {source}", unit=" images", dynamic_ncols=True):
            try:
                image = decode_small(data, short_side)
            except DECODE_ERRORS as exn:
                skipped.append((key, f"corrupt image: {exn}"))
                continue
            keys.append(key)
            pixels.append(np.asarray(image.resize((STORE, STORE), Image.BOX, reducing_gap=None)))
            if on_image is not None:
                on_image(image)
    if not keys:
        raise WslError(f"no evaluation images in {', '.join(sources)}")
    return keys, np.stack(pixels), skipped


def write_evaluation(folder: Path, keys: list[str], store: np.ndarray, skipped: list) -> None:
    """The evaluation images' thumbnails and keys; the keys file last, as it marks the index complete."""

    def write_store(tmp: Path) -> None:
        with open(tmp, "wb") as stream:  # a file object: np.save would add ".npy" to a name
            np.save(stream, store)

    write_atomic(folder / "eval-store.npy", write_store)
    write_json(folder / "eval-keys.json", {"keys": keys, "skipped": skipped})


def build_index(sources: list[str], config: DedupConfig, folder: Path) -> EvalIndex | SscdIndex:
    """The evaluation index of `config.descriptor` (pixels: `EvalIndex`, sscd:PATH: `SscdIndex`) built into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if config.descriptor == "pixels":
        return EvalIndex.build(sources, config, folder)
    from wsl.dedup.sscd import SscdIndex

    return SscdIndex.build(sources, config.descriptor, folder)


def open_index(folder: Path, config: DedupConfig, threads: int | None = None) -> EvalIndex | SscdIndex:
    """The evaluation index built into `folder`, memory-mapped where it can be; a network, if the
    descriptor has one, runs on `threads` CPU threads (default: torch's)."""
    if config.descriptor == "pixels":
        return EvalIndex.open(folder, config)
    from wsl.dedup.sscd import SscdIndex

    return SscdIndex.open(folder, config.descriptor, threads)


SIMILARITIES_HELD = 32_000_000  # `exact_search` scores this many similarities at a time (128 MB)


def search_scratch(database: np.ndarray) -> np.ndarray:
    """The buffer `exact_search` writes a chunk of similarities into, held across its calls."""
    return np.empty(max(1, SIMILARITIES_HELD // len(database)) * len(database), np.float32)


def exact_search(
    queries: np.ndarray, database: np.ndarray, k: int, group: int = 1, scratch: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of the `k` rows of `database` with the largest inner product with each
    query, best first: a matrix product and a partial sort, a few queries at a time (at most
    SIMILARITIES_HELD similarities held). With `group` > 1, consecutive rows form groups (an
    image's windows) and only each group's best row competes: the `k` best groups. On this
    project's CPUs it ran 17x faster than `faiss.knn` (BENCHMARKS.md). A caller that searches
    again and again passes `scratch` (`search_scratch`): a fresh 128 MB array for each chunk
    cost its page faults, more than half of the search's time inside `match` (BENCHMARKS.md)."""
    similarity = np.zeros((len(queries), k), np.float32)
    rows = np.zeros((len(queries), k), np.int64)
    chunk = max(1, SIMILARITIES_HELD // len(database))
    for start in range(0, len(queries), chunk):
        part = queries[start : start + chunk]
        held = None if scratch is None else scratch[: len(part) * len(database)].reshape(len(part), len(database))
        scores = np.matmul(part, database.T, out=held)
        if group > 1:
            grouped = scores.reshape(len(scores), -1, group)
            within = grouped.argmax(axis=2)
            scores = np.take_along_axis(grouped, within[..., None], axis=2)[..., 0]
        top = (
            np.argpartition(-scores, k - 1, axis=1)[:, :k]
            if k < scores.shape[1]
            else np.tile(np.arange(k), (len(scores), 1))
        )
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        rows[start : start + chunk] = top * group + np.take_along_axis(within, top, axis=1) if group > 1 else top
        similarity[start : start + chunk] = np.take_along_axis(top_scores, order, axis=1)
    return similarity, rows


IVF_FILE = "eval-windows.faiss"
BOUND_FILE = "eval-windows-bound.npy"  # per window: the terms of `IvfBound` (float32 [windows, 3])
WHOLE_FILE = "eval-whole-windows.npy"  # IVF: each image's whole window's descriptor, and its mirror's [N, 2, D]


class IvfBound:
    """An upper bound on a hit's exact similarity from the IVF index's score, so that a view
    none of whose hits can reach the prefilter skips the exact re-ranking (~2.5 ms a view: the
    stored images' luminance, rotated where the window is, for ~12 (image, mirror, rotation)
    keys) as it would be dropped after it, unless one of the nearest images' whole windows
    is near past an overlay (`_near_past_overlay`, on descriptors the build stores): most of a
    real crawl should be such views.

    The PCA centres on its mean m and projects on orthonormal rows A: z(x) = A (x - m), and
    leaves out R(x), the part of x - m outside A's span. For a query q and a window d,
    q . d = z(q) . z(d) + R(q) . R(d) + m . q + m . d - m . m exactly. The index scores
    z(q) . z'(d), where z'(d) is z(d) as its 8-bit codes decode; so, by Cauchy-Schwarz,
    q . d <= score + |z(q)| |z'(d) - z(d)| + |R(q)| |R(d)| + m . q + m . d - m . m.
    The build stores each window's |z'(d) - z(d)|, |R(d)| and m . d (12 bytes, ~9% of the
    index's 136)."""

    def __init__(self, index, window_terms: np.ndarray):
        import faiss

        self.pca, self.mean = _pca_of(index)
        rows = faiss.vector_to_array(self.pca.A).reshape(self.pca.d_out, self.pca.d_in).astype(np.float64)
        if not np.allclose(rows @ rows.T, np.eye(self.pca.d_out), atol=1e-4):  # the bound rests on it
            raise WslError("the IVF index's PCA rows are not orthonormal (whitened?): rebuild it with this version")
        self.window_terms = window_terms

    @staticmethod
    def add_windows(index, descriptors: np.ndarray) -> np.ndarray:
        """Adds windows to the IVF index as `index.add` does (projected, assigned a list, the rest
        encoded in 8 bits), assigning each once for both, and returns their terms [N, 3]:
        |z'(d) - z(d)|, |R(d)| and m . d."""
        import faiss
        from faiss.contrib.ivf_tools import add_preassigned

        pca, mean = _pca_of(index)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        projected = pca.apply(descriptors)
        lists = ivf.quantizer.assign(projected, 1)[:, 0]
        add_preassigned(ivf, projected, lists)
        index.ntotal = ivf.ntotal  # as `IndexPreTransform.add` keeps it
        residual = projected - ivf.quantizer.reconstruct_batch(lists)
        error = np.linalg.norm(ivf.sq.decode(ivf.sq.compute_codes(residual)) - residual, axis=1)
        return np.stack([error, _left_out(descriptors, projected, mean), descriptors @ mean], axis=1).astype(np.float32)

    def query_terms(self, queries: np.ndarray) -> np.ndarray:
        """[N, 3]: each query's |z(q)|, |R(q)| and m . q - m . m."""
        projected = self.pca.apply(queries)
        return np.stack(
            [
                np.linalg.norm(projected.astype(np.float64), axis=1),
                _left_out(queries, projected, self.mean),
                queries @ self.mean - self.mean @ self.mean,
            ],
            axis=1,
        )

    def upper(self, query_terms: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The bound on the exact similarity of each hit (index row) with the query."""
        error, left_out, centre = np.asarray(self.window_terms[rows], np.float64).T
        return scores + query_terms[0] * error + query_terms[1] * left_out + query_terms[2] + centre + ROUNDING


def _pca_of(index) -> tuple:
    """(the PCA transform, its mean as float64) of a `PCA...,IVF...,SQ8` index."""
    import faiss

    pca = faiss.downcast_VectorTransform(index.chain.at(0))
    return pca, faiss.vector_to_array(pca.mean).astype(np.float64)


def _left_out(x: np.ndarray, projected: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """|R(x)|: the length of x - mean outside the PCA's span (in float64: the difference of two
    near sums of squares)."""
    centred = x.astype(np.float64) - mean
    inside = (projected.astype(np.float64) ** 2).sum(axis=1)
    return np.sqrt(np.maximum((centred**2).sum(axis=1) - inside, 0.0))


class EvalIndex:
    """The evaluation images: every window's coarse descriptor, searched with FAISS, and the
    images at STORE x STORE for verification. Both live in .npy files that worker processes
    map into memory, so a machine holds them once. `match` scores pretraining images."""

    def __init__(
        self,
        keys: list[str],
        store: np.ndarray,
        windows_index,
        config: DedupConfig,
        bound: IvfBound | None = None,
        wholes: np.ndarray | None = None,
    ):
        self.keys, self.store, self.config = keys, store, config
        self.windows_index = windows_index  # a memory-mapped [windows, D] array (exact search) or a FAISS IVF index
        self.bound = bound  # the IVF index's bound on its hits' exact similarities
        self.wholes = wholes  # IVF: each image's whole window's descriptor and its mirror's [N, 2, D], memory-mapped
        self.windows = crop_windows(config)
        self.per_image = 2 * len(self.windows)
        self.whole_window = _whole_window(self.windows)
        self.exact = isinstance(windows_index, np.ndarray)  # searched by `exact_search`, else by FAISS
        self.scratch = search_scratch(windows_index) if self.exact else None  # (pages touched only when used)

    @staticmethod
    def _views(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An evaluation image and its mirror image."""
        return pixels, pixels[:, ::-1]

    @classmethod
    def build(cls, sources: list[str], config: DedupConfig, folder: Path) -> EvalIndex:
        """Index every image of `sources` into `folder` (undecodable ones are skipped, listed in the keys file)."""
        keys, store, skipped = read_evaluation(sources, STORE)
        windows = crop_windows(config)
        total = len(keys) * 2 * len(windows)
        if config.index == "ivf" or (config.index == "auto" and total > config.ivf_above):
            cls._build_ivf(store, windows, config, folder)
        else:

            def write_windows(tmp: Path) -> None:
                descriptors = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.float32, shape=(total, COARSE * COARSE)
                )
                per_image = 2 * len(windows)
                for i, image_pixels in enumerate(
                    tqdm(store, desc="indexing evaluation windows", unit=" images", dynamic_ncols=True)
                ):
                    descriptors[i * per_image : (i + 1) * per_image] = cls._window_descriptors(image_pixels, windows)
                descriptors.flush()

            write_atomic(folder / "eval-windows.npy", write_windows)

        write_evaluation(folder, keys, store, skipped)
        return cls.open(folder, config)

    @classmethod
    def _window_descriptors(cls, pixels: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """The coarse descriptors of every window of an image, then of its mirror: [2W, D]. A
        rotated window is taken from the image rotated about its centre (the stored square's)."""
        descriptors = []
        for view in cls._views(pixels):
            found = np.empty((len(windows), COARSE * COARSE), np.float32)
            for degrees in np.unique(windows[:, 4]):
                rows = windows[:, 4] == degrees
                found[rows] = window_thumbnails(_turned_pixels(view, float(degrees)), windows[rows, :4], COARSE)
            descriptors.append(found)
        return np.concatenate(descriptors)

    @classmethod
    def _build_ivf(cls, store: np.ndarray, windows: np.ndarray, config: DedupConfig, folder: Path) -> None:
        """A compressed window index (PCA, IVF, 8-bit codes), trained on evenly spaced images, and
        each window's terms of `IvfBound`, and each image's whole windows' descriptors (what
        `_near_past_overlay` reads before the re-ranking), written atomically."""
        import faiss

        per_image, whole = 2 * len(windows), _whole_window(windows)
        total = len(store) * per_image
        nlist = config.nlist or max(1, int(4 * math.sqrt(total)))
        train_images = min(len(store), max(1, -(-max(64 * nlist, 100_000) // per_image)))
        sample = np.unique(np.linspace(0, len(store) - 1, train_images).astype(int))
        index = faiss.index_factory(COARSE * COARSE, f"PCA{config.pca_dim},IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        index.train(np.concatenate([cls._window_descriptors(store[i], windows) for i in sample]))

        def add_and_write_terms(terms_tmp: Path) -> None:
            terms = np.lib.format.open_memmap(terms_tmp, mode="w+", dtype=np.float32, shape=(total, 3))

            def add_and_write_wholes(wholes_tmp: Path) -> None:
                shape = (len(store), 2, COARSE * COARSE)
                wholes = np.lib.format.open_memmap(wholes_tmp, mode="w+", dtype=np.float32, shape=shape)
                for start in tqdm(
                    range(0, len(store), 256),
                    desc="indexing evaluation windows (IVF)",
                    unit=" x256 images",
                    dynamic_ncols=True,
                ):
                    images = store[start : start + 256]
                    descriptors = np.concatenate([cls._window_descriptors(p, windows) for p in images])
                    first = start * per_image
                    terms[first : first + len(descriptors)] = IvfBound.add_windows(index, descriptors)
                    wholes[start : start + len(images)] = descriptors.reshape(len(images), 2, len(windows), -1)[
                        :, :, whole
                    ]
                wholes.flush()

            write_atomic(folder / WHOLE_FILE, add_and_write_wholes)
            terms.flush()

        write_atomic(folder / BOUND_FILE, add_and_write_terms)
        write_atomic(folder / IVF_FILE, lambda tmp: faiss.write_index(index, str(tmp)))

    @classmethod
    def open(cls, folder: Path, config: DedupConfig) -> EvalIndex:
        """The index of `folder`, memory-mapped: worker processes on a machine share one copy."""
        keys = json.loads((folder / "eval-keys.json").read_text())["keys"]
        store = np.load(folder / "eval-store.npy", mmap_mode="r")
        if (folder / IVF_FILE).is_file():
            import faiss

            search_index = faiss.read_index(str(folder / IVF_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            faiss.extract_index_ivf(search_index).nprobe = config.nprobe
            bound = IvfBound(search_index, np.load(folder / BOUND_FILE, mmap_mode="r"))
            return cls(keys, store, search_index, config, bound, np.load(folder / WHOLE_FILE, mmap_mode="r"))
        return cls(keys, store, np.load(folder / "eval-windows.npy", mmap_mode="r"), config)

    @staticmethod
    def decode(data: bytes) -> Image.Image:
        """A pretraining image as `match` takes it: decoded small enough to be cheap (JPEG draft mode)."""
        return decode_small(data, 2 * FINE)

    def coarse_search(self, queries: np.ndarray, images: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest windows by inner product, best first: exactly over the memory-mapped descriptors
        (each of the `images` nearest evaluation images' best window), or through the IVF index
        (the IVF_HITS nearest windows, of which `_spread` keeps RERANK for `_exact_order`)."""
        if not self.exact:
            return self.windows_index.search(queries, min(len(self.keys) * self.per_image, IVF_HITS))
        return exact_search(
            queries, self.windows_index, min(len(self.keys), images), group=self.per_image, scratch=self.scratch
        )

    def _verify(
        self,
        query: Image.Image,
        row: int | None,
        overlay_row: int,
        plain_query: np.ndarray,
        overlay_window: np.ndarray,
        gate: float = OVERLAY_GATE,
    ) -> float:
        """Detail correlation of `query` with the window near index row `row` that fits it best
        (`overlay_row` and its plain descriptor `overlay_window`: where the realignment past an
        overlay starts, `_starts`; `row` None: only that realignment, `_next_past_overlay`).

        Coordinate ascent over the window's edges, position and size: first on the whole FINE
        thumbnail (brings the objects into line; a candidate that lines up below `give_up`
        after the coarse steps, or below `align_min` after the fine ones, is scored there),
        then on its detail (lines up the texture; not where the detail starts below DETAIL_START,
        no 0.25% steps where it is below DETAIL_GIVE_UP after the 0.5% ones); where that stays
        below the threshold, the detail over the blocks whose colours agree (an overlay's blocks
        left out), less `overlay_penalty`. A window lined up under SMALL_WINDOW of `min_area` scores
        `small_window_penalty` less. A rotated window is lined up on the evaluation image
        rotated alike (in the copy's aspect), then, where that fails, upright. Where all that
        stays below the threshold and the whole thumbnails correlate at `gate` or more at
        the start without the blocks under the OVERLAY_SHARE of `plain_query`'s cells farthest
        from `overlay_window` (unclipped cells: clipping caps the overlay's, the ones to find),
        both ascents run again without those blocks, less
        `realigned_penalty`: stickers that pull the whole alignment off a copy. A grayscale
        query is compared on luminance, a colour one in RGB."""
        grayscale = is_grayscale(query)
        if grayscale:
            query = query.convert("L")
        query_pixels = pixels_of(query.resize((FINE, FINE), Image.BOX, reducing_gap=None))
        whole = normalised(query_pixels)  # zero mean in each channel, unit length
        query_detail = detail(query_pixels)  # zero block means
        channels = 1 if grayscale else 3
        ones = np.ones(FINE * FINE)

        def window_pixels(image: Image.Image, w: np.ndarray) -> np.ndarray:
            resized = image.resize((FINE, FINE), Image.BOX, box=_pixel_box(w, STORE), reducing_gap=None)
            return np.frombuffer(resized.tobytes(), np.uint8).astype(np.float64)

        # Correlations without normalising each trial: as the query's vector sums to zero over each
        # channel (over each block), its product with the window's equals that with the window's
        # centred vector (its detail), whose length follows from the sums of squares. (Sums by
        # matrix product and by adding slices: numpy's strided `sum` took most of the time.)
        def whole_correlation(image: Image.Image, w: np.ndarray) -> float:
            b = window_pixels(image, w)
            sums = ones @ b.reshape(-1, channels)
            return _correlation(whole @ b, b @ b - sums @ sums / (FINE * FINE))

        def block_sums(b: np.ndarray) -> np.ndarray:
            """The sums of a window's 4 x 4 blocks in each channel (FINE/4 x FINE/4 x C)."""
            lines = b.reshape(FINE // 4, 4, FINE * channels)
            lines = (lines[:, 0] + lines[:, 1] + lines[:, 2] + lines[:, 3]).reshape(FINE // 4, FINE // 4, 4, channels)
            return lines[:, :, 0] + lines[:, :, 1] + lines[:, :, 2] + lines[:, :, 3]

        def detail_correlation(image: Image.Image, w: np.ndarray) -> float:
            b = window_pixels(image, w)
            sums = block_sums(b)
            return _correlation(query_detail @ b, b @ b - (sums * sums).sum() / 16)

        # The stored image is square, so a rotation is taken in the copy's aspect (a crop of a
        # rotated image keeps the aspect of the original).
        aspect = query.width / query.height

        give_up = self.config.give_up
        smallest = SMALL_WINDOW * self.config.min_area

        def small_penalty(w: tuple[float, ...]) -> float:
            return self.config.small_window_penalty if (w[2] - w[0]) * (w[3] - w[1]) < smallest else 0.0

        def lined_up(image: Image.Image, window: np.ndarray) -> float:
            window, aligned = _ascend(
                functools.partial(whole_correlation, image), window, (0.02, 0.01), give_up, FIRST_PASS_GIVE_UP
            )
            if aligned < max(give_up, self.config.align_min):  # not a copy: most non-copies, scored as they stand
                return detail_correlation(image, window)
            detail_of = functools.partial(detail_correlation, image)
            refined, best = _ascend(detail_of, window, (0.005, 0.0025), DETAIL_GIVE_UP, start_give_up=DETAIL_START)
            penalty = small_penalty(refined)
            best -= penalty
            if best < self.config.copy_threshold:  # stickers, text or a band over the copy?
                covered = window_pixels(image, refined).reshape(query_pixels.shape)
                best = max(best, _uncovered_correlation(query_pixels, covered) - self.config.overlay_penalty - penalty)
            return best

        def view_of(row: int) -> tuple[Image.Image, Image.Image, np.ndarray, float]:
            pixels, window, degrees = self._window(row)
            image = Image.fromarray(np.ascontiguousarray(pixels))
            image = image.convert("L") if grayscale else image
            return image, _turned(image, degrees, aspect) if degrees else image, window, degrees

        best = 0.0
        if row is not None:
            image, turned, window, degrees = view_of(row)
            best = lined_up(turned, window)
            if degrees and best < self.config.copy_threshold:
                # A rotated window: the copy is lined up on the evaluation image rotated alike; where that
                # fails, upright from the same window (a vignette or a crop can favour a rotated window).
                best = max(best, lined_up(image, window))
            if best >= self.config.copy_threshold:
                return best
        # An overlay the alignment could not see past: line up again without the blocks under the
        # coarse cells farthest from the window's (stickers or text are in the copy's frame, so
        # the blocks left out stay put as the window moves).
        if overlay_row != row:
            image, turned, window, degrees = view_of(overlay_row)
        uncovered = _uncovered_blocks(plain_query, overlay_window)
        uncovered_query = _kept_unit(query_pixels, uncovered, centre=True)
        if uncovered_query is None:
            return best
        keep = uncovered[::4, ::4]  # the blocks
        kept_pixels = uncovered.ravel().astype(np.float64)
        kept, counts = kept_pixels.repeat(channels), kept_pixels.sum()

        def uncovered_whole(image: Image.Image, w: np.ndarray) -> float:
            b = window_pixels(image, w)
            sums = kept_pixels @ b.reshape(-1, channels)
            return _correlation(uncovered_query @ b, (kept * b) @ b - sums @ sums / counts)

        def uncovered_detail(image: Image.Image, w: np.ndarray) -> float:
            b = window_pixels(image, w)
            sums = block_sums(b)
            return _correlation(uncovered_query_detail @ b, (kept * b) @ b - (sums * sums)[keep].sum() / 16)

        if uncovered_whole(turned, window) < gate:  # most non-copies stop here
            return best
        uncovered_query_detail = _kept_unit(query_detail.reshape(query_pixels.shape), uncovered, centre=False)
        window, aligned = _ascend(functools.partial(uncovered_whole, turned), window, (0.02, 0.01), give_up)
        if aligned < max(give_up, self.config.align_min):
            return best
        refined, realigned = _ascend(functools.partial(uncovered_detail, turned), window, (0.005, 0.0025))
        return max(best, realigned - self.config.realigned_penalty - small_penalty(refined))

    def _exact_order(
        self, query: np.ndarray, rows: np.ndarray, hits: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The IVF index's hits `rows` (`_spread`'s of all its `hits`) re-ranked by their exact
        similarity, recomputed from the stored images (PCA and 8-bit codes change the
        similarities, and the prefilter is defined on exact ones), with the whole windows (and
        their mirrors) of every image among the hits, whose descriptors the build stores: a
        copy of a whole image is nearest its original's whole window, which the hits re-ranked
        can leave out where other images' windows crowd them (on `make bench-dedup`, a colour
        filtered copy's original). (similarities, rows, the rows' descriptors), best first."""
        owners = np.unique(hits // self.per_image)
        wholes = np.concatenate([owners * self.per_image, owners * self.per_image + len(self.windows)])
        wholes = np.setdiff1d(wholes + self.whole_window, rows)
        descriptors = np.concatenate([self._row_descriptors(rows), self._stored_wholes(wholes)])
        rows = np.concatenate([rows, wholes])
        exact = np.array([query @ descriptor for descriptor in descriptors], dtype=np.float32)
        order = np.argsort(-exact, kind="stable")
        return exact[order], rows[order], descriptors[order]

    def _spread(self, rows: np.ndarray) -> np.ndarray:
        """Positions in `rows` of the IVF index's nearest RERANK hits (best first), then, where
        they hold fewer than SHORTLIST evaluation images, of the nearest RERANK_PER_IMAGE windows
        of each next image among the hits until SHORTLIST (or `candidates`) are held. An image's ~1,000 windows lie near
        one another: on `make bench-dedup` the nearest 64 held 5-8 images, and colour-filtered
        copies' originals came 133rd-260th (the exact search takes each image's best window alone)."""
        images = max(SHORTLIST, self.config.candidates)  # as many as `_shortlist` reads
        owners = (rows // self.per_image).tolist()
        held = set(owners[:RERANK])
        taken: dict[int, int] = {}  # windows taken of each further image
        further = []  # (a Python loop: a few hundred hits, where numpy's set operations took 5% of a view)
        for position, owner in enumerate(owners[RERANK:], RERANK):
            if owner in held or taken.get(owner, 0) >= RERANK_PER_IMAGE:
                continue
            if owner not in taken and len(held) + len(taken) >= images:
                continue
            taken[owner] = taken.get(owner, 0) + 1
            further.append(position)
        return np.concatenate([np.arange(min(RERANK, len(rows))), np.array(further, np.int64)])

    def _shortlist(
        self, query: np.ndarray, sims: np.ndarray, rows: np.ndarray, descriptors: np.ndarray | None = None
    ) -> np.ndarray:
        """The nearest window of each of the SHORTLIST nearest evaluation images (verification's
        candidates), ordered by the mean of their similarity and their `_trimmed_similarity`:
        stickers or a caption band move a few cells of a copy's descriptor far from its
        original's, which can rank another image first. On `make bench-dedup`, with cells not yet
        clipped, this ordering brought the right image first for 42 of 49 copies under stickers
        (37 by similarity alone), and for no fewer of any other edit's copies; with the clipped
        cells, for 94 of 100 fresh demo sticker copies against 91 (the test). `descriptors`: the
        rows' own, where `_exact_order` computed them (IVF); otherwise read from the exact index."""
        first = self._nearest_of_each_image(rows, max(SHORTLIST, self.config.candidates))
        rows = rows[first]
        descriptors = np.asarray(self.windows_index[rows]) if descriptors is None else descriptors[first]
        order = np.argsort(-(sims[first] + _trimmed_similarity(query, descriptors)), kind="stable")
        return rows[order]

    def _nearest_of_each_image(self, rows: np.ndarray, images: int) -> np.ndarray:
        """Positions in `rows` (best first) of the nearest window of each of the first `images` evaluation images."""
        return np.sort(np.unique(rows // self.per_image, return_index=True)[1])[:images]

    def _near_past_overlay(self, query: np.ndarray, rows: np.ndarray, descriptors: np.ndarray | None) -> bool:
        """Whether one of the SHORTLIST nearest evaluation images reaches `overlay_prefilter` without
        the cells an overlay covers (`_trimmed_similarity`), at its nearest window or at its whole
        one (of the same mirror): stickers can pull a copy's similarity below the prefilter, and its
        nearest window onto a crop (`_starts`), or another image nearest. Exact index: the rows'
        stored descriptors; IVF: the hits' re-ranked `descriptors` and the whole windows' stored
        ones, or, before the re-ranking (`descriptors` None, where `IvfBound` holds every hit
        below the prefilter), the whole windows alone: of the 348 views the bound held back on
        `make bench-dedup`, they let through a sticker copy's and 3 other copies', no non-copy's."""
        if not len(rows):
            return False
        positions = self._nearest_of_each_image(rows, SHORTLIST)
        nearest = rows[positions]
        if self.exact:
            wholes = [self._whole_row(row) for row in nearest]
            windows = np.asarray(self.windows_index[np.concatenate([nearest, wholes])])
        else:
            windows = self._stored_wholes(nearest)
            if descriptors is not None:
                windows = np.concatenate([descriptors[positions], windows])
        return bool(_trimmed_similarity(query, windows).max() >= self.config.overlay_prefilter)

    def _next_past_overlay(self, query: np.ndarray, row: int) -> tuple[int, np.ndarray] | None:
        """Where the shortlisted image after the verified ones (row `row`) is lined up past an
        overlay, and the start's plain descriptor: its nearest window or its whole one, whichever
        is nearer without an overlay's cells (as `_starts`), where that reaches NEXT_TRIMMED; None
        otherwise. Stickers can rank another of alike scenes first (on `make bench-dedup` a copy's
        original came second at 0.946 against 0.912); the realignment runs from NEXT_GATE, above
        OVERLAY_GATE: 117 failed non-copies' next images reached 0.9 there, 32 reached 0.95."""
        starts = np.array([row, self._whole_row(row)])
        # (their stored descriptors on the exact index: most next images stop here)
        descriptors = np.asarray(self.windows_index[starts]) if self.exact else self._row_descriptors(starts)
        trimmed = _trimmed_similarity(query, descriptors)
        if trimmed.max() < NEXT_TRIMMED:
            return None
        start = int(starts[int(trimmed[1] > trimmed[0])])
        return start, normalised(self._row_cells(np.array([start])))[0]

    def _starts(
        self, query: np.ndarray, plain_query: np.ndarray, row: int, rows: np.ndarray, descriptors: np.ndarray | None
    ) -> tuple[int, int, np.ndarray]:
        """Where verification of row `row`'s evaluation image starts: (the row whose plain
        descriptor is nearest `plain_query` among the image's START_WINDOWS nearest `query`; where
        the realignment past an overlay starts; its descriptor). Clipping (`robust_normalised`)
        finds the image under an overlay, but it flattens a bright object too, and the window the
        plain cells favour lines up better where there is no overlay (on `make bench-dedup`, 2
        more crops found). The realignment starts from the nearest window or the image's whole
        one (of the same mirror), whichever is nearer without an overlay's cells
        (`_trimmed_similarity`): stickers over a whole photo can pull the nearest onto a crop.
        Of all the image's windows on the exact index (a product with its ~1,000 rows); on the
        IVF index, of its re-ranked hits `rows` (with their `descriptors`)."""
        owner = row // self.per_image
        if self.exact:
            own = np.asarray(self.windows_index[owner * self.per_image : (owner + 1) * self.per_image])
            sims = own @ query
            nearest = np.argpartition(-sims, START_WINDOWS - 1)[:START_WINDOWS]
            nearest = nearest[np.argsort(-sims[nearest], kind="stable")] + owner * self.per_image
            nearest_descriptor = own[nearest[0] - owner * self.per_image]
        else:
            mine = np.flatnonzero(rows // self.per_image == owner)[:START_WINDOWS]
            nearest, nearest_descriptor = rows[mine], descriptors[mine[0]]
        whole = self._whole_row(nearest[0])
        cells = self._row_cells(np.append(nearest, whole))
        start = int(nearest[int(np.argmax(normalised(cells[:-1]) @ plain_query))])
        trimmed = _trimmed_similarity(query, np.stack([nearest_descriptor, robust_normalised(cells[-1:])[0]]))
        if trimmed[1] > trimmed[0]:
            return start, whole, normalised(cells[-1])
        return start, int(nearest[0]), normalised(cells[0])

    def _locate(self, row: int) -> tuple[int, int, int]:
        """(evaluation image, 1 where mirrored, window) of index row `row`: each image's windows,
        then its mirror's."""
        owner, rest = divmod(int(row), self.per_image)
        flip, window_id = divmod(rest, len(self.windows))
        return owner, flip, window_id

    def _stored_wholes(self, rows: np.ndarray) -> np.ndarray:
        """IVF: the descriptors the build stores of the whole windows of index rows' evaluation
        images (of the same mirror as each row), [N, D]."""
        return np.asarray(self.wholes[rows // self.per_image, rows % self.per_image // len(self.windows)])

    def _whole_row(self, row: int) -> int:
        """The index row of the whole, upright window of row `row`'s evaluation image (or of its mirror)."""
        owner, flip, _ = self._locate(row)
        return owner * self.per_image + flip * len(self.windows) + self.whole_window

    def _window(self, row: int) -> tuple[np.ndarray, np.ndarray, float]:
        """What index row `row` stands for: the evaluation image (or its mirror), the window's
        fractions, and the degrees the image is rotated by before it is cut."""
        owner, flip, window_id = self._locate(row)
        window = self.windows[window_id]
        return self._views(np.asarray(self.store[owner]))[flip], window[:4].copy(), float(window[4])

    def _row_descriptors(self, rows: np.ndarray) -> np.ndarray:
        """The coarse descriptors [N, D] of index rows: `_row_cells`, `robust_normalised` (each
        row's floats as if normalised alone)."""
        return robust_normalised(self._row_cells(rows))

    def _row_cells(self, rows: np.ndarray) -> np.ndarray:
        """The coarse cells [N, COARSE, COARSE, 1] of index rows, as the build's `window_thumbnails`
        computes them: each window area-averaged from its image's luminance by two products
        with the weights of the whole window set, which are the same for every stored image
        (one cache entry; weights for one window at a time missed the cache: 45 ms a view on
        the IVF path, most of its time). One row at a time, in fixed shapes: a row's floats do
        not depend on which rows come with it (the same floats as `window_thumbnails` of that
        window alone)."""
        across, down, x_of, y_of = _window_weights(self.windows, COARSE, STORE, STORE)
        grey: dict[tuple[int, int, float], np.ndarray] = {}  # luminance of each (image, mirror, rotation)
        bands: dict[tuple, np.ndarray] = {}  # a key's rows averaged per row interval: a view's ~78 hits fall in ~33
        cells = np.empty((len(rows), COARSE, COARSE, 1), np.float32)
        for i, row in enumerate(rows):
            owner, flip, window_id = self._locate(row)
            key = (owner, flip, float(self.windows[window_id, 4]))
            if key not in grey:
                pixels = self._views(np.asarray(self.store[owner]))[flip]
                grey[key] = luminance(_turned_pixels(pixels, key[2]))[..., 0]
            y, x = y_of[window_id] * COARSE, x_of[window_id] * COARSE
            band = bands.get((key, y))
            if band is None:
                band = bands[key, y] = down[y : y + COARSE] @ grey[key]
            cells[i, ..., 0] = band @ across[x : x + COARSE].T
        return cells

    def match(self, images: list[Image.Image]) -> list[tuple[float, int]]:
        """(verification score, evaluation image) of each pretraining image's best match; (0, -1)
        where no evaluation image was verified (the first verified one is kept whatever its score).

        An image that may hold a photo inside a frame, bars or a blurred background
        (`content_boxes`) is also searched and verified as that photo alone; the best score is
        the image's."""
        if not images:
            return []
        views = [[image, *(image.crop(box) for box in content_boxes(image))] for image in images]
        flat = [view for image_views in views for view in image_views]
        cells = np.stack([retrieval_cells(view) for view in flat])
        coarse, plain = robust_normalised(cells), normalised(cells)
        similarity, rows = self.coarse_search(coarse, max(self.config.candidates, SHORTLIST))
        query_terms = None if self.exact else self.bound.query_terms(coarse)
        results, view_id = [], 0
        for image_views in views:
            best = (0.0, -1)
            for view in image_views:
                query, sims, found, descriptors = coarse[view_id], similarity[view_id], rows[view_id], None
                view_id += 1
                if best[0] >= self.config.copy_threshold:
                    continue  # an earlier view of the image is a copy
                if not self.exact:
                    valid = found >= 0
                    found, scores = found[valid], sims[valid]
                    hits = found
                    kept = self._spread(found)
                    found, scores = found[kept], scores[kept]  # the hits re-ranked, with the index's scores
                    reachable = self.bound.upper(query_terms[view_id - 1], scores, found).max(initial=-1.0)
                    if reachable < self.config.prefilter and not self._near_past_overlay(query, found, None):
                        continue  # no hit can reach the prefilter, nor a whole window past an overlay
                    sims, found, descriptors = self._exact_order(query, found, hits)
                if not len(found) or (
                    sims[0] < self.config.prefilter and not self._near_past_overlay(query, found, descriptors)
                ):
                    continue
                shortlist = self._shortlist(query, sims, found, descriptors)
                for row in shortlist[: self.config.candidates]:
                    start, overlay_start, overlay_window = self._starts(
                        query, plain[view_id - 1], int(row), found, descriptors
                    )
                    score = self._verify(view, start, overlay_start, plain[view_id - 1], overlay_window)
                    if score > best[0] or best[1] < 0:
                        best = (score, int(row) // self.per_image)
                if best[0] < self.config.copy_threshold and len(shortlist) > self.config.candidates:
                    row = int(shortlist[self.config.candidates])
                    past = self._next_past_overlay(query, row)
                    if past is not None:
                        score = self._verify(view, None, past[0], plain[view_id - 1], past[1], NEXT_GATE)
                        if score > best[0]:
                            best = (score, row // self.per_image)
            results.append(best)
        return results


def _whole_window(windows: np.ndarray) -> int:
    """The position of the whole, upright window among `crop_windows`."""
    return int(np.flatnonzero((windows == (0, 0, 1, 1, 0)).all(axis=1))[0])


def _turned(image: Image.Image, degrees: float, aspect: float) -> Image.Image:
    """A STORE x STORE image rotated by `degrees` about its centre, in an image of width / height `aspect`."""
    return image.transform(image.size, Image.AFFINE, _rotation_about_centre(degrees, aspect, STORE), Image.BILINEAR)


def _turned_pixels(pixels: np.ndarray, degrees: float) -> np.ndarray:
    """A STORE x STORE x 3 image rotated by `degrees` about its centre (itself where 0)."""
    return np.asarray(_turned(Image.fromarray(np.ascontiguousarray(pixels)), degrees, 1.0)) if degrees else pixels


def _rotation_about_centre(degrees: float, aspect: float, size: int) -> tuple[float, ...]:
    """PIL's affine data (output pixel -> input pixel) rotating a size x size image by `degrees`
    about its centre, the rotation taken in an image of width / height `aspect` squeezed to a square."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    a, b, d, e = c, -s / aspect, s * aspect, c
    centre = size / 2
    return (a, b, centre - a * centre - b * centre, d, e, centre - d * centre - e * centre)


def _uncovered_correlation(query: np.ndarray, window: np.ndarray, block: int = 4) -> float:
    """Detail correlation of two FINE x FINE x C images over the blocks of theirs whose colours
    agree: an overlay (stickers, text, a caption band) changes its blocks' mean colours, which a
    copy's other blocks keep. A block is left out where its mean departs from the window's, once
    the two are matched in brightness and contrast on the blocks kept, by more than 5x the median
    block's (at most 30% of the blocks: the fit is refined once without them)."""
    q, w = query.astype(np.float64), window.astype(np.float64)
    side, channels = len(q) // block, q.shape[2]
    terms = np.stack([q, w, q * w, q * q, w * w]).reshape(5, side, block, side, block, channels)
    terms = sum(terms[:, :, i] for i in range(block))  # per-block sums by adding slices: numpy's
    sums = sum(terms[:, :, :, i] for i in range(block)).reshape(5, side * side, channels)  # strided sum is slow
    q_mean, w_mean = sums[0] / block**2, sums[1] / block**2
    keep = np.ones(side * side, bool)
    for _ in range(2):
        q_off, w_off = q_mean - q_mean[keep].mean(axis=0), w_mean - w_mean[keep].mean(axis=0)
        gain = math.sqrt((q_off[keep] ** 2).sum() / max((w_off[keep] ** 2).sum(), 1e-6))
        departure = ((q_off - gain * w_off) ** 2).sum(axis=1)
        ordered = np.sort(departure)
        keep = departure <= max(5 * ordered[len(ordered) // 2], ordered[int(0.7 * len(ordered))])
    # each block's centred products: sum(q w) - n mean(q) mean(w), and alike for the squares
    n = block**2
    product = (sums[2] - n * q_mean * w_mean)[keep].sum()
    spread = math.sqrt((sums[3] - n * q_mean**2)[keep].sum() * (sums[4] - n * w_mean**2)[keep].sum())
    return float(product) / spread if spread > 1.0 else 0.0


def _uncovered_blocks(query: np.ndarray, window: np.ndarray, block: int = 4) -> np.ndarray:
    """FINE x FINE booleans: the pixels of the block x block blocks of a FINE thumbnail clear of
    the OVERLAY_SHARE of the coarse cells farthest from the fit `query ~ (query . window) window`
    (an overlay's)."""
    residual = (query - (query @ window) * window) ** 2
    farthest = round(OVERLAY_SHARE * query.size)
    covered = np.zeros(COARSE * COARSE, bool)
    covered[np.argpartition(-residual, farthest)[:farthest]] = True
    fine = np.repeat(np.repeat(covered.reshape(COARSE, COARSE), FINE // COARSE, 0), FINE // COARSE, 1)
    side = FINE // block
    keep = ~fine.reshape(side, block, side, block).any(axis=(1, 3))
    return np.repeat(np.repeat(keep, block, axis=0), block, axis=1)


def _kept_unit(values: np.ndarray, kept: np.ndarray, centre: bool) -> np.ndarray | None:
    """A FINE x FINE x C thumbnail zeroed outside the `kept` pixels, centred over them (in each
    channel) where `centre`, as a unit vector; None where nothing is left."""
    values = values.astype(np.float64)
    if centre:
        values -= values[kept].mean(axis=0)
    values *= kept[..., None]
    norm = float(np.linalg.norm(values))
    return values.ravel() / norm if norm > 1e-6 else None


def _trimmed_similarity(query: np.ndarray, descriptors: np.ndarray) -> np.ndarray:
    """Correlation of a coarse descriptor with each of `descriptors` [N, D] over the cells where they
    agree: the OVERLAY_CELLS farthest from `query` ~ (query . d) d are left out (an overlay's; of
    cells tied at the bound, the later ones). Sums over a mask by matrix products after a partial
    sort of the residuals' values: gathering the kept cells by `argpartition` took twice as long."""
    fit = descriptors @ query
    residual = (query[None] - fit[:, None] * descriptors) ** 2
    kept = round(query.size * (1 - OVERLAY_CELLS))
    bound = np.partition(residual, kept - 1, axis=1)[:, kept - 1 : kept]
    below, tied = residual < bound, residual == bound
    mask = (below | (tied & (np.cumsum(tied, axis=1) <= kept - below.sum(axis=1, keepdims=True)))).astype(np.float32)
    masked = mask * descriptors
    query_sums, sums = mask @ query, masked.sum(axis=1)
    covariance = masked @ query - query_sums * sums / kept
    query_spread = mask @ (query * query) - query_sums * query_sums / kept
    spread = (masked * descriptors).sum(axis=1) - sums * sums / kept
    return covariance / np.sqrt(np.maximum(query_spread * spread, 0.0) + 1e-12)


def _correlation(product: float, spread: float) -> float:
    """A unit vector's product with a centred vector, divided by that vector's length (the
    square root of `spread`, its sum of squares); 0 for a flat one (spread under one grey level squared)."""
    return float(product) / math.sqrt(spread) if spread > 1.0 else 0.0


def _ascend(
    objective,
    window: np.ndarray,
    steps: tuple[float, ...],
    give_up: float = -math.inf,
    first_pass_give_up: float = -math.inf,
    start_give_up: float = -math.inf,
) -> tuple[np.ndarray, float]:
    """Coordinate ascent of objective(window) over single edges, shifts and scalings, one step
    size after another, among windows with sides of at least half the image's; it stops early
    where, after a step size, the best is below `give_up`, or after the first pass over the
    moves, below `first_pass_give_up`; it does not start where the starting window scores below
    `start_give_up`.
    A window met again (the one just left is the next one's neighbour) is not scored twice.
    (Windows are tuples of floats here: numpy's per-call overhead on 4 numbers was a tenth of
    the verification's time.)"""
    current = tuple(float(v) for v in window)
    best = objective(current)
    if best < start_give_up:
        return np.array(current), best
    seen = {tuple(round(v, 9) for v in current): best}
    for step in steps:
        deltas = [tuple(sign * step * v for v in move) for move in _MOVES for sign in (-1, 1)]
        improved = True
        while improved:
            improved = False
            for d0, d1, d2, d3 in deltas:  # written out: generator expressions took a tenth of the time
                x0, y0, x1, y1 = current
                x0, y0 = min(1.0, max(0.0, x0 + d0)), min(1.0, max(0.0, y0 + d1))
                x1, y1 = min(1.0, max(0.0, x1 + d2)), min(1.0, max(0.0, y1 + d3))
                if x1 - x0 < 0.5 or y1 - y0 < 0.5:
                    continue
                key = (round(x0, 9), round(y0, 9), round(x1, 9), round(y1, 9))
                score = seen.get(key)
                if score is None:
                    score = seen[key] = objective((x0, y0, x1, y1))
                if score > best:
                    best, current, improved = score, (x0, y0, x1, y1), True
            if best < first_pass_give_up:
                return np.array(current), best
            first_pass_give_up = -math.inf
        if best < give_up:
            break
    return np.array(current), best


_MOVES = [
    (1.0, 0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0, 0.0),
    (0.0, 0.0, 1.0, 0.0),
    (0.0, 0.0, 0.0, 1.0),
    (1.0, 0.0, 1.0, 0.0),
    (0.0, 1.0, 0.0, 1.0),
    (-1.0, -1.0, 1.0, 1.0),
]
