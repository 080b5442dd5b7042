"""Pictures for people to look at (eval neighbours, dedup matches): one grid of image tiles."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

Tile = tuple[Image.Image, str | None]  # an image and the colour of its frame (None: no frame)


def image_grid(
    rows: list[list[Tile]], path: Path, size: int = 64, captions: list[str] | None = None, pad: int = 4
) -> Path:
    """Save rows of tiles, each resized to size x size and framed in its colour; a caption,
    when given, is written above its row."""
    caption_height = 12 if captions else 0
    columns = max((len(row) for row in rows), default=1)
    row_height = size + pad + caption_height
    grid = Image.new("RGB", (columns * (size + pad) + pad, max(1, len(rows)) * row_height + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * row_height
        if captions:
            draw.text((pad, y - 2), captions[r], fill="black")
        y += caption_height
        for c, (image, frame) in enumerate(row):
            x = pad + c * (size + pad)
            grid.paste(image.convert("RGB").resize((size, size)), (x, y))
            if frame:
                draw.rectangle([x - 2, y - 2, x + size + 1, y + size + 1], outline=frame, width=2)
    grid.save(path)
    return path
