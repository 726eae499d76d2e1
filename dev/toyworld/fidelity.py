"""Concept fidelity and editability of a generated toy-world image, measured from pixels (numpy only).

Fidelity: does the object in the image look like *that* concept instance, wherever and however large it is?
The object is found as in ``metrics.object_mask`` (pixels far from the background colour), every pixel is
snapped to the nearest palette colour, and the object is described by four size- and place-free parts:

- **colours**: the share of each palette colour on the object (a concept is three colours in fixed shares;
  shares among the pixels close to a palette colour, so blends at soft edges neither invent colours nor
  dilute the real ones);
- **layout**: the joint distribution of (3×3 cell of the object's bounding box, colour), i.e. where on the
  object each colour sits: the emblem at the upper right, the band across the middle, the body colour
  around them. It also carries the silhouette (which cells the object fills);
- **texture**: how often the colour differs between object pixels two apart horizontally and two apart
  vertically. Patterns keep a fixed period at every object size, so these rates tell vertical stripes
  (horizontal changes only) from horizontal ones, dots (both) and a band (almost none) apart at any size;
- **shape**: intersection over union of the object's mask and the reference's, both resampled to the same
  square from their bounding boxes.

Each part is compared with the same description of clean renders of the concept (centred, small and large,
on a background outside its colours): histogram intersection for colours and layout, IoU for the shape,
``1 - (|Δh| + |Δv|) / 0.5`` (clipped) for the texture. Fidelity is the weighted mean (colours 0.3, layout
0.3, texture 0.2, shape 0.2), taken at the better-matching reference size; 0 when no object is found. It is
1 for a clean render of the instance at the reference size, and it ranks renders of the instance at the
evaluation prompts' positions, sizes and backgrounds above the other concepts, the plain class object
(same shape, one colour), the concept with only one of its two decorations, and its *named twins*: objects
with every named part of the concept but other unnamed ones (stripe angle, emblem placement or scale),
which is all that words can ask for (``tests/unit/test_toyworld_fidelity.py`` measures the pairwise
accuracy).

Editability: prompt accuracy on what a concept prompt asks *beyond* the concept, i.e. the attributes the
concept doesn't fix: background colour, position and size ("a small sks circle at the left ..."). The concept's colours and decorations are excluded: they are fidelity. ``prompt_scores`` adds
them back (the object's dominant colour is the concept's body colour, and each of its other colours is
present) for an overall prompt accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dci.toyworld.render import COLOURS, IMAGE_SIZE, SIZE_RADIUS, SceneSpec, parse_caption, render_scene

from .concepts import ToyConcept, concept_colours
from .metrics import (
    MIN_AREA,
    as_uint8,
    nearest_colour_ids,
    object_mask,
    read_scene,
    read_size,
    score_reading,
    strict_colour_ids,
)

GRID = 3  # layout cells per side of the object's bounding box
CANON = 24  # side of the square the object is resampled to for layout and shape
TEXTURE_STEP = 2  # pixels between the two ends of a texture pair: a one-pixel blend at an edge still counts
WEIGHTS = {"colours": 0.3, "layout": 0.3, "texture": 0.2, "shape": 0.2}
TEXTURE_SCALE = 0.5  # a difference of change rates (|Δh| + |Δv|) that counts as completely different


@dataclass(frozen=True)
class ObjectLook:
    """A size- and position-free description of the object in an image."""

    colours: np.ndarray  # [n_colours] share of each palette colour on the object
    layout: np.ndarray  # [GRID*GRID, n_colours] joint share of (cell, colour)
    texture: np.ndarray  # [2] rate of colour changes between horizontal and vertical neighbours
    shape: np.ndarray  # [CANON, CANON] bool mask resampled from the bounding box
    area: int


def object_look(image: np.ndarray) -> ObjectLook | None:
    """Describes the object in an image; ``None`` when there is (almost) no object."""
    img = as_uint8(image)
    mask = object_mask(img)
    area = int(mask.sum())
    if area * (IMAGE_SIZE / img.shape[0]) ** 2 < MIN_AREA:
        return None
    n = len(COLOURS)
    ids = nearest_colour_ids(img.reshape(-1, 3)).reshape(mask.shape)
    strict = strict_colour_ids(img[mask])
    matched = strict[strict >= 0]
    colours = np.bincount(matched, minlength=n).astype(np.float64) / max(len(matched), 1)
    strict_all = np.full(mask.shape, -1)
    strict_all[mask] = strict

    # Bounding box from robust extremes, so a few stray pixels don't stretch it.
    ys, xs = np.nonzero(mask)
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    grid = (np.arange(CANON) + 0.5) / CANON
    cx = np.clip(np.rint(x0 + grid * (x1 - x0)), 0, mask.shape[1] - 1).astype(int)
    cy = np.clip(np.rint(y0 + grid * (y1 - y0)), 0, mask.shape[0] - 1).astype(int)
    shape = mask[np.ix_(cy, cx)]
    canon_ids = ids[np.ix_(cy, cx)]
    cell = (np.arange(CANON) * GRID // CANON)
    cells = (cell[:, None] * GRID + cell[None, :])[shape]
    layout = np.zeros((GRID * GRID, n))
    np.add.at(layout, (cells, canon_ids[shape]), 1.0)
    layout /= max(layout.sum(), 1.0)

    rates = []
    k = TEXTURE_STEP
    for a, b in ((strict_all[:, :-k], strict_all[:, k:]), (strict_all[:-k, :], strict_all[k:, :])):
        both = (a >= 0) & (b >= 0)
        rates.append(float((a[both] != b[both]).mean()) if both.any() else 0.0)
    return ObjectLook(colours, layout, np.array(rates), shape, area)


def compare_looks(look: ObjectLook, ref: ObjectLook) -> dict[str, float]:
    """Per-part similarities in 0..1 (see the module docstring)."""
    union = np.logical_or(look.shape, ref.shape).sum()
    return {
        "colours": float(np.minimum(look.colours, ref.colours).sum()),
        "layout": float(np.minimum(look.layout, ref.layout).sum()),
        "texture": float(max(0.0, 1.0 - np.abs(look.texture - ref.texture).sum() / TEXTURE_SCALE)),
        "shape": float(np.logical_and(look.shape, ref.shape).sum() / union) if union else 0.0,
    }


def _neutral_background(concept: ToyConcept) -> str:
    taken = set(concept_colours(concept))
    return next(c for c in ("white", "black", *COLOURS) if c not in taken)


class FidelityMeter:
    """Scores images against one concept; the reference looks are rendered once."""

    def __init__(self, concept: ToyConcept) -> None:
        self.concept = concept
        bg = _neutral_background(concept)
        self.references = [
            object_look(render_scene(SceneSpec(replace(concept.obj, size=size, position="centre", jitter=(0, 0)),
                                               background=bg)))
            for size in SIZE_RADIUS
        ]

    def parts(self, image: np.ndarray) -> dict[str, float]:
        """Per-part similarities at the better-matching reference size, plus ``fidelity``."""
        look = object_look(image)
        if look is None:
            return {**dict.fromkeys(WEIGHTS, 0.0), "fidelity": 0.0}
        best: dict[str, float] = {}
        for ref in self.references:
            p = compare_looks(look, ref)
            p["fidelity"] = sum(WEIGHTS[k] * p[k] for k in WEIGHTS)
            if not best or p["fidelity"] > best["fidelity"]:
                best = p
        return best

    def __call__(self, image: np.ndarray) -> float:
        return self.parts(image)["fidelity"]


def fidelity(image: np.ndarray, concept: ToyConcept) -> float:
    """Fidelity of one image to a concept, 0..1 (for many images, reuse a ``FidelityMeter``)."""
    return FidelityMeter(concept)(image)


# ------------------------------------------------------------------------------------------ editability

def asked_beyond_concept(prompt: str) -> dict[str, str | None]:
    """What a concept prompt asks that the concept doesn't fix: background, texture, position, size."""
    asked = parse_caption(prompt)
    return {key: asked[key] for key in ("background", "texture", "position", "size")}


