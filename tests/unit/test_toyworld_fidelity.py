"""The toy world's fidelity metric ranks the concept above look-alikes, and editability reads the scene.

Validation set: every evaluation scene of every concept (other positions, both sizes, backgrounds unlike
the training one; flat, gradient and grid textures in turn, ±4 px jitter), rendered with a mild blur and
pixel noise as a stand-in for a VAE-decoded sample. In each scene the concept instance is compared with the
same scene holding another concept, the plain class object (same shape, each of the concept's colours, no
decoration), the concept with only one of its two decorations, or a *named twin*: the concept with one
unnamed part changed (stripe angle, emblem placement, emblem scale), i.e. what the concept's full
description can produce. The instance must score higher in at least 95 % of those pairs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dci.toyworld.render import (
    EMBLEM_PLACES,
    EMBLEM_SCALES,
    IMAGE_SIZE,
    STRIPE_ANGLES,
    TEXTURES,
    ObjectSpec,
    SceneSpec,
    render_scene,
)
from dev.toyworld import fidelity as fid
from dev.toyworld.concepts import CONCEPTS, concept_colours, concept_prompt, evaluation_scenes

MIN_PAIRWISE_ACCURACY = 0.95


def degrade(image: np.ndarray, seed: int) -> np.ndarray:
    """A 3×3 box blur half-mixed in, plus Gaussian noise (σ 6): soft edges and speckle like a decoded sample."""
    x = image.astype(np.float32)
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    blur = sum(pad[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    noise = np.random.default_rng(seed).normal(0.0, 6.0, x.shape)
    return np.clip(np.rint(0.5 * x + 0.5 * blur + noise), 0, 255).astype(np.uint8)


def impostors(name: str) -> dict[str, ObjectSpec]:
    """Objects that are not the instance: other concepts, the plain class, one decoration only, named twins."""
    obj = CONCEPTS[name].obj
    out = {f"concept:{other}": c.obj for other, c in CONCEPTS.items() if other != name}
    for colour in concept_colours(CONCEPTS[name]):
        out[f"plain:{colour}"] = ObjectSpec(shape=obj.shape, colour=colour)
    out["pattern_only"] = replace(obj, emblem=None, emblem_colour=None)
    out["emblem_only"] = replace(obj, pattern="plain", pattern_colour=None)
    if obj.pattern == "stripes":
        for angle in STRIPE_ANGLES:
            if angle != obj.stripe_angle:
                out[f"twin:stripes_{angle}"] = replace(obj, stripe_angle=angle)
    for place in EMBLEM_PLACES:
        if place != obj.emblem_place:
            out[f"twin:emblem_{place}"] = replace(obj, emblem_place=place)
    for scale in EMBLEM_SCALES:
        if scale != obj.emblem_scale:
            out[f"twin:emblem_{scale}"] = replace(obj, emblem_scale=scale)
    return out


def pairwise_accuracy() -> tuple[float, dict[str, float], int]:
    wins: dict[str, list[bool]] = {}
    for name, concept in CONCEPTS.items():
        meter = fid.FidelityMeter(concept)
        for k, scene in enumerate(evaluation_scenes(concept)):
            # Textured backgrounds and jitter too: the metric must not depend on a flat, exact scene.
            scene = replace(scene, texture=TEXTURES[k % 3], obj=replace(scene.obj, jitter=(k % 9 - 4, k % 7 - 3)))
            positive = meter(degrade(render_scene(scene), k))
            for kind, obj in impostors(name).items():
                fake = SceneSpec(replace(obj, size=scene.obj.size, position=scene.obj.position, jitter=scene.obj.jitter),
                                 scene.background, scene.texture)
                wins.setdefault(kind.split(":")[0], []).append(positive > meter(degrade(render_scene(fake), k)))
    every = [w for ws in wins.values() for w in ws]
    return float(np.mean(every)), {k: float(np.mean(v)) for k, v in wins.items()}, len(every)


def test_fidelity_ranks_the_instance_above_lookalikes():
    overall, by_kind, pairs = pairwise_accuracy()
    print(f"pairwise accuracy {overall:.3f} over {pairs} pairs; by impostor kind {by_kind}")
    assert pairs >= 300
    assert overall >= MIN_PAIRWISE_ACCURACY, by_kind
    for kind in ("concept", "plain", "twin"):
        assert by_kind[kind] >= MIN_PAIRWISE_ACCURACY, by_kind


def test_clean_instance_scores_high_and_an_empty_image_zero():
    for concept in CONCEPTS.values():
        meter = fid.FidelityMeter(concept)
        for scene in evaluation_scenes(concept):
            assert meter(render_scene(scene)) > 0.8
        assert meter(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)) == 0.0


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_editability_reads_background_position_and_size(name):
    concept = CONCEPTS[name]
    scenes = evaluation_scenes(concept)
    for scene in scenes:
        prompt = concept_prompt(scene, "sks", concept)
        image = render_scene(scene)
        scores = fid.editability_scores(image, prompt, concept)
        assert scores == {"background": True, "position": True, "size": True}, (prompt, scores)
        other = "small" if scene.obj.size == "large" else "large"
        resized = fid.editability_scores(image, prompt.replace(scene.obj.size, other, 1), concept)
        assert not resized["size"], prompt
        everything = fid.prompt_scores(image, prompt, concept)
        assert all(everything.values()), (prompt, everything)
    # The training context answers an evaluation prompt wrongly: background and position both off.
    train_like = render_scene(SceneSpec(replace(concept.obj, position="centre"), background=concept.background))
    wrong = fid.editability_scores(train_like, concept_prompt(scenes[0], "sks", concept), concept)
    assert not wrong["background"] and not wrong["position"], wrong


def test_committed_concept_renders_are_the_training_renders():
    """assets/toyworld/concepts/ holds exactly what dev/toyworld/export_concepts.py writes."""
    from pathlib import Path

    from PIL import Image

    from dev.toyworld.concepts import training_images

    folder = Path(__file__).resolve().parents[2] / "assets" / "toyworld" / "concepts"
    for name, concept in CONCEPTS.items():
        expected = training_images(concept, 5, seed=0)
        for i, pixels in enumerate(expected):
            with Image.open(folder / name / f"{name}_{i}.png") as im:
                assert im.size == (IMAGE_SIZE, IMAGE_SIZE)
                assert np.array_equal(np.asarray(im.convert("RGB")), pixels), f"{name}_{i}.png is stale"
        # The instance's own training renders are what fidelity calls the concept.
        assert min(fid.FidelityMeter(concept)(p) for p in expected) > 0.9
