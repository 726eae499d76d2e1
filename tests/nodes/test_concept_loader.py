"""DCI Load Concept in-process: patches land on clones only, the trigger word works in the stock
CLIPTextEncode, strength 0 and trigger-free prompts are bit-identical, bad files are clear errors."""

from __future__ import annotations

import logging

import pytest
import torch

from dci.comfyui.concept import base_kv_weights, kv_weight_keys
from dev.fixtures import random_concept, write_concept


def encode(comfy, clip, text):
    (cond,), _ = comfy.run_node("CLIPTextEncode", clip=clip, text=text)
    return cond[0][0], cond[0][1]["pooled_output"]


def sample(comfy, model, clip, text="a photo of a dog", seed=3, steps=3):
    pos = comfy.run_node("CLIPTextEncode", clip=clip, text=text)[0][0]
    neg = comfy.run_node("CLIPTextEncode", clip=clip, text="")[0][0]
    (latent,) = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    (out,), _ = comfy.run_node(
        "KSampler", model=model, seed=seed, steps=steps, cfg=5.0, sampler_name="euler", scheduler="normal",
        positive=pos, negative=neg, latent_image=latent, denoise=1.0,
    )
    return out["samples"]


def loaded_weights(model) -> dict[str, torch.Tensor]:
    """The attn2 K/V weights as ComfyUI computes them for sampling (base + patches)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    sd = model.model.state_dict()
    return {k: sd[k].detach().clone() for k in kv_weight_keys(model)}


@pytest.fixture()
def setup(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    concept = random_concept(model, clip, trigger="sks", class_noun="dog")
    name = write_concept(concept, "test_sks_dog")
    return comfy, model, clip, concept, name


def test_patched_kv_equal_base_plus_strength_times_delta(setup):
    comfy, model, clip, concept, name = setup
    base = {k: v.clone() for k, v in base_kv_weights(model).items()}
    (m2, c2, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                      strength_model=0.7, strength_clip=1.0)
    patched = loaded_weights(m2)
    for key, delta in concept.kv_deltas.items():
        torch.testing.assert_close(patched[key], base[key] + 0.7 * delta, rtol=0, atol=1e-6)
    assert (ref.trigger, ref.class_noun, ref.phrase, ref.family, ref.num_tokens) == ("sks", "dog", "sks dog", "sd1", 2)
    # the input MODEL is untouched: ComfyUI restores its weights when it is loaded again
    assert model.patches == {}
    again = loaded_weights(model)
    assert all(torch.equal(again[k], base[k]) for k in base)


def test_trigger_word_gives_the_learned_embeddings_in_the_stock_encoder(setup):
    comfy, model, clip, concept, name = setup
    (_, c2, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                   strength_model=1.0, strength_clip=1.0)
    tokens = c2.tokenize("a photo of SKS dog, on grass")["l"][0]
    vectors = [t[0] for t in tokens if isinstance(t[0], torch.Tensor)]
    assert len(vectors) == 2
    assert all(torch.equal(v, concept.tokens["clip_l"][i]) for i, v in enumerate(vectors))
    # the encoding changes where the trigger is used...
    assert not torch.equal(encode(comfy, c2, "a photo of sks dog")[0], encode(comfy, clip, "a photo of sks dog")[0])
    # ...and nowhere else: bit-identical for prompts without it (also "sksx", "embedding:sks" are not the trigger)
    for text in ["a photo of a dog", "sksx dog", "(red:1.3) cat at night", ""]:
        a, b = encode(comfy, c2, text), encode(comfy, clip, text)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), text


def test_trigger_inside_weight_syntax_and_clip_strength(setup):
    comfy, model, clip, concept, name = setup
    (_, c2, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                   strength_model=1.0, strength_clip=0.5)
    tokens = c2.tokenize("(sks dog:1.2) in snow")["l"][0]
    weights = [t[1] for t in tokens if isinstance(t[0], torch.Tensor)]
    assert weights == pytest.approx([0.6, 0.6])


def test_strength_zero_and_trigger_free_prompts_reproduce_unpatched_outputs(setup):
    comfy, model, clip, concept, name = setup
    before = sample(comfy, model, clip)
    (m0, c0, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=0.0, strength_clip=0.0)
    assert torch.equal(sample(comfy, m0, c0, text="a photo of sks dog"), sample(comfy, model, clip, text="a photo of sks dog"))
    (m1, c1, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    patched = sample(comfy, m1, c1, text="a photo of sks dog")
    assert not torch.equal(patched, before)
    # the inputs behave bit-identically after the node ran and after the patched clones sampled
    assert torch.equal(sample(comfy, model, clip), before)


def test_loaders_chain_with_distinct_triggers_and_deltas_add(setup):
    comfy, model, clip, concept, name = setup
    other = random_concept(model, clip, trigger="zwx", class_noun="mug", seed=1)
    name2 = write_concept(other, "test_zwx_mug")
    (m1, c1, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    (m2, c2, ref2), _ = comfy.run_node("DCILoadConcept", model=m1, clip=c1, concept_name=name2,
                                       strength_model=1.0, strength_clip=1.0)
    base = base_kv_weights(model)
    patched = loaded_weights(m2)
    key = next(iter(base))
    torch.testing.assert_close(patched[key], base[key] + concept.kv_deltas[key] + other.kv_deltas[key], rtol=0, atol=1e-6)
    tokens = c2.tokenize("sks dog and zwx mug")["l"][0]
    vectors = [t[0] for t in tokens if isinstance(t[0], torch.Tensor)]
    assert torch.equal(vectors[0], concept.tokens["clip_l"][0]) and torch.equal(vectors[2], other.tokens["clip_l"][0])
    assert len(m1.patches[key]) == 1 and len(m2.patches[key]) == 2
    # the same trigger twice is refused
    with pytest.raises(ValueError, match="already used by another concept"):
        comfy.run_node("DCILoadConcept", model=m2, clip=c2, concept_name=name, strength_model=1.0, strength_clip=1.0)


def test_works_with_the_stock_ksampler_in_a_graph(comfy, tiny_checkpoint):
    model, clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    name = write_concept(random_concept(model, clip, trigger="qlx", class_noun="toy", k=1), "test_ckpt_toy")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": "DCILoadConcept", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concept_name": name,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a qlx toy on a table"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0],
                                                   "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    executor, history = comfy.run_graph(graph)
    assert executor.success, executor.status_messages[-1]
    assert history["outputs"]["8"]["images"]


def test_fingerprint_mismatch_is_a_warning(setup, caplog):
    comfy, model, clip, concept, name = setup
    concept.base_fingerprint = "ffffffffffffffff"
    name = write_concept(concept, "test_other_base")
    with caplog.at_level(logging.WARNING):
        comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name, strength_model=1.0, strength_clip=1.0)
    assert "other base weights" in caplog.text


def test_wrong_family_and_wrong_architecture_are_clear_errors(setup, tiny_checkpoint):
    comfy, model, clip, concept, name = setup
    concept.family = "sdxl"
    sdxl_name = write_concept(concept, "test_sdxl_family")
    with pytest.raises(ValueError, match=r"trained for SDXL but this MODEL is SD1\.x"):
        comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=sdxl_name, strength_model=1.0,
                       strength_clip=1.0)
    ck_model, ck_clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    with pytest.raises(ValueError, match="different architecture") as err:
        comfy.run_node("DCILoadConcept", model=ck_model, clip=ck_clip, concept_name=name, strength_model=1.0,
                       strength_clip=1.0)
    assert "kv14-ctx64" in str(err.value) and "kv8-ctx768" in str(err.value)


@pytest.mark.parametrize("concept_name, message", [
    ("../../etc/passwd", "not a path"),
    ("/etc/passwd", "not a path"),
    ("nope.safetensors", "was not found"),
    ("", "no concept file chosen"),
])
def test_bad_names(setup, concept_name, message):
    comfy, model, clip, _, _ = setup
    with pytest.raises(ValueError, match=message):
        comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=concept_name, strength_model=1.0,
                       strength_clip=1.0)


def test_bad_inputs(setup):
    comfy, model, clip, _, name = setup
    with pytest.raises(ValueError, match="'model' must be a MODEL"):
        comfy.run_node("DCILoadConcept", model=clip, clip=clip, concept_name=name, strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match="strength_model must be a number"):
        comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name, strength_model=float("nan"),
                       strength_clip=1.0)


def test_sd2_family_loads_its_concept_and_refuses_an_sd1_one(comfy, tiny_sd15):
    from dev.fixtures import tiny_sd2_in_memory

    model, clip, _ = tiny_sd2_in_memory()
    (text,), _ = comfy.run_node("DCIModelInfo", model=model, clip=clip)
    import json

    info = json.loads(text)
    assert info["family"] == "sd2" and info["text_encoders"] == ["h"]
    concept = random_concept(model, clip, trigger="sks", family="sd2")
    assert set(concept.tokens) == {"clip_h"}
    name = write_concept(concept, "test_sd2")
    (m2, c2, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                      strength_model=1.0, strength_clip=1.0)
    vectors = [t[0] for t in c2.tokenize("a sks dog")["h"][0] if isinstance(t[0], torch.Tensor)]
    assert len(vectors) == 2 and torch.equal(vectors[0], concept.tokens["clip_h"][0])
    assert ref.family == "sd2"
    sample(comfy, m2, c2, text="a sks dog", steps=2)
    sd1_name = write_concept(random_concept(*tiny_sd15[:2]), "test_sd1_on_sd2")
    with pytest.raises(ValueError, match=r"trained for SD1\.x but this MODEL is SD2\.x"):
        comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=sd1_name, strength_model=1.0,
                       strength_clip=1.0)
