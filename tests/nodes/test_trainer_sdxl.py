"""DCI Train Concept on the tiny in-memory SDXL: both text encoders' token rows and contexts, the training text
forward (context and pooled output) equal to CLIPTextEncode's, bit-exact resume, untouched inputs, and a
concept that DCI Load Concept loads and DCI KSampler samples."""

from __future__ import annotations

import copy

import pytest
import torch

from dci.comfyui.tokenizer import add_trigger, existing_triggers
from dci.comfyui.training.loop import train_concept
from dci.comfyui.training.settings import TrainSettings
from dci.comfyui.training.text_encoder import TextEncoders
from dci.files.concept import load_concept
from dci.method import ico
from dev.fixtures import concepts_folder

BASE = dict(class_noun="dog", trigger_word="qxz", num_tokens=2, mode="ico", prefix_context="photo of a",
            suffix_context=".", steps=2, batch_size=1, learning_rate=1e-4, context_lr_multiplier=10.0,
            resolution=64, seed=0, precision="fp32", gradient_checkpointing=False, overwrite=True, resume=False,
            checkpoint_every=0, random_flip=True)


@pytest.fixture()
def sdxl(comfy):
    from dev.fixtures import tiny_sdxl_in_memory

    with torch.inference_mode():
        model, clip, vae = tiny_sdxl_in_memory(seed=0)
    images = torch.rand(2, 64, 72, 3, generator=torch.Generator().manual_seed(4))
    return comfy, model, clip, vae, images


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def dci_ksampler(comfy, model, clip, ref, text="a photo of qxz dog on the beach"):
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=clip, text=text, auxiliary_noun="", concept=ref)
    (neg,), _ = comfy.run_node("CLIPTextEncode", clip=clip, text="blurry")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    (out,), _ = comfy.run_node("DCIKSampler", model=model, seed=3, steps=3, cfg=5.0, sampler_name="euler",
                               scheduler="normal", positive=pos, negative=neg, latent_image=lat, denoise=1.0,
                               split=0.5, lam=1.0, aux_map="reference", guidance="shared", aux_seed=1)
    return out["samples"]


def test_training_text_forward_reproduces_clip_text_encode_with_its_pooled_output(sdxl):
    comfy, model, clip, vae, images = sdxl
    text = TextEncoders(clip)
    assert text.keys == ("clip_l", "clip_g") and [p.width for p in text.parts] == [64, 96]
    rows = {k: r.detach() for k, r in text.vocabulary_rows(ico.RARE_TOKEN_WORDS[:2]).items()}
    prefix, suffix = text.word_entries("photo of a", "prefix"), text.word_entries(".", "suffix")
    dog = text.word_entries("dog", "class noun")
    with torch.inference_mode(False), torch.no_grad():
        text.prepare()
        captions = {p.key: [ico.caption_entries(p.special, p.embed([prefix[p.key]])[0], rows[p.key], dog[p.key],
                                                p.embed([suffix[p.key]])[0])] for p in text.parts}
        cond, pooled = text.encode(captions)
    assert captions["clip_g"][0][-1] == 0 and captions["clip_l"][0][-1] == 49407  # clip_g pads with id 0
    (enc,), _ = comfy.run_node("CLIPTextEncode", clip=add_trigger(clip, "qxz", rows), text="photo of a qxz dog.")
    assert cond.shape == (1, 77, 160) and pooled.shape == (1, 96)
    torch.testing.assert_close(cond, enc[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, enc[0][1]["pooled_output"], rtol=0, atol=1e-6)


def test_sdxl_concept_trains_both_encoders_leaves_the_inputs_untouched_and_samples_with_dci(sdxl):
    comfy, model, clip, vae, images = sdxl
    unet, te = snapshot(model.model), snapshot(clip.cond_stage_model)
    options = copy.deepcopy(model.model_options)
    (m, c, ref, curve), _ = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                           save_name="t_sdxl", **BASE)
    concept = load_concept(concepts_folder() / "t_sdxl.safetensors")
    assert concept.family == "sdxl" and ref.family == "sdxl" and concept.steps == 2
    assert {k: tuple(v.shape) for k, v in concept.tokens.items()} == {"clip_l": (2, 64), "clip_g": (2, 96)}
    assert {k: tuple(v.shape) for k, v in concept.contexts.items()} == {
        "clip_l.prefix": (2, 3, 64), "clip_g.prefix": (2, 3, 96), "clip_l.suffix": (2, 1, 64),
        "clip_g.suffix": (2, 1, 96)}
    for enc in ("clip_l", "clip_g"):
        assert not torch.equal(concept.tokens[enc], concept.token_init[enc]), enc
    assert all(d.abs().max() > 0 for d in concept.kv_deltas.values()) and concept.kv_deltas
    # inputs: same weights, no patches, same options, no trigger
    assert all(torch.equal(v, unet[k]) for k, v in model.model.state_dict().items())
    assert all(torch.equal(v, te[k]) for k, v in clip.cond_stage_model.state_dict().items())
    assert model.patches == {} and model.model_options == options and existing_triggers(clip) == []
    assert all(not getattr(mod, "weight_function", []) for mod in model.model.modules())
    # the trigger gives both encoders' trained rows; DCI KSampler samples the trained concept, and the file
    # loaded by DCI Load Concept samples identically to the trainer's outputs
    tok = c.tokenize("a qxz dog")
    for short, enc in (("l", "clip_l"), ("g", "clip_g")):
        vectors = [t[0] for t in tok[short][0] if isinstance(t[0], torch.Tensor)]
        assert len(vectors) == 2 and torch.equal(vectors[1], concept.tokens[enc][1]), enc
    trained = dci_ksampler(comfy, m, c, ref)
    (m2, c2, ref2), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=ref.name,
                                       strength_model=1.0, strength_clip=1.0)
    assert torch.isfinite(trained).all() and torch.equal(dci_ksampler(comfy, m2, c2, ref2), trained)


