"""A picture of query results: each query (cropped to its box) and its top-k in one row.

Under every image: ``query`` and its file name, or the rank, the score and the file name of a
result. Drawn with Pillow only (no plotting dependency); each tile is ``TILE`` pixels square,
the image fitted inside it with its aspect ratio kept.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["TILE", "write"]

TILE = 160
CAPTION = 30  # two lines of Pillow's default font
PAD = 6


def _tile(path: str, box: Sequence[float] | None) -> Image.Image:
    with Image.open(path) as raw:
        img = raw.convert("RGB")
    if box is not None:
        img = img.crop(tuple(int(round(v)) for v in box))
    img.thumbnail((TILE, TILE))
    return img


def _short(name: str, limit: int = 26) -> str:
    name = os.path.basename(name)
    return name if len(name) <= limit else name[: limit - 3] + "..."


def write(
    out: str,
    index: Any,
    images: Sequence[str],
    boxes: Sequence[Sequence[float] | None] | None,
    hits: Any,
) -> None:
    """Writes the PNG ``out``: one row per query, the query first, then its ``k`` results."""
    k = hits.ids.shape[1]
    width = (k + 1) * (TILE + PAD) + PAD
    height = len(images) * (TILE + CAPTION + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    root = index.manifest["images_root"]
    for q, path in enumerate(images):
        y = PAD + q * (TILE + CAPTION + PAD)
        cells = [(path, None if boxes is None else boxes[q], f"query\n{_short(path)}")]
        for r in range(k):
            name = hits.paths[q][r]
            text = f"#{r + 1}  {hits.scores[q][r]:.3f}\n{_short(name)}"
            cells.append((os.path.join(root, name), None, text))
        for c, (file, box, text) in enumerate(cells):
            x = PAD + c * (TILE + PAD)
            try:
                tile = _tile(file, box)
                canvas.paste(tile, (x + (TILE - tile.width) // 2, y + (TILE - tile.height) // 2))
            except OSError:  # an indexed image moved since the build: leave its tile empty
                draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), outline="grey")
            draw.multiline_text((x, y + TILE + 2), text, fill="black", font=font)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    canvas.save(out)
