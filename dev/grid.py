"""Labelled image grids for the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def labelled_grid(rows: Sequence[tuple[str, np.ndarray]], label_width: int = 150, scale: int = 1,
                  headers: Sequence[tuple[int, str]] = (), margin: int = 0):
    """Image rows [H, W, 3] (uint8) stacked top to bottom, each with its label at the left; optional column
    headers ``(x in the rows' pixels, text)`` above; rows enlarged ``scale`` times. Returns a PIL image."""
    from PIL import Image, ImageDraw

    top = 28 if headers else 0
    width = label_width + scale * max(r.shape[1] for _, r in rows) + margin
    height = top + scale * sum(r.shape[0] for _, r in rows) + margin
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for x, text in headers:
        draw.text((label_width + x * scale + 10, 8), text, fill="black")
    y = top
    for name, row in rows:
        image = Image.fromarray(row)
        if scale != 1:
            image = image.resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
        canvas.paste(image, (label_width, y))
        draw.text((6, y + image.height // 2 - 6), name, fill="black")
        y += image.height
    return canvas
