"""DCI Fisher Divergence and DCI Wasserstein in-process on the tiny SD1.5: zero where nothing differs, positive
where the model changed, clear errors for bad inputs, Cancel, and the report on the node."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dci.toyworld.descriptors import FEATURES, scene_descriptors
from dci.toyworld.render import ObjectSpec, SceneSpec, render_scene
from dev.fixtures import random_concept, random_infusion_concept, write_concept

FISHER = dict(prompts="a photo of a cat\na red house", seeds_per_prompt=2, seed=0, noise_levels=2, sample_steps=2,
              cfg=5.0, width=64, height=64, sampler_name="euler", scheduler="normal")


def fisher(comfy, base, custom, clip, **overrides):
    (eps, score, report), ui = comfy.run_node("DCIFisherDivergence", base_model=base, custom_model=custom, clip=clip,
                                              **{**FISHER, **overrides})
    assert ui["text"] == [report]
    return eps, score, report


def test_identical_models_give_zero(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    eps, score, report = fisher(comfy, model, model.clone(), clip)
    assert (eps, score) == (0.0, 0.0)
    assert "4 latents × 2 noise levels" in report


def test_an_infusion_concept_gives_zero_on_prompts_without_its_trigger(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    name = write_concept(random_infusion_concept(model, clip), "test_fisher_infusion")
    (custom, cclip, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                           strength_model=1.0, strength_clip=1.0)
    cclip.encode_from_tokens(cclip.tokenize("a photo of sks dog"))  # the trigger's rows are now recorded
    eps, score, _ = fisher(comfy, model, custom, cclip)
    assert (eps, score) == (0.0, 0.0)


def test_a_changed_model_gives_a_positive_divergence(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    name = write_concept(random_concept(model, clip, scale=0.2), "test_fisher_kv")
    (custom, cclip, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                           strength_model=1.0, strength_clip=1.0)
    eps, score, report = fisher(comfy, model, custom, clip)
    assert eps > 0 and score > 0 and np.isfinite([eps, score]).all()
    # the base model is unchanged by the run: identical to itself afterwards
    assert fisher(comfy, model, model.clone(), clip)[0] == 0.0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"prompts": "  \n "}, "no prompts"),
    ({"prompts": "a cat", "seeds_per_prompt": 1}, "at least 2 clean latents"),
    ({"width": 60}, "multiples of 8"),
])
def test_fisher_input_errors(comfy, tiny_sd15, overrides, message):
    model, clip, _ = tiny_sd15
    with pytest.raises(ValueError, match=message):
        fisher(comfy, model, model, clip, **overrides)


def test_fisher_refuses_non_models_and_other_architectures(comfy, tiny_sd15, tiny_sdxl):
    model, clip, _ = tiny_sd15
    with pytest.raises(ValueError, match="'custom_model' must be a MODEL"):
        fisher(comfy, model, clip, clip)
    with pytest.raises(ValueError, match="different kinds"):
        fisher(comfy, model, tiny_sdxl[0], clip)


def test_fisher_can_be_cancelled(comfy, tiny_sd15):
    import comfy.model_management as mm

    model, clip, _ = tiny_sd15
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            fisher(comfy, model, model.clone(), clip)
    finally:
        mm.interrupt_current_processing(False)


def _renders(background: str, n: int) -> torch.Tensor:
    scenes = [SceneSpec(obj=ObjectSpec(shape="circle", colour="red", position=pos), background=background)
              for pos in ("left", "right", "top", "bottom", "centre", "left")[:n]]
    return torch.from_numpy(np.stack([render_scene(s) for s in scenes])).float() / 255.0


def test_descriptors_read_the_scene():
    a = scene_descriptors(_renders("blue", 2))
    assert a.shape == (2, len(FEATURES))
    i = FEATURES.index("object_x")
    assert a[0, i] < 0.5 < a[1, i]  # left, right
    bg = a[0, :3]
    assert bg[2] > 0.5 and bg[0] < 0.5  # blue background


def test_wasserstein_node(comfy):
    same = _renders("blue", 6)
    (w2, per, report), ui = comfy.run_node("DCIWasserstein", concept_images=same, class_images=same.clone(),
                                           shrinkage="auto", prompts="left right\ntop bottom")
    assert w2 == pytest.approx(0.0, abs=1e-6) and per == pytest.approx(0.0, abs=1e-9)
    assert ui["text"] == [report] and "toy-world scene descriptors" in report and "over 2 prompts" in report
    (w2b, _, _), _ = comfy.run_node("DCIWasserstein", concept_images=same, class_images=_renders("green", 6),
                                    shrinkage="auto", prompts="")
    assert w2b > 0.1


def test_wasserstein_errors(comfy):
    imgs = _renders("blue", 4)
    with pytest.raises(ValueError, match="at least 2"):
        comfy.run_node("DCIWasserstein", concept_images=imgs[:1], class_images=imgs, shrinkage="auto")
    with pytest.raises(ValueError, match="split evenly over 3 prompts"):
        comfy.run_node("DCIWasserstein", concept_images=imgs, class_images=imgs, shrinkage="auto",
                       prompts="a\nb\nc")
    with pytest.raises(ValueError, match="CLIP_VISION"):
        comfy.run_node("DCIWasserstein", concept_images=imgs, class_images=imgs, shrinkage="auto",
                       clip_vision="not a model")


def test_wasserstein_on_clip_vision_embeddings(comfy, tmp_path):
    from dci.comfyui.overfitting import clip_vision_features
    from dev.fixtures import tiny_clip_vision

    vision = tiny_clip_vision(tmp_path)
    a, b = _renders("blue", 6), _renders("green", 6)
    feats = clip_vision_features(vision, a)
    assert feats.shape == (6, 16)
    assert torch.equal(feats, vision.encode_image(a, crop=True)["image_embeds"].float().cpu())
    (w2, _, report), _ = comfy.run_node("DCIWasserstein", concept_images=a, class_images=a.clone(),
                                        shrinkage="auto", clip_vision=vision)
    assert w2 == pytest.approx(0.0, abs=1e-4) and "CLIP vision embeddings (16 dims)" in report
    (w2b, _, _), _ = comfy.run_node("DCIWasserstein", concept_images=a, class_images=b, shrinkage="auto",
                                    clip_vision=vision)
    assert w2b > 1e-3


def test_fisher_on_sdxl_uses_its_pooled_and_size_conditioning(comfy, tiny_sdxl):
    model, clip, _ = tiny_sdxl
    assert fisher(comfy, model, model.clone(), clip)[0] == 0.0
    name = write_concept(random_concept(model, clip, scale=0.2, family="sdxl"), "test_fisher_sdxl")
    (custom, _, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                       strength_model=1.0, strength_clip=1.0)
    eps, score, _ = fisher(comfy, model, custom, clip)
    assert eps > 0 and score > 0
