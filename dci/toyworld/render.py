"""Scene specs, the seeded renderer and the caption grammar of the toy world.

Everything here is plain numpy so that tests, metrics and data generation run without torch or ComfyUI.
The world itself is described in the package docstring (``dci_core/toyworld/__init__.py``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import numpy as np

WORLD_VERSION = "toyworld-1"
IMAGE_SIZE = 64

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
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "star")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checker", "halves", "emblem")
EMBLEM_SHAPES: tuple[str, ...] = ("circle", "square", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
TEXTURES: tuple[str, ...] = ("flat", "gradient", "grid")

# Object half-extent in pixels per size word, and object centre per position word (x, y).
SIZE_RADIUS: dict[str, float] = {"small": 9.0, "large": 14.0}
POSITION_CENTRE: dict[str, tuple[float, float]] = {
    "left": (17.0, 32.0),
    "right": (47.0, 32.0),
    "top": (32.0, 17.0),
    "bottom": (32.0, 47.0),
    "centre": (32.0, 32.0),
}
POSITION_PHRASE: dict[str, str] = {
    "left": "at the left",
    "right": "at the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Pattern cells are anchored to the image's 8-pixel grid, the VAE's latent cell, so that one latent cell
# always sees the same phase of a pattern: that keeps textures cheap to encode for a tiny autoencoder.
PATTERN_PERIOD = 8
# Emblem half-extent relative to the object's; smaller on a star so the star's own colour still dominates.
EMBLEM_SCALE: dict[str, float] = {"star": 0.36, "cross": 0.42, "triangle": 0.4}

# Sampling weights of the base world: mostly simple scenes, enough of every building block to learn it.
_PATTERN_WEIGHTS = np.array([0.35, 0.13, 0.13, 0.13, 0.13, 0.13])
_TEXTURE_WEIGHTS = np.array([0.6, 0.2, 0.2])


@dataclass(frozen=True)
class ObjectSpec:
    """One object. ``pattern`` and ``emblem`` are independent so that concepts can combine both.

    The base world never draws a pattern and an emblem on the same object (``pattern == "emblem"`` is the
    base world's way to ask for an emblem alone); concepts may, which no caption can name exactly.
    """

    shape: str = "circle"
    colour: str = "red"
    pattern: str = "plain"
    pattern_colour: str | None = None
    emblem: str | None = None
    emblem_colour: str | None = None
    size: str = "large"
    position: str = "centre"
    # Pixel offset of the object's centre, to vary scenes without new words.
    jitter: tuple[float, float] = (0.0, 0.0)


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


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of a shape with half-extent ``r`` centred at (cx, cy)."""
    xs, ys = _grid(size)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        pts = np.array([[cx, cy - r], [cx + r, cy + r * 0.8], [cx - r, cy + r * 0.8]])
        return _polygon_mask(xs, ys, pts)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (r * 0.55) ** 2)
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
        pts = np.stack([cx + rad * np.cos(ang), cy + 0.1 * r + rad * np.sin(ang)], axis=1)
        return _polygon_mask(xs, ys, pts)
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern: str, cx: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Pixels that take the second colour of a pattern (before clipping to the object)."""
    xs, ys = _grid(size)
    ix, iy = np.floor(xs).astype(int), np.floor(ys).astype(int)
    p = PATTERN_PERIOD
    if pattern == "stripes":
        return (ix % p) >= p - 3
    if pattern == "dots":
        return ((ix % p) - 3.5) ** 2 + ((iy % p) - 3.5) ** 2 <= 2.3**2
    if pattern == "checker":
        return ((ix // (p // 2)) + (iy // (p // 2))) % 2 == 1
    if pattern == "halves":
        return xs >= cx
    if pattern in ("plain", "emblem"):
        return np.zeros((size, size), dtype=bool)
    raise ValueError(f"unknown pattern {pattern!r}")


# ------------------------------------------------------------------------------------------- rendering


def object_centre(obj: ObjectSpec) -> tuple[float, float]:
    """Where the renderer puts the object's centre, in pixels."""
    cx, cy = POSITION_CENTRE[obj.position]
    return cx + obj.jitter[0], cy + obj.jitter[1]


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
        on[3 :: PATTERN_PERIOD * 2, :] = True
        on[:, 3 :: PATTERN_PERIOD * 2] = True
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
    if obj.pattern not in ("plain", "emblem"):
        second = obj.pattern_colour or obj.colour
        img[body & pattern_mask(obj.pattern, cx, size)] = PALETTE[second]
    if obj.emblem is not None:
        # Not clipped to the body: an emblem on a ring sits in its hole, one on a star stays small.
        emblem = shape_mask(obj.emblem, cx, cy, r * EMBLEM_SCALE.get(obj.shape, 0.5), size)
        img[emblem] = PALETTE[obj.emblem_colour or obj.colour]
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


