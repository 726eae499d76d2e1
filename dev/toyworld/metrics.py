"""Pixel metrics of the toy world: what a generated 64×64 image shows, read back without a classifier.

Every quantity is measured from pixels and the known palette, so a benchmark can check a prompt's
background, object colour, decoration colours and position, and a concept's look, on any sampler's output.
Images are uint8 [H, W, 3] or float [H, W, 3] in 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dci.toyworld.render import COLOURS, IMAGE_SIZE, PALETTE, POSITION_CENTRE

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
BORDER = 3  # pixels of the image edge read as background
OBJECT_DISTANCE = 60.0  # RGB distance from the background colour above which a pixel belongs to the object
MIN_SHARE = 0.06  # a colour counts as present on the object above this share of its pixels


def as_uint8(image: np.ndarray) -> np.ndarray:
    """Accepts uint8 or float 0..1 images (ComfyUI's IMAGE tensors, as numpy)."""
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the palette colour closest to one RGB value."""
    d = ((_PALETTE_RGB - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)
    return COLOURS[int(d.argmin())]


def nearest_colour_ids(pixels: np.ndarray) -> np.ndarray:
    """Palette index per pixel for [N, 3] pixels."""
    d = ((pixels[:, None, :].astype(np.float32) - _PALETTE_RGB[None]) ** 2).sum(axis=2)
    return d.argmin(axis=1)


def border_pixels(image: np.ndarray, width: int = BORDER) -> np.ndarray:
    img = as_uint8(image)
    m = np.zeros(img.shape[:2], dtype=bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return img[m]


def background_rgb(image: np.ndarray) -> np.ndarray:
    """Median border colour: robust to an object touching the edge and to grid lines."""
    return np.median(border_pixels(image).astype(np.float32), axis=0)


def background_colour(image: np.ndarray) -> str:
    return nearest_colour(background_rgb(image))


def _open2(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 2×2 square: removes 1-pixel lines (grid backgrounds), keeps shapes."""
    e = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]
    out = np.zeros_like(mask)
    out[:-1, :-1] |= e
    out[1:, :-1] |= e
    out[:-1, 1:] |= e
    out[1:, 1:] |= e
    return out


def object_mask(image: np.ndarray) -> np.ndarray:
    """Pixels far from the background colour.

    Each row is compared with the median of its own border pixels, which follows a vertical gradient;
    where the object reaches the edge of a row, the global background colour is used instead. Thin grid
    lines are removed by an opening.
    """
    img = as_uint8(image).astype(np.float32)
    bg = background_rgb(image)
    rows = np.concatenate([img[:, :BORDER], img[:, -BORDER:]], axis=1)
    row_bg = np.median(rows, axis=1)  # [H, 3]
    use_row = np.abs(row_bg - bg).sum(axis=1, keepdims=True) < 120
    ref = np.where(use_row, row_bg, bg)[:, None, :]
    dist = np.sqrt(((img - ref) ** 2).sum(axis=2))
    return _open2(dist > OBJECT_DISTANCE)


@dataclass(frozen=True)
class SceneReading:
    """What an image shows, in the vocabulary of ``render.scene_attributes``."""

    background: str
    colour: str | None  # the object's dominant colour
    colours: tuple[str, ...]  # every colour present on the object above MIN_SHARE, dominant first
    position: str | None
    centroid: tuple[float, float] | None
    area: int  # object pixels


def position_of(cx: float, cy: float) -> str:
    """Nearest named position to an object centre."""
    d = {k: (cx - x) ** 2 + (cy - y) ** 2 for k, (x, y) in POSITION_CENTRE.items()}
    return min(d, key=d.get)


def read_scene(image: np.ndarray, min_area: int = 12) -> SceneReading:
    """Background colour, object colours and position of one image."""
    img = as_uint8(image)
    bg = background_colour(img)
    mask = object_mask(img)
    area = int(mask.sum())
    if area < min_area:
        return SceneReading(bg, None, (), None, None, area)
    ys, xs = np.nonzero(mask)
    scale = IMAGE_SIZE / img.shape[0]
    cx, cy = (xs.mean() + 0.5) * scale, (ys.mean() + 0.5) * scale
    ids = nearest_colour_ids(img[mask])
    counts = np.bincount(ids, minlength=len(COLOURS))
    order = np.argsort(-counts, kind="stable")
    present = tuple(COLOURS[i] for i in order if counts[i] >= MIN_SHARE * area and COLOURS[i] != bg)
    dominant = present[0] if present else COLOURS[int(order[0])]
    return SceneReading(bg, dominant, present, position_of(cx, cy), (float(cx), float(cy)), area)


def score_reading(reading: SceneReading, asked: dict[str, str | None]) -> dict[str, bool]:
    """Per-attribute correctness of a reading against what a prompt asked (``parse_caption``'s output).

    Only attributes the prompt names are scored. ``pattern_colour`` counts as right when that colour is
    present on the object.
    """
    out: dict[str, bool] = {}
    if asked.get("background"):
        out["background"] = reading.background == asked["background"]
    if asked.get("colour"):
        out["colour"] = reading.colour == asked["colour"]
    if asked.get("position"):
        out["position"] = reading.position == asked["position"]
    if asked.get("pattern_colour"):
        out["pattern_colour"] = asked["pattern_colour"] in reading.colours
    return out


def accuracy(scores: list[dict[str, bool]]) -> dict[str, float]:
    """Mean correctness per attribute over many images."""
    keys = sorted({k for s in scores for k in s})
    return {k: float(np.mean([s[k] for s in scores if k in s])) for k in keys}