def editability_scores(image: np.ndarray, prompt: str, concept: ToyConcept) -> dict[str, bool]:
    """Per-attribute correctness of the attributes the prompt names beyond the concept.

    A missing object gets the position and size wrong; the background is still read.
    """
    asked = asked_beyond_concept(prompt)
    reading = read_scene(image)
    out = score_reading(reading, {"background": asked["background"], "position": asked["position"]})
    if asked["position"] and reading.position is None:
        out["position"] = False
    if asked["size"]:
        out["size"] = reading.area >= MIN_AREA and read_size(reading.area, concept.class_noun) == asked["size"]
    return out


def prompt_scores(image: np.ndarray, prompt: str, concept: ToyConcept) -> dict[str, bool]:
    """``editability_scores`` plus the concept's own colours: dominant body colour, other colours present."""
    out = editability_scores(image, prompt, concept)
    reading = read_scene(image)
    out["colour"] = reading.colour == concept.obj.colour
    for i, c in enumerate(concept_colours(concept)[1:]):
        out[f"colour_{i + 2}"] = c in reading.colours
    return out


def mean_score(scores: dict[str, bool]) -> float:
    """Share of the scored attributes that are right (1.0 when nothing was asked)."""
    return float(np.mean(list(scores.values()))) if scores else 1.0
