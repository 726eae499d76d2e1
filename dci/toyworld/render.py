"""Scene specs, the seeded renderer and the caption grammar of the toy world (version 2).

Everything here is plain numpy so that tests, metrics and data generation run without torch or ComfyUI.
The world itself is described in the package docstring (``dci/toyworld/__init__.py``).

Design rule for the pixels: every decoration is laid out on the image's 8-pixel grid, which is one latent
cell of an SD-style ×8 VAE. A stripe is one cell wide, a dot fills one cell, the band is one cell high, so
a latent cell inside an object holds one flat colour. That keeps the decorations within what a small
autoencoder can carry, which is what the first version of this world got wrong (its VAE lost the stripes
and the emblems).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORLD_VERSION = "toyworld-2"
IMAGE_SIZE = 128
CELL = 8  # pixels per latent cell (SD's ×8 autoencoders)

# Named colours, far apart in RGB so that the nearest-palette metric is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "star")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "band")
EMBLEM_SHAPES: tuple[str, ...] = ("circle", "square", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
TEXTURES: tuple[str, ...] = ("flat", "gradient", "grid")

# Attributes that vary in the images but that no caption ever names (like the unnamed details of a real dog
# or mug): a concept is pinned down by them as much as by its named parts.
STRIPE_ANGLES: tuple[str, ...] = ("vertical", "horizontal")
EMBLEM_PLACES: tuple[str, ...] = ("centre", "upper-left", "upper-right")
EMBLEM_SCALES: tuple[str, ...] = ("small", "large")
UNNAMED: tuple[str, ...] = ("stripe_angle", "emblem_place", "emblem_scale")

# Object half-extent in pixels per size word, and object centre per position word (x, y).
SIZE_RADIUS: dict[str, float] = {"small": 18.0, "large": 28.0}
POSITION_CENTRE: dict[str, tuple[float, float]] = {
    "left": (34.0, 64.0),
    "right": (94.0, 64.0),
    "top": (64.0, 34.0),
    "bottom": (64.0, 94.0),
    "centre": (64.0, 64.0),
}
POSITION_PHRASE: dict[str, str] = {
    "left": "at the left",
    "right": "at the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
JITTER = 4  # ± pixels of the object's centre in base scenes
STRIPE_PERIOD = 3 * CELL  # a stripe is one latent cell wide, then two cells of body colour
DOT_PERIOD = 2 * CELL  # a dot fills one latent cell of every 2×2
# Emblem half-extent relative to the object's, per unnamed emblem scale; smaller on pointed shapes, so the
# body colour still covers most of the object.
EMBLEM_RADIUS: dict[str, float] = {"small": 0.3, "large": 0.45}
EMBLEM_SHAPE_FACTOR: dict[str, float] = {"star": 0.7, "triangle": 0.8}
# Emblem centre offset relative to the object's half-extent, per unnamed placement.
EMBLEM_OFFSET: dict[str, tuple[float, float]] = {
    "centre": (0.0, 0.0),
    "upper-left": (-0.4, -0.4),
    "upper-right": (0.4, -0.4),
}
# Pointed shapes have no room near their upper corners: their emblems move less, staying on the body.
EMBLEM_OFFSET_FACTOR: dict[str, float] = {"star": 0.35, "triangle": 0.45}

# Sampling weights of the base world: every building block often enough to learn it, both decorations
# together in a fifth of the scenes.
PATTERN_PROBABILITY = 0.5
EMBLEM_PROBABILITY = 0.45
_TEXTURE_WEIGHTS = np.array([0.6, 0.2, 0.2])


@dataclass(frozen=True)
class ObjectSpec:
    """One object: a body with an optional pattern and an optional emblem, each in its own colour.

    ``stripe_angle``, ``emblem_place`` and ``emblem_scale`` are never named by a caption.
    """

    shape: str = "circle"
    colour: str = "red"
    pattern: str = "plain"
    pattern_colour: str | None = None
    emblem: str | None = None
    emblem_colour: str | None = None
    size: str = "large"
    position: str = "centre"
    stripe_angle: str = "vertical"
    emblem_place: str = "centre"
    emblem_scale: str = "large"
    # Pixel offset of the object's centre, to vary scenes without new words.
    jitter: tuple[float, float] = (0.0, 0.0)

    def look(self) -> tuple:
        """Everything that makes the object what it is, place and size aside (named and unnamed parts)."""
        stripes = self.pattern == "stripes"
        return (
            self.shape,
            self.colour,
            self.pattern,
            self.pattern_colour,
            self.stripe_angle if stripes else None,
            self.emblem,
            self.emblem_colour,
            self.emblem_place if self.emblem else None,
            self.emblem_scale if self.emblem else None,
        )


@dataclass(frozen=True)
class SceneSpec:
    """A whole scene: one object on a background."""

    obj: ObjectSpec
    background: str = "white"
    texture: str = "flat"


# ---------------------------------------------------------------------------------------------- shapes


def _grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, x to the right and y downwards."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over all pixels."""
    inside = np.zeros(xs.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x0, y0 = pts[i]
        x1, y1 = pts[(i + 1) % n]
        crosses = (y0 > ys) != (y1 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


def _regular(cx: float, cy: float, r: float, n: int, start: float) -> np.ndarray:
    ang = start + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], axis=1)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of a shape with half-extent ``r`` centred at (cx, cy)."""
    xs, ys = _grid(size)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.12
    if shape == "triangle":
        pts = np.array([[cx, cy - r], [cx + r, cy + r * 0.8], [cx - r, cy + r * 0.8]])
        return _polygon_mask(xs, ys, pts)
    if shape == "hexagon":
        return _polygon_mask(xs, ys, _regular(cx, cy, r, 6, 0.0))
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.5)
        pts = np.stack([cx + rad * np.cos(ang), cy + 0.1 * r + rad * np.sin(ang)], axis=1)
        return _polygon_mask(xs, ys, pts)
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern: str, angle: str, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Pixels that take the pattern's colour (before clipping to the object), on the 8-pixel cell grid."""
    xs, ys = _grid(size)
    ix, iy = np.floor(xs).astype(int), np.floor(ys).astype(int)
    if pattern == "stripes":
        return ((iy if angle == "horizontal" else ix) % STRIPE_PERIOD) >= STRIPE_PERIOD - CELL
    if pattern == "dots":
        return ((ix % DOT_PERIOD) - 3.5) ** 2 + ((iy % DOT_PERIOD) - 3.5) ** 2 <= 3.6**2
    if pattern == "band":
        # One cell row across the lower part of the object, clear of a centred emblem.
        top = int(np.floor((cy + 0.45 * r) / CELL)) * CELL
        return (iy >= top) & (iy < top + CELL)
    if pattern == "plain":
        return np.zeros((size, size), dtype=bool)
    raise ValueError(f"unknown pattern {pattern!r}")


