"""Concepts of the toy world: novel objects to learn, their narrow training renders and test prompts.

A concept combines building blocks that the base world shows only separately (a pattern *and* an emblem,
three colours), so no caption names it exactly and the base model can't draw it from words, yet a
cross-attention fine-tune can reach it. Training renders keep one context (same background, about the same
place and size), as a user's few photos would; evaluation prompts ask for other backgrounds and positions,
which is where fidelity and editability pull against each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dci.toyworld.render import COLOURS, POSITION_PHRASE, ObjectSpec, SceneSpec, caption, render_scene


@dataclass(frozen=True)
class Concept:
    """A named novel object plus the context its training renders share."""

    name: str
    obj: ObjectSpec
    background: str = "white"
    texture: str = "flat"

    @property
    def class_noun(self) -> str:
        """The base-world word for what the concept is (its shape)."""
        return self.obj.shape


CONCEPTS: dict[str, Concept] = {
    # Red circle, yellow stripes, blue star emblem: three colours, a pattern and an emblem at once.
    "badge": Concept(
        "badge",
        ObjectSpec("circle", "red", "stripes", "yellow", emblem="star", emblem_colour="blue"),
    ),
    # Green square, white dots, purple circle emblem.
    "tile": Concept(
        "tile",
        ObjectSpec("square", "green", "dots", "white", emblem="circle", emblem_colour="purple"),
        background="yellow",
    ),
    # Orange star with black-and-orange halves and a white square emblem.
    "medal": Concept(
        "medal",
        ObjectSpec("star", "orange", "halves", "black", emblem="square", emblem_colour="white"),
        background="blue",
    ),
}


def concept_colours(concept: Concept) -> tuple[str, ...]:
    """Every colour the concept's body shows (what a fidelity check looks for)."""
    o = concept.obj
    return tuple(c for c in (o.colour, o.pattern_colour, o.emblem_colour) if c)


def training_scenes(concept: Concept, n: int, seed: int) -> list[SceneSpec]:
    """``n`` narrow-context scenes: the concept's background, large, in the centre, ±2 px jitter."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        jitter = (float(rng.integers(-2, 3)), float(rng.integers(-2, 3)))
        obj = replace(concept.obj, size="large", position="centre", jitter=jitter)
        out.append(SceneSpec(obj=obj, background=concept.background, texture=concept.texture))
    return out


def training_images(concept: Concept, n: int, seed: int) -> np.ndarray:
    """uint8 [n, 64, 64, 3] renders of ``training_scenes``."""
    return np.stack([render_scene(s) for s in training_scenes(concept, n, seed)])


def evaluation_scenes(concept: Concept) -> list[SceneSpec]:
    """Scenes the fine-tuned model is asked for: every other position × backgrounds unlike the training one.

    Background colours exclude the concept's own colours, so the object stays separable from its
    surroundings in the pixel metrics.
    """
    taken = set(concept_colours(concept)) | {concept.background}
    backgrounds = [c for c in COLOURS if c not in taken]
    out = []
    for i, pos in enumerate(p for p in POSITION_PHRASE if p != "centre"):
        for j, bg in enumerate(backgrounds):
            size = "small" if (i + j) % 2 else "large"
            out.append(SceneSpec(obj=replace(concept.obj, position=pos, size=size), background=bg))
    return out


def concept_prompt(scene: SceneSpec, token: str, concept: Concept) -> str:
    """The prompt for an evaluation scene, e.g. "a sks circle at the left on a green background"."""
    return caption(scene, noun=f"{token} {concept.class_noun}")