def _settings(**kw) -> TrainSettings:
    base = dict(class_noun="dog", trigger="qxz", num_tokens=2, steps=3, learning_rate=1e-4, resolution=64,
                checkpoint_every=0, reg_captions=["photo of a dog"])
    return TrainSettings(**{**base, **kw})


def test_sdxl_resume_after_an_interrupt_is_bit_exact_with_regularisation_images(sdxl):
    """Regularisation images take the other path of the size conditioning (their pooled output is encoded
    once); an interrupted run resumed gives exactly the uninterrupted run's losses and tensors."""
    import comfy.model_management as mm

    comfy, model, clip, vae, images = sdxl
    reg = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(9))

    def run(name, settings, resume=False, on_step=None):
        with torch.inference_mode():
            return train_concept(model, clip, vae, images, settings, concepts_folder(), name, overwrite=not resume,
                                 resume=resume, reg_images=reg, on_step=on_step)

    full = run("t_sdxl_full", _settings(gradient_checkpointing=True))

    def stop(step, total, loss):
        if step == 1:
            mm.interrupt_current_processing(True)

    with pytest.raises(mm.InterruptProcessingException):
        run("t_sdxl_resume", _settings(), on_step=stop)
    assert load_concept(concepts_folder() / "t_sdxl_resume.safetensors").steps == 1
    resumed = run("t_sdxl_resume", _settings(), resume=True)
    assert resumed.losses == full.losses and resumed.steps_done == 3
    for part in ("kv_deltas", "tokens", "contexts"):
        a, b = getattr(full.concept, part), getattr(resumed.concept, part)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part


def test_sdxl_custom_diffusion_and_infusion_train_with_previews_and_load(sdxl):
    comfy, model, clip, vae, images = sdxl
    for mode in ("custom_diffusion", "infusion"):
        (m, c, ref, curve), ui = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                                save_name=f"t_sdxl_{mode}", **{**BASE, "mode": mode, "steps": 1},
                                                preview_every=1)
        assert [i["filename"] for i in ui["images"]] == ["preview_step000001.png", "loss_curve.png"]
        concept = load_concept(concepts_folder() / f"t_sdxl_{mode}.safetensors")
        assert concept.method == mode and set(concept.tokens) == {"clip_l", "clip_g"} and concept.contexts == {}
        assert bool(concept.residuals) == (mode == "infusion") and bool(concept.kv_deltas) == (mode != "infusion")
        assert torch.isfinite(dci_ksampler(comfy, m, c, ref)).all()


def test_sdxl_joint_training_of_two_concepts(sdxl):
    comfy, model, clip, vae, images = sdxl
    cats = [torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(8))]
    (more,), _ = comfy.run_node_lists("DCIConceptDataset", images=cats, class_noun=["cat"], trigger_word=["zwv"])
    (m, c, ref, curve), _ = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                           save_name="t_sdxl_joint", more_concepts=more[0], **BASE)
    concept = load_concept(concepts_folder() / "t_sdxl_joint.safetensors")
    assert [(x.trigger, sorted(x.tokens)) for x in concept.more] == [("zwv", ["clip_g", "clip_l"])]
    assert concept.contexts["clip_g.prefix"].shape == (3, 3, 96) and existing_triggers(c) == ["qxz", "zwv"]
    cat = [t[0] for t in c.tokenize("a zwv cat")["g"][0] if isinstance(t[0], torch.Tensor)]
    assert torch.equal(cat[0], concept.more[0].tokens["clip_g"][0])