# ------------------------------------------------------------------------------------------- rendering


def object_centre(obj: ObjectSpec) -> tuple[float, float]:
    """Where the renderer puts the object's centre, in pixels."""
    cx, cy = POSITION_CENTRE[obj.position]
    return cx + obj.jitter[0], cy + obj.jitter[1]


def emblem_geometry(obj: ObjectSpec) -> tuple[float, float, float]:
    """The emblem's centre and half-extent in pixels."""
    cx, cy = object_centre(obj)
    r = SIZE_RADIUS[obj.size]
    er = r * EMBLEM_RADIUS[obj.emblem_scale] * EMBLEM_SHAPE_FACTOR.get(obj.shape, 1.0)
    ox, oy = EMBLEM_OFFSET[obj.emblem_place]
    k = EMBLEM_OFFSET_FACTOR.get(obj.shape, 1.0)
    return cx + k * ox * r, cy + k * oy * r, er


def _background(colour: str, texture: str, size: int) -> np.ndarray:
    base = np.array(PALETTE[colour], dtype=np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if texture == "gradient":
        # Darkens downwards, mildly, so the border still reads as the named colour.
        fade = np.linspace(1.0, 0.72, size, dtype=np.float32)[:, None, None]
        img = img * fade
    elif texture == "grid":
        lum = base.mean()
        line = np.array((0, 0, 0) if lum > 110 else (255, 255, 255), dtype=np.float32)
        on = np.zeros((size, size), dtype=bool)
        for k in (6, 7):
            on[k :: 4 * CELL, :] = True
            on[:, k :: 4 * CELL] = True
        img[on] = 0.6 * img[on] + 0.4 * line
    elif texture != "flat":
        raise ValueError(f"unknown texture {texture!r}")
    return img


def render_scene(spec: SceneSpec, size: int = IMAGE_SIZE) -> np.ndarray:
    """Renders a scene to a uint8 array [size, size, 3]. Pure function of the spec: no randomness."""
    img = _background(spec.background, spec.texture, size)
    obj = spec.obj
    cx, cy = object_centre(obj)
    r = SIZE_RADIUS[obj.size]
    body = shape_mask(obj.shape, cx, cy, r, size)
    img[body] = PALETTE[obj.colour]
    if obj.pattern != "plain":
        img[body & pattern_mask(obj.pattern, obj.stripe_angle, cy, r, size)] = PALETTE[obj.pattern_colour or obj.colour]
    if obj.emblem is not None:
        # Not clipped to the body: an emblem placed near a corner of a thin shape may stick out.
        ex, ey, er = emblem_geometry(obj)
        img[shape_mask(obj.emblem, ex, ey, er, size)] = PALETTE[obj.emblem_colour or obj.colour]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------- sampling


def held_out(shape: str, colour: str, background: str) -> bool:
    """About one in eleven (shape, object colour, background) triples never appears in base training.

    Evaluation prompts for these triples test composition, not memory.
    """
    return (3 * SHAPES.index(shape) + 5 * COLOURS.index(colour) + 7 * COLOURS.index(background)) % 11 == 0


def _pick(rng: np.random.Generator, options: tuple[str, ...], exclude: set[str] | None = None) -> str:
    choices = [o for o in options if not exclude or o not in exclude]
    return choices[int(rng.integers(len(choices)))]


def sample_object(rng: np.random.Generator, colour: str, exclude: set[str]) -> ObjectSpec:
    """A base-world object of body colour ``colour``; its decorations avoid the colours in ``exclude``."""
    taken = set(exclude) | {colour}
    pattern = "plain"
    pattern_colour = None
    if rng.random() < PATTERN_PROBABILITY:
        pattern = _pick(rng, PATTERNS[1:])
        pattern_colour = _pick(rng, COLOURS, taken)
        taken.add(pattern_colour)
    emblem = emblem_colour = None
    if rng.random() < EMBLEM_PROBABILITY:
        emblem = _pick(rng, EMBLEM_SHAPES)
        emblem_colour = _pick(rng, COLOURS, taken)
    return ObjectSpec(
        shape=_pick(rng, SHAPES),
        colour=colour,
        pattern=pattern,
        pattern_colour=pattern_colour,
        emblem=emblem,
        emblem_colour=emblem_colour,
        size=_pick(rng, SIZES),
        position=_pick(rng, POSITIONS),
        stripe_angle=_pick(rng, STRIPE_ANGLES),
        emblem_place=_pick(rng, EMBLEM_PLACES),
        emblem_scale=_pick(rng, EMBLEM_SCALES),
        jitter=(float(rng.integers(-JITTER, JITTER + 1)), float(rng.integers(-JITTER, JITTER + 1))),
    )


def sample_scene(
    rng: np.random.Generator, allow_held_out: bool = False, excluded_looks: frozenset = frozenset()
) -> SceneSpec:
    """Draws one base-world scene: all colours of one scene are distinct.

    ``excluded_looks``: object looks (``ObjectSpec.look``) that must never be drawn, i.e. the concepts'.
    """
    while True:
        colour = _pick(rng, COLOURS)
        background = _pick(rng, COLOURS, {colour})
        obj = sample_object(rng, colour, {background})
        texture = TEXTURES[int(rng.choice(len(TEXTURES), p=_TEXTURE_WEIGHTS))]
        if obj.look() in excluded_looks:
            continue
        if allow_held_out or not held_out(obj.shape, colour, background):
            return SceneSpec(obj=obj, background=background, texture=texture)


def sample_scenes(
    n: int, seed: int, allow_held_out: bool = False, excluded_looks: frozenset = frozenset()
) -> list[SceneSpec]:
    """``n`` base-world scenes, a pure function of ``seed``; never one of ``excluded_looks``.

    Base training passes the concepts' looks (``dev.toyworld.concepts.concept_looks``).
    """
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, allow_held_out, excluded_looks) for _ in range(n)]


