"""DCI Train Concept in-process on the tiny in-memory SD1.5: what trains, what stays untouched, that the
training text forward is CLIPTextEncode's, that ICO and Custom Diffusion differ only in the captions, that
resume (also after an interrupt) is bit-exact, and that bad inputs fail before anything is written."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from dci.comfyui.concept import kv_weight_keys
from dci.comfyui.model import cross_attention_layers
from dci.comfyui.tokenizer import add_trigger, existing_triggers
from dci.comfyui.training.loop import train_concept
from dci.comfyui.training.settings import TrainingError, TrainSettings
from dci.comfyui.training.text_encoder import TextEncoder
from dci.files.concept import TRAIN_STATE_SUFFIX, load_concept
from dci.method import ico
from dev.fixtures import concepts_folder, random_concept, write_concept

BASE = dict(class_noun="dog", trigger_word="qxz", num_tokens=2, mode="ico", prefix_context="photo of a",
            suffix_context=".", steps=2, batch_size=1, learning_rate=1e-4, context_lr_multiplier=10.0,
            resolution=64, seed=0, precision="fp32", gradient_checkpointing=False, overwrite=True, resume=False,
            checkpoint_every=0, random_flip=True)


@pytest.fixture()
def setup(comfy, tiny_sd15_loaded):
    """MODEL, CLIP, VAE built under inference mode, as a loader node would build them."""
    model, clip, vae = tiny_sd15_loaded
    images = torch.rand(2, 64, 80, 3, generator=torch.Generator().manual_seed(1))
    return comfy, model, clip, vae, images


def train(comfy, model, clip, vae, images, name, **overrides):
    inputs = {**BASE, **overrides}
    (m, c, ref, curve), _ = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                           save_name=name, **inputs)
    return m, c, ref, curve, load_concept(concepts_folder() / f"{name}.safetensors")


def direct(model, clip, vae, images, name, on_step=None, **overrides):
    """train_concept as the node calls it (under inference mode), for the loss history."""
    inputs = {**BASE, **overrides}
    settings = TrainSettings(
        class_noun=inputs["class_noun"], trigger=inputs["trigger_word"], num_tokens=inputs["num_tokens"],
        mode=inputs["mode"], prefix=inputs["prefix_context"], suffix=inputs["suffix_context"], steps=inputs["steps"],
        batch_size=inputs["batch_size"], learning_rate=inputs["learning_rate"], resolution=inputs["resolution"],
        seed=inputs["seed"], random_flip=inputs["random_flip"], checkpoint_every=inputs["checkpoint_every"],
        gradient_checkpointing=inputs["gradient_checkpointing"], precision=inputs["precision"])
    with torch.inference_mode():
        return train_concept(model, clip, vae, images, settings, concepts_folder(), name,
                                            overwrite=inputs["overwrite"], resume=inputs["resume"], on_step=on_step)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def sample(comfy, model, clip, text="a photo of a qxz dog"):
    pos = comfy.run_node("CLIPTextEncode", clip=clip, text=text)[0][0]
    neg = comfy.run_node("CLIPTextEncode", clip=clip, text="")[0][0]
    (latent,) = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    (out,), _ = comfy.run_node("KSampler", model=model, seed=3, steps=2, cfg=5.0, sampler_name="euler",
                               scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    return out["samples"]


def test_trains_exactly_kv_tokens_and_contexts_and_leaves_the_inputs_untouched(setup):
    comfy, model, clip, vae, images = setup
    before = sample(comfy, model, clip)
    unet, te, ae = (snapshot(model.model), snapshot(clip.cond_stage_model), snapshot(vae.first_stage_model))
    options = copy.deepcopy(model.model_options)
    m, c, ref, curve, concept = train(comfy, model, clip, vae, images, "t_what_trains")

    kv_keys = set(kv_weight_keys(model))
    assert set(concept.kv_deltas) == kv_keys and len(kv_keys) == 2 * len(cross_attention_layers(model))
    assert all(d.abs().max() > 0 for d in concept.kv_deltas.values())
    assert not torch.equal(concept.tokens["clip_l"], concept.token_init["clip_l"])
    assert concept.contexts["clip_l.prefix"].shape == (2, 3, 64)  # "photo of a": 3 BPE tokens per image
    assert concept.contexts["clip_l.suffix"].shape == (2, 1, 64)
    assert (ref.trigger, ref.class_noun, ref.family, ref.num_tokens) == ("qxz", "dog", "sd1", 2)
    assert concept.method == "ico" and concept.steps == 2 and curve.shape[0] == 1 and curve.shape[-1] == 3
    # the output MODEL patches the K/V weights only, with exactly the saved deltas
    assert set(m.patches) == kv_keys
    # the inputs: same weights, no patches, same options, bit-identical sampling
    assert all(torch.equal(v, unet[k]) for k, v in model.model.state_dict().items())
    assert all(torch.equal(v, te[k]) for k, v in clip.cond_stage_model.state_dict().items())
    assert all(torch.equal(v, ae[k]) for k, v in vae.first_stage_model.state_dict().items())
    assert model.patches == {} and model.model_options == options and model.weight_wrapper_patches == {}
    assert existing_triggers(clip) == [] and existing_triggers(c) == ["qxz"]
    assert all(not getattr(mod, "weight_function", []) for mod in model.model.modules())
    assert torch.equal(sample(comfy, model, clip), before)
    trained = sample(comfy, m, c)
    assert not torch.equal(trained, before)
    # the outputs behave exactly like the saved file loaded by DCI Load Concept
    (m2, c2, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=ref.name,
                                    strength_model=1.0, strength_clip=1.0)
    assert torch.equal(sample(comfy, m2, c2), trained)


def test_training_text_forward_reproduces_clip_text_encode(setup):
    """The caption assembled in token space and run by the trainer = CLIPTextEncode of the same words."""
    comfy, model, clip, vae, images = setup
    text = TextEncoder(clip)
    rows = text.vocabulary_rows(ico.RARE_TOKEN_WORDS[:2]).detach()
    prefix = text.word_entries("photo of a", "prefix")
    suffix = text.word_entries(".", "suffix")
    dog = text.word_entries("dog", "class noun")
    assert len(prefix) == 3 and len(suffix) == 1
    with torch.inference_mode(False), torch.no_grad():
        text.prepare()
        ours = text.encode(text.embed([ico.caption_entries(text.special, text.embed([prefix])[0], rows, dog,
                                                           text.embed([suffix])[0])]))
    patched = add_trigger(clip, "qxz", {"clip_l": rows})
    (cond,), _ = comfy.run_node("CLIPTextEncode", clip=patched, text="photo of a qxz dog.")
    torch.testing.assert_close(ours, cond[0][0], rtol=0, atol=1e-6)


def test_ico_and_custom_diffusion_differ_only_in_the_captions(setup):
    """With an ICO prefix that starts as 'photo of a' and no suffix, step 1 sees identical captions."""
    comfy, model, clip, vae, images = setup
    a = direct(model, clip, vae, images, "t_mode_ico", steps=1, suffix_context="")
    b = direct(model, clip, vae, images, "t_mode_cd", steps=1, mode="custom_diffusion")
    assert a.losses == b.losses
    assert b.concept.contexts == {} and b.concept.method == "custom_diffusion"
    assert set(a.concept.contexts) == {"clip_l.prefix"}
    assert all(torch.equal(a.concept.kv_deltas[k], b.concept.kv_deltas[k]) for k in a.concept.kv_deltas)


def test_custom_diffusion_takes_its_caption_words_from_prefix_and_suffix_context(setup):
    """custom_diffusion's fixed caption is '<prefix_context> <trigger> <class> <suffix_context>' ("photo of a" and
    no suffix by default, as before): with "a" … "on a white background" it sees at step 1 what an ICO context
    starting from the same words sees, not what the default caption sees; the default suffix "." adds nothing; an
    ICO context length (a number) is refused with the reason, in either place."""
    comfy, model, clip, vae, images = setup
    scene = "on a white background"
    ico_a = direct(model, clip, vae, images, "t_pre_ico", steps=1, prefix_context="a", suffix_context=scene)
    cd_a = direct(model, clip, vae, images, "t_pre_cd", steps=1, mode="custom_diffusion", prefix_context="a",
                  suffix_context=scene)
    cd_default = direct(model, clip, vae, images, "t_pre_cd0", steps=1, mode="custom_diffusion")
    cd_no_suffix = direct(model, clip, vae, images, "t_pre_cd1", steps=1, mode="custom_diffusion", suffix_context="")
    assert cd_a.losses == ico_a.losses and cd_a.losses != cd_default.losses
    assert cd_default.losses == cd_no_suffix.losses
    with pytest.raises(TrainingError, match="prefix_context must be words"):
        direct(model, clip, vae, images, "t_pre_n", steps=1, mode="custom_diffusion", prefix_context="4")
    with pytest.raises(TrainingError, match="suffix_context must be words"):
        direct(model, clip, vae, images, "t_suf_n", steps=1, mode="infusion", suffix_context="3")


def test_loss_falls_when_overfitting_one_image(setup):
    """Same seed, same draws per step: training at a real rate ends below training at a negligible one."""
    comfy, model, clip, vae, images = setup
    kw = dict(steps=24, random_flip=False, mode="custom_diffusion")
    still = direct(model, clip, vae, images[:1], "t_fit_still", learning_rate=1e-8, **kw)
    fit = direct(model, clip, vae, images[:1], "t_fit", learning_rate=1e-2, **kw)
    assert fit.losses[0] == still.losses[0]
    assert sum(fit.losses[-4:]) < 0.95 * sum(still.losses[-4:])
    assert sum(a < b for a, b in zip(fit.losses[8:], still.losses[8:], strict=True)) >= 12


def test_resume_after_an_interrupt_or_a_crash_is_bit_exact(setup):
    import comfy.model_management as mm

    comfy, model, clip, vae, images = setup
    # the uninterrupted run recomputes activations (gradient checkpointing): that must not change a bit either
    full = direct(model, clip, vae, images, "t_full", steps=3, gradient_checkpointing=True)

    def stop_at(n, exc):
        def on_step(step, total, loss):
            if step == n:
                if exc is None:
                    mm.interrupt_current_processing(True)  # what POST /interrupt does
                else:
                    raise exc
        return on_step

    with pytest.raises(mm.InterruptProcessingException):
        direct(model, clip, vae, images, "t_interrupted", steps=3, on_step=stop_at(1, None))
    # a crash (here: an error raised during step 3) leaves the periodic checkpoint of step 2
    with pytest.raises(RuntimeError, match="power cut"):
        direct(model, clip, vae, images, "t_crashed", steps=3, checkpoint_every=1,
               on_step=stop_at(3, RuntimeError("power cut")))
    for name, at in (("t_interrupted", 1), ("t_crashed", 2)):
        assert load_concept(concepts_folder() / f"{name}.safetensors").steps == at
        assert (concepts_folder() / f"{name}{TRAIN_STATE_SUFFIX}").is_file()
        resumed = direct(model, clip, vae, images, name, steps=3, resume=True, overwrite=False)
        assert resumed.losses == full.losses and resumed.steps_done == 3
        for part in ("kv_deltas", "tokens", "contexts"):
            a, b = getattr(full.concept, part), getattr(resumed.concept, part)
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), (name, part)
    # other settings can't resume it
    with pytest.raises(TrainingError, match="seed"):
        direct(model, clip, vae, images, "t_crashed", steps=6, resume=True, seed=1)


def test_regularisation_images_and_bf16(setup):
    comfy, model, clip, vae, images = setup
    reg = torch.rand(2, 48, 48, 3)
    m, c, ref, curve, concept = train(comfy, model, clip, vae, images, "t_reg", steps=1, reg_images=reg,
                                      reg_captions="photo of a dog\nphoto of a dog on grass", precision="bf16")
    assert concept.training["reg_images"] == 2 and concept.training["precision"] == "bf16"
    with pytest.raises(ValueError, match="one caption for all or one per image"):
        train(comfy, model, clip, vae, images, "t_reg_bad", reg_images=reg, reg_captions="a\nb\nc")


def _no_file(name: str) -> bool:
    return not (concepts_folder() / f"{name}.safetensors").exists() and not (
        concepts_folder() / f"{name}{TRAIN_STATE_SUFFIX}").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"images": torch.zeros(0, 64, 64, 3)}, "no concept images"),
        ({"steps": 0}, "steps must be a whole number from 1"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"class_noun": "  "}, "class noun is empty"),
        ({"trigger_word": "two words"}, "trigger word"),
        ({"prefix_context": "word " * 80}, "too long"),
        ({"resume": True}, "nothing to resume"),
    ],
)
def test_bad_inputs_fail_before_anything_is_written(setup, overrides, message):
    comfy, model, clip, vae, images = setup
    overrides = {"images": images, **overrides}
    with pytest.raises(ValueError, match=message):
        comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, save_name="t_bad",
                       **{**BASE, **overrides})
    assert _no_file("t_bad")


def test_unknown_family_and_a_clip_of_another_model_are_refused(setup):
    from comfy.model_patcher import ModelPatcher

    comfy, model, clip, vae, images = setup
    for config_name, message in (("Flux", "supports SD1.x"), ("SDXL", "needs the SDXL CLIP")):
        fake = copy.copy(model.model)
        fake.model_config = type(config_name, (), {})()
        other = ModelPatcher(fake, model.load_device, model.offload_device)
        with pytest.raises(ValueError, match=message):
            train(comfy, other, clip, vae, images, "t_family")
    assert _no_file("t_family")


def test_trigger_collision_and_existing_file_are_refused(setup, caplog):
    comfy, model, clip, vae, images = setup
    name = write_concept(random_concept(model, clip, trigger="qxz"), "t_other_qxz")
    (_, taken, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                      strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match="already used by another concept"):
        train(comfy, model, taken, vae, images, "t_collision")
    assert _no_file("t_collision")
    with caplog.at_level(logging.WARNING):
        train(comfy, model, clip, vae, images, "t_exists", trigger_word="sks", steps=1)
    assert "existing word" in caplog.text  # 'sks' is a word of CLIP's vocabulary: a warning, not an error
    with pytest.raises(ValueError, match="already exists"):
        train(comfy, model, clip, vae, images, "t_exists", overwrite=False)


def test_nan_loss_stops_with_a_clear_error_and_writes_nothing(setup):
    comfy, model, clip, vae, images = setup
    layer = kv_weight_keys(model)[0].replace("to_k.weight", "to_out.0.weight")
    with torch.inference_mode():
        dict(model.model.named_parameters())[layer].fill_(float("nan"))
    with pytest.raises(ValueError, match="loss became nan at step 1"):
        train(comfy, model, clip, vae, images, "t_nan")
    assert _no_file("t_nan")


def test_sd2_family_trains_clip_h_tokens_and_contexts(comfy):
    """SD2.x: the text encoder is ComfyUI's clip_h; tokens and contexts are trained and saved for it, and the
    trained concept loads back through DCI Load Concept."""
    from dev.fixtures import tiny_sd2_in_memory

    with torch.inference_mode():
        model, clip, vae = tiny_sd2_in_memory(seed=0)
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    (m, c, ref, curve), _ = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                           save_name="t_sd2", **BASE)
    concept = load_concept(concepts_folder() / "t_sd2.safetensors")
    assert concept.family == "sd2" and set(concept.tokens) == {"clip_h"}
    assert set(concept.contexts) == {"clip_h.prefix", "clip_h.suffix"}
    assert concept.steps == 2 and ref.family == "sd2"
    vectors = [t[0] for t in c.tokenize("a qxz dog")["h"][0] if isinstance(t[0], torch.Tensor)]
    assert len(vectors) == 2 and torch.equal(vectors[0], concept.tokens["clip_h"][0])


def test_an_image_list_of_mixed_sizes_trains_like_the_squared_batch(setup):
    """Load Image Dataset from Folder gives one IMAGE per file, of any size: the node squares each and trains
    exactly as on the batch of the squared images; a list where one value is expected is refused."""
    comfy, model, clip, vae, _ = setup
    g = torch.Generator().manual_seed(5)
    items = [torch.rand(1, 64, 80, 3, generator=g), torch.rand(1, 96, 72, 3, generator=g)]
    batch = torch.cat([ico.square_images(x, 64) for x in items])
    inputs = {**BASE, "random_flip": False, "model": model, "clip": clip, "vae": vae}
    listed, _ = comfy.run_node_lists("DCITrainConcept", images=items, save_name=["t_list"],
                                     **{k: [v] for k, v in inputs.items()})
    batched = train(comfy, model, clip, vae, batch, "t_batch", random_flip=False)[4]
    a, b = load_concept(concepts_folder() / "t_list.safetensors"), batched
    for part in ("kv_deltas", "tokens", "contexts"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys() and x
        assert all(torch.equal(x[k], y[k]) for k in x), part
    assert listed[0][0] is not model
    with pytest.raises(Exception, match="only the images may be lists"):
        comfy.run_node_lists("DCITrainConcept", images=items, save_name=["x", "y"],
                             **{k: [v] for k, v in inputs.items()})


def test_base_weights_that_ask_for_gradients_stay_frozen_and_untouched(comfy):
    """Weights built outside inference mode keep nn.Module's requires_grad=True (on a CUDA device ComfyUI left
    the UNet's weights like that): training must freeze them, give them no gradients and leave them equal."""
    from dev.fixtures import tiny_sd15_in_memory

    model, clip, vae = tiny_sd15_in_memory(seed=0)
    modules = (model.model, clip.cond_stage_model)
    assert all(p.requires_grad and not p.is_inference() for p in model.model.parameters())
    before = [snapshot(m) for m in modules]
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    train(comfy, model, clip, vae, images, "t_grad_weights")
    for m, snap in zip(modules, before, strict=True):
        params = list(m.parameters())
        assert all(p.grad is None and not p.requires_grad for p in params)
        assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())
