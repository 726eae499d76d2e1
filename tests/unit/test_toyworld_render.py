"""The toy world's renderer, caption grammar, concepts and pixel metrics (numpy only, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from dci.toyworld import render
from dev.toyworld import concepts, metrics


def test_rendering_is_a_pure_function_of_the_seed() -> None:
    a = [render.render_scene(s) for s in render.sample_scenes(20, seed=3)]
    b = [render.render_scene(s) for s in render.sample_scenes(20, seed=3)]
    c = [render.render_scene(s) for s in render.sample_scenes(20, seed=4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].shape == (render.IMAGE_SIZE, render.IMAGE_SIZE, 3) and a[0].dtype == np.uint8


def test_base_world_respects_its_rules() -> None:
    looks = concepts.concept_looks()
    scenes = render.sample_scenes(2000, seed=0, excluded_looks=looks)
    for s in scenes:
        o = s.obj
        assert not render.held_out(o.shape, o.colour, s.background)
        colours = [c for c in (o.colour, o.pattern_colour, o.emblem_colour, s.background) if c]
        assert len(set(colours)) == len(colours), "every colour of a scene is distinct"
        assert (o.pattern == "plain") == (o.pattern_colour is None)
        assert (o.emblem is None) == (o.emblem_colour is None)
        assert o.look() not in looks, "the base world never draws a concept's full look"
    # Every building block shows up, both decorations together included, and the unnamed parts vary.
    both = [s for s in scenes if s.obj.pattern != "plain" and s.obj.emblem]
    assert len(both) > 0.15 * len(scenes)
    assert {s.obj.stripe_angle for s in scenes if s.obj.pattern == "stripes"} == set(render.STRIPE_ANGLES)
    assert {s.obj.emblem_place for s in scenes if s.obj.emblem} == set(render.EMBLEM_PLACES)
    assert {s.obj.emblem_scale for s in scenes if s.obj.emblem} == set(render.EMBLEM_SCALES)


def test_concepts_named_parts_are_drawn_by_the_base_world() -> None:
    """Each concept's nameable combination appears in base training, only its unnamed parts are its own."""
    named = {(s.obj.shape, s.obj.colour, s.obj.pattern, s.obj.pattern_colour, s.obj.emblem, s.obj.emblem_colour)
             for s in render.sample_scenes(20000, seed=5)}
    parts = {(s.obj.pattern, s.obj.emblem) for s in render.sample_scenes(2000, seed=6)}
    for c in concepts.CONCEPTS.values():
        o = c.obj
        assert (o.pattern, o.emblem) in parts
        # The exact named combination is rare (one in thousands) but allowed; its unnamed parts are not.
        drawn = render.sample_scenes(3000, seed=8, excluded_looks=concepts.concept_looks())
        assert o.look() not in {s.obj.look() for s in drawn}
    assert len(named) > 1000


def test_full_captions_parse_back_to_the_scene() -> None:
    for s in render.sample_scenes(300, seed=1, allow_held_out=True):
        asked = render.parse_caption(render.caption(s))
        truth = render.scene_attributes(s)
        for key in ("shape", "colour", "size", "position", "background", "pattern_colour", "emblem",
                    "emblem_colour"):
            assert asked[key] == truth[key], (render.caption(s), key)
        assert asked["pattern"] == (None if truth["pattern"] == "plain" else truth["pattern"])
        assert asked["texture"] == (None if truth["texture"] == "flat" else truth["texture"])


def test_partial_captions_never_ask_for_something_else() -> None:
    rng = np.random.default_rng(0)
    for s in render.sample_scenes(300, seed=2):
        text = render.caption(s, rng)
        truth = render.scene_attributes(s)
        for key, value in render.parse_caption(text).items():
            assert value is None or value == truth[key], (text, key)


def test_articles_are_english_and_unnamed_parts_unsaid() -> None:
    obj = render.ObjectSpec("hexagon", "white", "band", "orange", emblem="star", emblem_colour="orange",
                            size="large", emblem_place="upper-left", emblem_scale="small")
    text = render.caption(render.SceneSpec(obj, background="orange"))
    assert text == ("a large white hexagon with an orange band and an orange star emblem in the centre "
                    "on an orange background")
    asked = render.parse_caption(text)
    assert asked["pattern_colour"] == "orange" and asked["emblem"] == "star" and asked["pattern"] == "band"
    for word in ("upper", "left", "small", "horizontal", "vertical"):
        assert word not in text


