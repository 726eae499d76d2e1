"""Two concepts in one DCI prompt: DCI Prompt Encode builds each one's token mask and the auxiliary prompt with
both phrases replaced; DBIM protects them separately or as a union; DCI KSampler and DCI Apply run it."""

from __future__ import annotations

import pytest
import torch

from dci.comfyui.sampling import attention
from dev.fixtures import random_concept, write_concept

TEXT = "a photo of sks dog next to a zwx mug on the beach"
DCI = dict(split=0.5, lam=1.0, aux_map="reference", guidance="shared", aux_seed=3)


def two_concepts(comfy, tiny_sd15):
    """The checkpoint with two chained concepts loaded, their references, a negative and a latent."""
    model, clip = tiny_sd15[:2]
    dog = write_concept(random_concept(model, clip, trigger="sks", class_noun="dog", seed=1), "two_dog")
    mug = write_concept(random_concept(model, clip, trigger="zwx", class_noun="mug", seed=2), "two_mug")
    (m, c, ref_dog), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=dog,
                                        strength_model=1.0, strength_clip=1.0)
    (m, c, ref_mug), _ = comfy.run_node("DCILoadConcept", model=m, clip=c, concept_name=mug,
                                        strength_model=1.0, strength_clip=1.0)
    (neg,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="blurry")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=2)
    return m, c, ref_dog, ref_mug, neg, lat


def encode(comfy, c, ref_dog, ref_mug, maps="separate", text=TEXT, **kw):
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=text, auxiliary_noun="", concept=ref_dog,
                               concept_2=ref_mug, concept_maps=maps, **kw)
    return pos


def sample(comfy, node, m, pos, neg, lat, **dci):
    (out,), _ = comfy.run_node(node, model=m, seed=7, steps=5, cfg=5.0, sampler_name="euler", scheduler="normal",
                               positive=pos, negative=neg, latent_image=lat, denoise=1.0, **dci)
    return out["samples"]


def test_prompt_encode_builds_each_concepts_mask_and_one_auxiliary_prompt(comfy, tiny_sd15):
    m, c, ref_dog, ref_mug, neg, lat = two_concepts(comfy, tiny_sd15)
    data = encode(comfy, c, ref_dog, ref_mug)[0][1]["dci"]
    assert data.aux_prompt == "a photo of cat next to a car on the beach"  # two different automatic nouns
    dog, mug = data.concept_masks
    assert dog.nonzero().flatten().tolist() == [4, 5, 6]  # 'sks' is two tokens (the concept's k = 2), then 'dog'
    assert mug.nonzero().flatten().tolist() == [10, 11, 12]
    assert torch.equal(data.concept_mask, dog | mug)
    assert data.aux_noun_mask.nonzero().flatten().tolist() == [4, 8]  # 'cat' and 'car'
    assert [t.nonzero().flatten().tolist() for t in data.dbim_concepts] == [[4, 5, 6], [10, 11, 12]]
    union = encode(comfy, c, ref_dog, ref_mug, maps="union")[0][1]["dci"]
    assert [t.nonzero().flatten().tolist() for t in union.dbim_concepts] == [[4, 5, 6, 10, 11, 12]]
    (plain,), _ = comfy.run_node("CLIPTextEncode", clip=c, text=TEXT)
    assert torch.equal(encode(comfy, c, ref_dog, ref_mug)[0][0], plain[0][0])
    # typed phrases and auxiliary nouns
    (typed,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=TEXT, auxiliary_noun="puppy",
                                 concept_phrase="sks dog", concept_phrase_2="zwx mug", auxiliary_noun_2="vase")
    assert typed[0][1]["dci"].aux_prompt == "a photo of puppy next to a vase on the beach"
    # one concept: no per-concept masks, both settings the same
    (one,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=TEXT, auxiliary_noun="", concept=ref_dog,
                               concept_maps="union")
    assert one[0][1]["dci"].concept_masks == () and one[0][1]["dci"].aux_prompt == "a photo of cat next to a zwx mug on the beach"


def test_separate_and_union_reach_dbim_and_sample_differently(comfy, tiny_sd15):
    m, c, ref_dog, ref_mug, neg, lat = two_concepts(comfy, tiny_sd15)
    seen = []
    original = attention.DBIMPatch.__call__

    def recording(self, q, k, v, extra_options):
        step = extra_options.get(attention.STEP_KEY)
        if step is not None and extra_options.get(attention.ROWS_KEY) is not None:
            concepts = step.run.masks_for(k.shape[1])[0]
            seen.append(len(concepts) if isinstance(concepts, list) else 1)
        return original(self, q, k, v, extra_options)

    out = {}
    attention.DBIMPatch.__call__ = recording
    try:
        for maps, count in (("separate", 2), ("union", 1)):
            seen.clear()
            out[maps] = sample(comfy, "DCIKSampler", m, encode(comfy, c, ref_dog, ref_mug, maps), neg, lat, **DCI)
            assert seen and set(seen) == {count}, maps
    finally:
        attention.DBIMPatch.__call__ = original
    assert torch.isfinite(out["separate"]).all() and not torch.equal(out["separate"], out["union"])
    (one,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=TEXT, auxiliary_noun="", concept=ref_dog)
    assert not torch.equal(sample(comfy, "DCIKSampler", m, one, neg, lat, **DCI), out["separate"])


def test_dci_apply_with_two_concepts_equals_dci_ksampler(comfy, tiny_sd15):
    m, c, ref_dog, ref_mug, neg, lat = two_concepts(comfy, tiny_sd15)
    for maps in ("separate", "union"):
        pos = encode(comfy, c, ref_dog, ref_mug, maps)
        (model,), _ = comfy.run_node("DCIApply", model=m, **DCI)
        assert torch.equal(sample(comfy, "KSampler", model, pos, neg, lat),
                           sample(comfy, "DCIKSampler", m, pos, neg, lat, **DCI)), maps


def test_clear_errors_for_two_concepts(comfy, tiny_sd15):
    m, c, ref_dog, ref_mug, neg, lat = two_concepts(comfy, tiny_sd15)
    with pytest.raises(ValueError, match="'zwx mug' is not in the prompt"):
        encode(comfy, c, ref_dog, ref_mug, text="a photo of sks dog on the beach")
    with pytest.raises(ValueError, match="given twice"):
        encode(comfy, c, ref_dog, ref_dog)
    with pytest.raises(ValueError, match="overlaps another concept"):
        comfy.run_node("DCIPromptEncode", clip=c, text=TEXT, auxiliary_noun="", concept=ref_dog,
                       concept_phrase_2="dog")
    with pytest.raises(ValueError, match="must differ from the concept phrases"):
        comfy.run_node("DCIPromptEncode", clip=c, text=TEXT, auxiliary_noun="", concept=ref_dog, concept_2=ref_mug,
                       auxiliary_noun_2="sks dog")