def sample_scene(rng: np.random.Generator, allow_held_out: bool = False) -> SceneSpec:
    """Draws one base-world scene: all colours of one scene are distinct, at most one decoration."""
    while True:
        shape = _pick(rng, SHAPES)
        colour = _pick(rng, COLOURS)
        background = _pick(rng, COLOURS, {colour})
        if allow_held_out or not held_out(shape, colour, background):
            break
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=_PATTERN_WEIGHTS))]
    second = None if pattern == "plain" else _pick(rng, COLOURS, {colour, background})
    emblem = _pick(rng, EMBLEM_SHAPES) if pattern == "emblem" else None
    obj = ObjectSpec(
        shape=shape,
        colour=colour,
        pattern=pattern,
        pattern_colour=second if pattern not in ("plain", "emblem") else None,
        emblem=emblem,
        emblem_colour=second if pattern == "emblem" else None,
        size=_pick(rng, SIZES),
        position=_pick(rng, POSITIONS),
        jitter=(float(rng.integers(-2, 3)), float(rng.integers(-2, 3))),
    )
    texture = TEXTURES[int(rng.choice(len(TEXTURES), p=_TEXTURE_WEIGHTS))]
    return SceneSpec(obj=obj, background=background, texture=texture)


def sample_scenes(n: int, seed: int, allow_held_out: bool = False) -> list[SceneSpec]:
    """``n`` scenes, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, allow_held_out) for _ in range(n)]


# --------------------------------------------------------------------------------------------- captions

# Probability that each part of a caption is left out, so the model also learns what to draw unasked.
OMIT_PROBABILITY: dict[str, float] = {
    "size": 0.3,
    "colour": 0.15,
    "pattern": 0.2,
    "position": 0.2,
    "background": 0.15,
    "texture": 0.3,
}


def pattern_phrase(obj: ObjectSpec) -> str:
    """The words for a base-world decoration; empty for a plain object."""
    if obj.pattern == "stripes":
        return f"with {obj.pattern_colour} stripes"
    if obj.pattern == "dots":
        return f"with {obj.pattern_colour} dots"
    if obj.pattern == "checker":
        return f"with {_article(obj.pattern_colour)} {obj.pattern_colour} checker pattern"
    if obj.pattern == "halves":
        return f"that is half {obj.pattern_colour}"
    if obj.pattern == "emblem":
        return f"with {_article(obj.emblem_colour)} {obj.emblem_colour} {obj.emblem} emblem"
    return ""


def caption(spec: SceneSpec, rng: np.random.Generator | None = None, noun: str | None = None) -> str:
    """The caption of a scene; with ``rng``, parts are randomly omitted (see ``OMIT_PROBABILITY``).

    ``noun`` replaces the object phrase (e.g. ``"sks star"`` for a concept); size, colour and pattern
    words are then dropped because the concept word carries them.
    """

    def keep(part: str) -> bool:
        return rng is None or rng.random() >= OMIT_PROBABILITY[part]

    obj = spec.obj
    words = []
    if noun is None:
        if keep("size"):
            words.append(obj.size)
        if keep("colour"):
            words.append(obj.colour)
        words.append(obj.shape)
        if obj.pattern != "plain" and keep("pattern"):
            words.append(pattern_phrase(obj))
    else:
        words.append(noun)
    if keep("position"):
        words.append(POSITION_PHRASE[obj.position])
    if keep("background"):
        bg = [spec.background] + ([spec.texture] if spec.texture != "flat" and keep("texture") else [])
        words.append(f"on {_article(bg[0])} " + " ".join(bg) + " background")
    return f"{_article(words[0])} " + " ".join(words)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_OBJECT_RE = re.compile(
    rf"^an? (?:(?P<size>small|large) )?(?:(?P<colour>{_COLOUR_RE}) )?(?P<shape>{_SHAPE_RE})\b"
)
_DECOR_RE = [
    ("stripes", re.compile(rf"with (?P<c>{_COLOUR_RE}) stripes")),
    ("dots", re.compile(rf"with (?P<c>{_COLOUR_RE}) dots")),
    ("checker", re.compile(rf"with an? (?P<c>{_COLOUR_RE}) checker pattern")),
    ("halves", re.compile(rf"that is half (?P<c>{_COLOUR_RE})")),
    ("emblem", re.compile(rf"with an? (?P<c>{_COLOUR_RE}) (?P<e>{'|'.join(EMBLEM_SHAPES)}) emblem")),
]
_BACKGROUND_RE = re.compile(rf"on an? (?P<bg>{_COLOUR_RE})(?: (?P<tex>gradient|grid))? background")


def parse_caption(text: str) -> dict[str, str | None]:
    """Attributes a caption asks for; ``None`` where the caption leaves the choice to the model.

    Keys: shape, colour, size, pattern, pattern_colour, emblem, position, background, texture. A caption
    that names a background without a texture word asks for nothing about the texture.
    """
    out: dict[str, str | None] = dict.fromkeys(
        (
            "shape",
            "colour",
            "size",
            "pattern",
            "pattern_colour",
            "emblem",
            "position",
            "background",
            "texture",
        )
    )
    m = _OBJECT_RE.search(text)
    if m:
        out.update(shape=m["shape"], colour=m["colour"], size=m["size"])
    for name, rx in _DECOR_RE:
        d = rx.search(text)
        if d:
            out["pattern"] = name
            out["pattern_colour"] = d["c"]
            if name == "emblem":
                out["emblem"] = d["e"]
            break
    for pos, phrase in POSITION_PHRASE.items():
        if phrase in text:
            out["position"] = pos
    b = _BACKGROUND_RE.search(text)
    if b:
        out["background"] = b["bg"]
        out["texture"] = b["tex"]
    return out


def scene_attributes(spec: SceneSpec) -> dict[str, str | None]:
    """The attributes of a scene, in the same keys as ``parse_caption``."""
    obj = spec.obj
    decor_colour = obj.emblem_colour if obj.pattern == "emblem" else obj.pattern_colour
    return {
        "shape": obj.shape,
        "colour": obj.colour,
        "size": obj.size,
        "pattern": obj.pattern,
        "pattern_colour": decor_colour,
        "emblem": obj.emblem,
        "position": obj.position,
        "background": spec.background,
        "texture": spec.texture,
    }


def scene_from_caption(text: str, rng: np.random.Generator | None = None) -> SceneSpec:
    """A scene that satisfies a full or partial caption; unnamed attributes are drawn from ``rng``.

    Used to render reference images for prompts and to know what a prompt asks for.
    """
    rng = rng or np.random.default_rng(0)
    a = parse_caption(text)
    base = sample_scene(rng, allow_held_out=True)
    colour = a["colour"] or base.obj.colour
    background = a["background"] or _pick(rng, COLOURS, {colour})
    pattern = a["pattern"] or "plain"
    second = a["pattern_colour"]
    obj = replace(
        base.obj,
        shape=a["shape"] or base.obj.shape,
        colour=colour,
        size=a["size"] or base.obj.size,
        position=a["position"] or base.obj.position,
        pattern=pattern,
        pattern_colour=second if pattern not in ("plain", "emblem") else None,
        emblem=a["emblem"],
        emblem_colour=second if pattern == "emblem" else None,
        jitter=(0.0, 0.0),
    )
    return SceneSpec(obj=obj, background=background, texture=a["texture"] or "flat")


def spec_to_dict(spec: SceneSpec) -> dict:
    """JSON-friendly form of a scene (for metadata and benchmark records)."""
    return asdict(spec)