def test_scene_from_caption_satisfies_the_caption() -> None:
    text = "a small blue star with yellow dots at the top on a red grid background"
    s = render.scene_from_caption(text)
    assert render.parse_caption(render.caption(s)) == render.parse_caption(text)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_read_clean_renders(seed: int) -> None:
    scores = []
    for s in render.sample_scenes(400, seed=seed, allow_held_out=True):
        reading = metrics.read_scene(render.render_scene(s))
        scores.append(metrics.score_reading(reading, render.scene_attributes(s)))
    acc = metrics.accuracy(scores)
    # A small object whose pattern catches more cells than usual and a large emblem can leave the body
    # colour second (about one scene in a thousand): the dominant-colour reader is then wrong by design.
    assert acc.pop("colour") >= 0.995
    assert acc == {"background": 1.0, "emblem": 1.0, "pattern": 1.0, "position": 1.0, "size": 1.0}


def test_metrics_accept_float_images() -> None:
    s = render.sample_scenes(1, seed=7)[0]
    img = render.render_scene(s)
    assert metrics.read_scene(img.astype(np.float32) / 255.0) == metrics.read_scene(img)


def test_concepts_are_unnameable_and_narrow() -> None:
    for c in concepts.CONCEPTS.values():
        assert c.obj.emblem and c.obj.pattern != "plain", "pattern and emblem together"
        assert len(set(concepts.concept_colours(c))) == 3
        train = concepts.training_scenes(c, 6, seed=0)
        assert {(s.background, s.obj.position, s.obj.size) for s in train} == {
            (c.background, "centre", "large")
        }
        images = concepts.training_images(c, 2, seed=0)
        reading = metrics.read_scene(images[0])
        assert set(concepts.concept_colours(c)) <= set(reading.colours)
        evals = concepts.evaluation_scenes(c)
        assert all(s.background != c.background and s.obj.position != "centre" for s in evals)
        prompt = concepts.concept_prompt(evals[0], "sks", c)
        assert prompt.startswith(f"a {evals[0].obj.size} sks {c.class_noun} at the ")
        assert c.description() in concepts.description_prompt(evals[0], c)


def test_training_caption_words_wrap_the_trigger_in_the_training_scene() -> None:
    """bench-quality --caption scene: the words around "sks <class>" rebuild the world's caption of the training
    renders' scene, which parses back to that scene (not to the evaluation scenes)."""
    for c in concepts.CONCEPTS.values():
        before, after = concepts.training_caption_words(c, "sks")
        text = f"{before} sks {c.class_noun} {after}"
        assert text == concepts.concept_prompt(concepts.training_scenes(c, 1, 0)[0], "sks", c)
        assert before == "a large" and after == f"in the centre on a {c.background} background"
        read = render.parse_caption(text)
        assert (read["size"], read["position"], read["background"]) == ("large", "centre", c.background)


@pytest.mark.parametrize("text", ["a small sks circle at the left on a green background",
                                  "a sks small circle at the left on a green background",
                                  "a small sks green circle at the left on a green background"])
def test_parse_caption_reads_past_a_trigger_word(text: str) -> None:
    asked = render.parse_caption(text)
    assert asked["size"] == "small" and asked["shape"] == "circle"
    assert asked["position"] == "left" and asked["background"] == "green"
    assert asked["colour"] == ("green" if "sks green" in text else None)


def test_parse_caption_reads_plain_captions_and_needs_a_shape() -> None:
    asked = render.parse_caption("a large red square on a blue background")
    assert (asked["size"], asked["colour"], asked["shape"]) == ("large", "red", "square")
    assert render.parse_caption("a sks thing on a blue background")["shape"] is None


def test_training_masks_cover_each_renders_object_and_little_else():
    for c in concepts.CONCEPTS.values():
        images = concepts.training_images(c, 3, seed=0).astype(int)
        masks = concepts.training_masks(c, 3, seed=0)
        assert masks.shape == images.shape[:3] and masks.dtype == np.float32
        assert set(np.unique(masks)) <= {0.0, 1.0}
        for scene, image, mask in zip(concepts.training_scenes(c, 3, seed=0), images, masks, strict=True):
            empty = np.clip(np.rint(render._background(scene.background, scene.texture, render.IMAGE_SIZE)), 0, 255)
            # every pixel the object changes against its empty background is inside the mask
            assert (mask[np.abs(image - empty.astype(int)).sum(-1) > 0] == 1).all()
            assert 0.05 < mask.mean() < 0.4  # the object and a 4 px margin, not the scene
