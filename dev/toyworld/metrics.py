"""Pixel metrics of the toy world: what a generated image shows, read back without a classifier.

Every quantity is measured from pixels and the known palette, so a benchmark can check a prompt's
background, object colour, size, decorations and position, and a concept's look, on any sampler's output.
Images are uint8 [H, W, 3] or float [H, W, 3] in 0..1, at the world's size or another (positions and areas
are scaled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dci.toyworld.render import COLOURS, IMAGE_SIZE, PALETTE, POSITION_CENTRE, SIZE_RADIUS, shape_mask

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
BORDER = 6  # pixels of the image edge read as background (at the world's size)
OBJECT_DISTANCE = 60.0  # RGB distance from the background colour above which a pixel belongs to the object
STRICT_DISTANCE = 70.0  # a pixel counts towards a palette colour only this close (edge blends don't)
MIN_SHARE = 0.03  # a colour counts as present on the object above this share of its pixels
MIN_AREA = 48  # object pixels (at the world's size) below which no object is read


def as_uint8(image: np.ndarray) -> np.ndarray:
    """Accepts uint8 or float 0..1 images (ComfyUI's IMAGE tensors, as numpy)."""
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def _scale(image: np.ndarray) -> float:
    """World pixels per image pixel."""
    return IMAGE_SIZE / image.shape[0]


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the palette colour closest to one RGB value."""
    d = ((_PALETTE_RGB - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)
    return COLOURS[int(d.argmin())]


def palette_distances(pixels: np.ndarray) -> np.ndarray:
    """Squared RGB distance of [N, 3] pixels to every palette colour, [N, n_colours]."""
    return ((pixels[:, None, :].astype(np.float32) - _PALETTE_RGB[None]) ** 2).sum(axis=2)


def nearest_colour_ids(pixels: np.ndarray) -> np.ndarray:
    """Palette index per pixel for [N, 3] pixels."""
    return palette_distances(pixels).argmin(axis=1)


def strict_colour_ids(pixels: np.ndarray) -> np.ndarray:
    """Palette index per pixel for [N, 3] pixels, -1 where no palette colour is within ``STRICT_DISTANCE``."""
    d = palette_distances(pixels)
    ids = d.argmin(axis=1)
    return np.where(d[np.arange(len(ids)), ids] <= STRICT_DISTANCE**2, ids, -1)


def border_pixels(image: np.ndarray) -> np.ndarray:
    img = as_uint8(image)
    width = max(1, round(BORDER / _scale(img)))
    m = np.zeros(img.shape[:2], dtype=bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return img[m]


def background_rgb(image: np.ndarray) -> np.ndarray:
    """Median border colour: robust to an object touching the edge and to grid lines."""
    return np.median(border_pixels(image).astype(np.float32), axis=0)


def background_colour(image: np.ndarray) -> str:
    return nearest_colour(background_rgb(image))


def _open(mask: np.ndarray, k: int) -> np.ndarray:
    """Morphological opening with a k×k square: removes lines thinner than k pixels, keeps shapes."""
    h, w = mask.shape
    if k <= 1 or h < k or w < k:
        return mask
    e = np.ones((h - k + 1, w - k + 1), dtype=bool)
    for dy in range(k):
        for dx in range(k):
            e &= mask[dy : dy + h - k + 1, dx : dx + w - k + 1]
    out = np.zeros_like(mask)
    for dy in range(k):
        for dx in range(k):
            out[dy : dy + h - k + 1, dx : dx + w - k + 1] |= e
    return out


def object_mask(image: np.ndarray) -> np.ndarray:
    """Pixels far from the background colour.

    Each row is compared with the median of its own border pixels, which follows a vertical gradient;
    where the object reaches the edge of a row, the global background colour is used instead. Grid lines
    (two pixels wide at the world's size) are removed by an opening.
    """
    img = as_uint8(image).astype(np.float32)
    width = max(1, round(BORDER / _scale(img)))
    bg = background_rgb(image)
    rows = np.concatenate([img[:, :width], img[:, -width:]], axis=1)
    row_bg = np.median(rows, axis=1)  # [H, 3]
    use_row = np.abs(row_bg - bg).sum(axis=1, keepdims=True) < 120
    ref = np.where(use_row, row_bg, bg)[:, None, :]
    dist = np.sqrt(((img - ref) ** 2).sum(axis=2))
    return _open(dist > OBJECT_DISTANCE, max(2, round(3 / _scale(img))))


@dataclass(frozen=True)
class SceneReading:
    """What an image shows, in the vocabulary of ``render.scene_attributes``."""

    background: str
    colour: str | None  # the object's dominant colour
    colours: tuple[str, ...]  # every colour present on the object above MIN_SHARE, dominant first
    position: str | None
    centroid: tuple[float, float] | None  # in world pixels
    area: int  # object pixels, in world pixels


def position_of(cx: float, cy: float) -> str:
    """Nearest named position to an object centre (world pixels)."""
    d = {k: (cx - x) ** 2 + (cy - y) ** 2 for k, (x, y) in POSITION_CENTRE.items()}
    return min(d, key=d.get)


def read_scene(image: np.ndarray) -> SceneReading:
    """Background colour, object colours, position and area of one image."""
    img = as_uint8(image)
    s = _scale(img)
    bg = background_colour(img)
    mask = object_mask(img)
    area = int(round(mask.sum() * s * s))
    if area < MIN_AREA:
        return SceneReading(bg, None, (), None, None, area)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) * s, (ys.mean() + 0.5) * s
    ids = strict_colour_ids(img[mask])
    ids = ids[ids >= 0]
    counts = np.bincount(ids, minlength=len(COLOURS))
    order = np.argsort(-counts, kind="stable")
    total = max(int(mask.sum()), 1)
    present = tuple(COLOURS[i] for i in order if counts[i] >= MIN_SHARE * total and COLOURS[i] != bg)
    dominant = present[0] if present else None
    return SceneReading(bg, dominant, present, position_of(cx, cy), (float(cx), float(cy)), area)


def read_size(area: int, shape: str) -> str:
    """"small" or "large": the size whose clean body area of this shape is nearer (in log scale)."""
    c = IMAGE_SIZE / 2
    areas = {s: float(shape_mask(shape, c, c, r).sum()) for s, r in SIZE_RADIUS.items()}
    return min(areas, key=lambda s: abs(np.log(max(area, 1) / areas[s])))


def score_reading(reading: SceneReading, asked: dict[str, str | None]) -> dict[str, bool]:
    """Per-attribute correctness of a reading against what a prompt asked (``parse_caption``'s output).

    Only attributes the prompt names are scored. A decoration counts as right when its colour is present
    on the object; the size is read from the object's area against clean renders of the asked shape (the
    shape itself is not read). A missing object gets every object attribute wrong.
    """
    out: dict[str, bool] = {}
    if asked.get("background"):
        out["background"] = reading.background == asked["background"]
    if asked.get("colour"):
        out["colour"] = reading.colour == asked["colour"]
    if asked.get("position"):
        out["position"] = reading.position == asked["position"]
    if asked.get("size") and asked.get("shape"):
        out["size"] = reading.area >= MIN_AREA and read_size(reading.area, asked["shape"]) == asked["size"]
    if asked.get("pattern_colour"):
        out["pattern"] = asked["pattern_colour"] in reading.colours
    if asked.get("emblem_colour"):
        out["emblem"] = asked["emblem_colour"] in reading.colours
    return out


def accuracy(scores: list[dict[str, bool]]) -> dict[str, float]:
    """Mean correctness per attribute over many images."""
    keys = sorted({k for s in scores for k in s})
    return {k: float(np.mean([s[k] for s in scores if k in s])) for k in keys}
