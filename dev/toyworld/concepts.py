"""Concepts of the toy world: particular objects to learn, their narrow training renders and test prompts.

A concept is one specific combination of named parts (shape, body colour, a pattern and an emblem with
their colours) and unnamed ones (stripe angle, emblem placement and scale). The base world draws every part
and every named combination, but never the concept's full look (``render.sample_scenes`` excludes it), and
no caption can ask for the unnamed parts: words alone get close, never exact, as with a real dog or mug.
Training renders keep one context (same background, about the same place and size), as a user's few photos
would; evaluation prompts ask for other backgrounds, positions and sizes, which is where fidelity and
editability pull against each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dci.toyworld.render import (
    COLOURS,
    POSITION_PHRASE,
    ObjectSpec,
    SceneSpec,
    caption,
    decoration_phrase,
    object_pixels,
    render_scene,
)


@dataclass(frozen=True)
class ToyConcept:
    """A named toy-world object plus the context its training renders share."""

    name: str
    obj: ObjectSpec
    background: str = "white"
    texture: str = "flat"

    @property
    def class_noun(self) -> str:
        """The base-world word for what the concept is (its shape)."""
        return self.obj.shape

    def description(self) -> str:
        """Everything a caption can say about the concept: "red circle with yellow stripes and a ..."."""
        return f"{self.obj.colour} {self.obj.shape} {decoration_phrase(self.obj)}"


CONCEPTS: dict[str, ToyConcept] = {
    # Red circle, yellow horizontal stripes, a large blue star emblem at the upper right.
    "badge": ToyConcept(
        "badge",
        ObjectSpec("circle", "red", "stripes", "yellow", emblem="star", emblem_colour="blue",
                   stripe_angle="horizontal", emblem_place="upper-right", emblem_scale="large"),
    ),
    # Green square, white dots, a small purple circle emblem at the upper left.
    "tile": ToyConcept(
        "tile",
        ObjectSpec("square", "green", "dots", "white", emblem="circle", emblem_colour="purple",
                   emblem_place="upper-left", emblem_scale="small"),
        background="yellow",
    ),
    # Orange hexagon, a black band, a large white square emblem at the upper left.
    "medal": ToyConcept(
        "medal",
        ObjectSpec("hexagon", "orange", "band", "black", emblem="square", emblem_colour="white",
                   emblem_place="upper-left", emblem_scale="large"),
        background="blue",
    ),
    # Blue diamond, orange vertical stripes, a small yellow star emblem in the centre.
    "kite": ToyConcept(
        "kite",
        ObjectSpec("diamond", "blue", "stripes", "orange", emblem="star", emblem_colour="yellow",
                   stripe_angle="vertical", emblem_place="centre", emblem_scale="small"),
        background="white",
    ),
}


def concept_looks() -> frozenset:
    """The full looks of every concept: the base world never draws these."""
    return frozenset(c.obj.look() for c in CONCEPTS.values())


def concept_colours(concept: ToyConcept) -> tuple[str, ...]:
    """Every colour the concept's body shows (what a fidelity check looks for), body colour first."""
    o = concept.obj
    return tuple(c for c in (o.colour, o.pattern_colour, o.emblem_colour) if c)


def training_scenes(concept: ToyConcept, n: int, seed: int) -> list[SceneSpec]:
    """``n`` narrow-context scenes: the concept's background, large, in the centre, ±4 px jitter."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        jitter = (float(rng.integers(-4, 5)), float(rng.integers(-4, 5)))
        obj = replace(concept.obj, size="large", position="centre", jitter=jitter)
        out.append(SceneSpec(obj=obj, background=concept.background, texture=concept.texture))
    return out


def training_images(concept: ToyConcept, n: int, seed: int) -> np.ndarray:
    """uint8 [n, S, S, 3] renders of ``training_scenes``."""
    return np.stack([render_scene(s) for s in training_scenes(concept, n, seed)])


def training_masks(concept: ToyConcept, n: int, seed: int, margin: int = 4) -> np.ndarray:
    """float32 [n, S, S] foreground masks of ``training_images`` (1 = the object's body or emblem), each shape's
    half-extent grown by ``margin`` pixels (about that much outward; less at a star's inner corners) so that the
    object's edge against the background is learned too."""
    return np.stack([object_pixels(s, grow=margin) for s in training_scenes(concept, n, seed)]).astype(np.float32)


def evaluation_scenes(concept: ToyConcept) -> list[SceneSpec]:
    """Scenes the fine-tuned model is asked for: every other position × backgrounds unlike the training one.

    Background colours exclude the concept's own colours, so the object stays separable from its
    surroundings in the pixel metrics. Sizes alternate.
    """
    taken = set(concept_colours(concept)) | {concept.background}
    backgrounds = [c for c in COLOURS if c not in taken]
    out = []
    for i, pos in enumerate(p for p in POSITION_PHRASE if p != "centre"):
        for j, bg in enumerate(backgrounds):
            size = "small" if (i + j) % 2 else "large"
            out.append(SceneSpec(obj=replace(concept.obj, position=pos, size=size), background=bg))
    return out


def concept_prompt(scene: SceneSpec, token: str, concept: ToyConcept) -> str:
    """The prompt for an evaluation scene, e.g. "a sks circle at the left on a green background"."""
    return caption(scene, noun=f"{token} {concept.class_noun}")


def training_caption_words(concept: ToyConcept, token: str) -> tuple[str, str]:
    """The world's caption of the training renders' shared scene, split around "<token> <class noun>": the
    words before and after, e.g. ("a large", "in the centre on a white background")."""
    text = concept_prompt(training_scenes(concept, 1, 0)[0], token, concept)
    before, sep, after = text.partition(f" {token} {concept.class_noun}")
    if not sep:
        raise ValueError(f"the training caption {text!r} does not hold '{token} {concept.class_noun}'")
    return before.strip(), after.strip()


def description_prompt(scene: SceneSpec, concept: ToyConcept) -> str:
    """The same scene asked for with the concept's full nameable description instead of a trigger word."""
    return caption(scene, noun=concept.description())