def object_pixels(spec: SceneSpec, size: int = IMAGE_SIZE, grow: float = 0.0) -> np.ndarray:
    """Boolean mask of every pixel the object covers (body and emblem); ``grow`` adds that many pixels to each
    shape's half-extent (a margin around the object)."""
    obj = spec.obj
    cx, cy = object_centre(obj)
    mask = shape_mask(obj.shape, cx, cy, SIZE_RADIUS[obj.size] + grow, size)
    if obj.emblem is not None:
        ex, ey, er = emblem_geometry(obj)
        mask |= shape_mask(obj.emblem, ex, ey, er + grow, size)
    return mask


def decoration_pixels(spec: SceneSpec, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of the pattern's and the emblem's pixels: the small parts that carry an instance's look."""
    obj = spec.obj
    cx, cy = object_centre(obj)
    r = SIZE_RADIUS[obj.size]
    mask = np.zeros((size, size), dtype=bool)
    if obj.pattern != "plain":
        mask |= shape_mask(obj.shape, cx, cy, r, size) & pattern_mask(obj.pattern, obj.stripe_angle, cy, r, size)
    if obj.emblem is not None:
        ex, ey, er = emblem_geometry(obj)
        mask |= shape_mask(obj.emblem, ex, ey, er, size)
    return mask


# The caption grammar lives in ``captions``; its names stay importable from here.
from .captions import *  # noqa: E402,F403
from .captions import OMIT_PROBABILITY, PATTERN_WORDS  # noqa: E402,F401
