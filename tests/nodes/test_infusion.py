"""Infusion concepts: the residual patch's closed form, bit-identical trigger-free prompts, clones only, and the
trainer's infusion mode (only the residual vectors train)."""

from __future__ import annotations

import pytest
import torch

from dci.comfyui.model import cross_attention_layers
from dci.files.concept import load_concept
from dev.fixtures import concepts_folder, write_concept
from dev.fixtures import random_infusion_concept as infusion_concept
from dev.foreign_files import sample


@pytest.fixture()
def loaded(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    concept = infusion_concept(model, clip)
    name = write_concept(concept, "test_infusion")
    options_before = repr(model.model_options)
    text_model_before, tokenizer_before = clip.cond_stage_model, clip.tokenizer
    (m2, c2, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                      strength_model=1.0, strength_clip=1.0)
    assert repr(model.model_options) == options_before  # the input MODEL carries no patch
    assert clip.cond_stage_model is text_model_before and clip.tokenizer is tokenizer_before
    return comfy, model, clip, m2, c2, concept


def test_file_round_trip_keeps_the_residuals(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    concept = infusion_concept(model, clip, keys=True)
    back = load_concept(concepts_folder() / write_concept(concept, "test_infusion_rt"))
    assert back.residuals.keys() == concept.residuals.keys() and not back.kv_deltas
    assert all(torch.equal(back.residuals[k], v) for k, v in concept.residuals.items())
    assert back.architecture.startswith("res")


def test_prompt_without_the_trigger_is_bit_identical_and_with_it_differs(loaded):
    comfy, model, clip, m2, c2, _ = loaded
    for text in ("a photo of a dog", "sksx dog on grass"):
        assert torch.equal(sample(comfy, m2, c2, text), sample(comfy, model, clip, text)), text
    # the stock MODEL with the concept's CLIP: only the trigger's embeddings differ, not the UNet
    with_trigger = sample(comfy, m2, c2, "a photo of sks dog")
    assert not torch.equal(with_trigger, sample(comfy, model, c2, "a photo of sks dog"))
    # and the input MODEL/CLIP still sample as before
    assert torch.equal(sample(comfy, model, clip, "a photo of sks dog"), sample(comfy, model, clip, "a photo of sks dog"))


def test_the_injection_is_base_plus_attention_times_residual(comfy, tiny_sd15):
    """Through the real patch: out = base out + A[:, j] · r per head, A the softmax attention to token j."""
    from dci.comfyui.infusion import InfusionPatch, Marks
    from dci.comfyui.seams import CONTEXT_KEY

    g = torch.Generator().manual_seed(0)
    b, n, t, heads, dh, ctx_dim = 2, 5, 7, 2, 4, 6
    q, k, v = (torch.randn(b, s, heads * dh, generator=g) for s in (n, t, t))
    context = torch.randn(b, t, ctx_dim, generator=g)
    r = torch.randn(heads * dh, generator=g)
    marks = Marks()
    marks.add(context[1, 3:4])  # token 3 of row 1 is the trigger
    patch = InfusionPatch(marks, r, None, 0.5)
    opts = {"n_heads": heads, "dim_head": dh, CONTEXT_KEY: (context, context)}
    out = patch(q, k, v, opts)

    def attention(qq, kk, vv):
        qh, kh, vh = (x.view(b, -1, heads, dh).transpose(1, 2) for x in (qq, kk, vv))
        a = torch.softmax(qh @ kh.transpose(-1, -2) / dh**0.5, dim=-1)
        return (a @ vh).transpose(1, 2).reshape(b, -1, heads * dh), a

    base, a = attention(q, k, v)
    expected = base.clone()
    expected[1] += (a[1, :, :, 3].unsqueeze(-1) * 0.5 * r.view(heads, 1, dh)).transpose(0, 1).reshape(n, heads * dh)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0], patch(q, k, v, {"n_heads": heads, "dim_head": dh})[0])  # row 0 untouched


def test_wrong_architecture_is_refused(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    concept = infusion_concept(model, clip)
    key = next(iter(concept.residuals))
    concept.residuals[key] = torch.zeros(3)
    name = write_concept(concept, "test_infusion_bad")
    with pytest.raises(ValueError, match="different architecture"):
        comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name, strength_model=1.0,
                       strength_clip=1.0)


def test_model_clones_made_before_encoding_share_the_marks(loaded):
    """ModelPatcher.clone deep-copies model_options; a clone made before any prompt is encoded still sees the
    trigger's rows recorded later."""
    comfy, model, clip, m2, c2, _ = loaded
    early = m2.clone()
    (lora_like,), _ = comfy.run_node("ModelSamplingDiscrete", model=m2, sampling="eps", zsnr=False)
    a = sample(comfy, early, c2, "a photo of sks dog on grass")
    assert torch.equal(a, sample(comfy, m2, c2, "a photo of sks dog on grass"))
    assert not torch.equal(a, sample(comfy, model, c2, "a photo of sks dog on grass"))
    assert torch.equal(sample(comfy, lora_like, c2, "a photo of sks dog"), sample(comfy, m2, c2, "a photo of sks dog"))


def test_chained_clip_clones_keep_marking(loaded):
    comfy, model, clip, m2, c2, _ = loaded
    (c3,), _ = comfy.run_node("CLIPSetLastLayer", clip=c2, stop_at_clip_layer=-1)
    a = sample(comfy, m2, c3, "a photo of sks dog")
    assert torch.equal(a, sample(comfy, m2, c2, "a photo of sks dog"))


TRAIN = dict(class_noun="dog", trigger_word="qxz", num_tokens=1, mode="infusion", prefix_context="photo of a",
             suffix_context=".", steps=3, batch_size=1, learning_rate=1e-5, context_lr_multiplier=10.0,
             resolution=64, seed=0, precision="fp32", gradient_checkpointing=False, overwrite=True, resume=False,
             checkpoint_every=0, random_flip=True)


def train(comfy, model, clip, vae, name, **overrides):
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    (m, c, ref, curve), _ = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                           save_name=name, **{**TRAIN, **overrides})
    return m, c, load_concept(concepts_folder() / f"{name}.safetensors")


@pytest.mark.parametrize("unlock", [False, True])
def test_infusion_training_trains_only_the_residual_vectors(comfy, tiny_sd15, unlock):
    model, clip, vae = tiny_sd15
    m, c, concept = train(comfy, model, clip, vae, f"test_infusion_train_{unlock}", unlock_keys=unlock)
    layers = cross_attention_layers(model)
    assert concept.method == "infusion" and not concept.kv_deltas and not concept.contexts
    assert len(concept.residuals) == len(layers) * (2 if unlock else 1)
    assert any(k.endswith(".to_k") for k in concept.residuals) == unlock
    count = sum(v.numel() for v in concept.residuals.values())
    assert count == sum(layer.inner_dim for layer in layers) * (2 if unlock else 1)
    assert concept.training["trainable_values"] == count
    assert all(float(v.abs().max()) > 0 for v in concept.residuals.values())  # every vector moved from zero
    assert torch.equal(concept.tokens["clip_l"], concept.token_init["clip_l"])  # the trigger's rows stay fixed
    # the trained MODEL/CLIP: without the trigger exactly the base model, with it not
    assert torch.equal(sample(comfy, m, c, "a photo of a dog"), sample(comfy, model, clip, "a photo of a dog"))
    assert not torch.equal(sample(comfy, m, c, "a photo of qxz dog"), sample(comfy, model, c, "a photo of qxz dog"))


def test_infusion_training_resumes_bit_for_bit(comfy, tiny_sd15):
    model, clip, vae = tiny_sd15
    _, _, full = train(comfy, model, clip, vae, "test_infusion_full", steps=4)
    train(comfy, model, clip, vae, "test_infusion_part", steps=2, checkpoint_every=0)
    _, _, resumed = train(comfy, model, clip, vae, "test_infusion_part", steps=4, resume=True, overwrite=False)
    assert all(torch.equal(full.residuals[k], resumed.residuals[k]) for k in full.residuals)


def test_sd15_geometry_trainable_value_count(comfy):
    """SD1.5's UNet (the SD15 entry of ComfyUI's comfy.model_detection.unet_config_from_diffusers_unet, built on
    the meta device): the attn2 value projections'
    output widths add up to 12,480 values per concept (24,960 with unlocked keys)."""
    import types

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    sd15 = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
            "use_temporal_resblock": False}
    unet = UNetModel(**sd15, device="meta", operations=comfy.ops.disable_weight_init)
    layers = cross_attention_layers(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet)))
    assert len(layers) == 16
    assert sum(layer.inner_dim for layer in layers) == 12480


def test_exporting_an_infusion_concept_is_refused_clearly(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    name = write_concept(infusion_concept(model, clip), "test_infusion_export")
    with pytest.raises(ValueError, match="Infusion concept.*DCI Load Concept"):
        comfy.run_node("DCIExportConcept", model=model, concept_name=name, target="comfy_lora_and_embedding",
                       name="", overwrite=False, precision="exact")


def _official_vectors(model, keys: bool = False, seed: int = 3) -> dict[str, torch.Tensor]:
    """What the official Infusion training saves under 'target_output': ldm block keys + '.target_output'."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in cross_attention_layers(model):
        block = layer.weight_prefix.removeprefix("diffusion_model.").rstrip(".")
        out[f"{block}.to_v.target_output"] = torch.randn(layer.inner_dim, generator=g)
        if keys:
            out[f"{block}.to_k.target_output"] = torch.randn(layer.inner_dim, generator=g)
    return out


@pytest.mark.parametrize("form", ["safetensors", "ckpt_dict"])
def test_official_infusion_vectors_import(comfy, tiny_sd15, form):
    from safetensors.torch import save_file

    from dev.foreign_files import do_import, fresh_source

    model, clip, _ = tiny_sd15
    vectors = _official_vectors(model, keys=True)
    folder = fresh_source("infusion")
    if form == "safetensors":
        path = folder / "infusion_vectors.safetensors"
        save_file(vectors, str(path))
    else:  # a checkpoint dictionary that weights_only loading accepts
        path = folder / "step=1500.ckpt"
        torch.save({"global_step": 1500, "target_output": vectors}, path)
    m, c, ref, _ = do_import(comfy, model, clip, path, format="auto", trigger="qxz", class_noun="cat")
    concept = load_concept(concepts_folder() / ref.name)
    assert concept.method == "infusion (imported)" and not concept.kv_deltas
    for key, vec in vectors.items():
        ours = "diffusion_model." + key.removesuffix(".target_output")
        assert torch.equal(concept.residuals[ours], vec)
    assert torch.equal(sample(comfy, m, c, "a photo of a cat"), sample(comfy, model, clip, "a photo of a cat"))
    assert not torch.equal(sample(comfy, m, c, "a photo of qxz cat"), sample(comfy, model, c, "a photo of qxz cat"))


def test_an_official_infusion_checkpoint_is_refused_with_the_way_out(comfy, tiny_sd15):
    """The official checkpoint pickles an nn.ParameterDict, which torch.load(weights_only=True) refuses."""
    from dev.foreign_files import do_import, fresh_source

    model, clip, _ = tiny_sd15
    path = fresh_source("infusion_official") / "step=1500.ckpt"
    embedding = {"initializer_words": ["cat"], "string_to_token": {"*": 265},
                 "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 768))})}
    torch.save({"global_step": 1500, "embedding": embedding, "target_output": _official_vectors(model)}, path)
    with pytest.raises(ValueError, match="official Infusion checkpoint.*save_file"):
        do_import(comfy, model, clip, path, format="infusion", trigger="qxz", class_noun="cat")


def test_foreground_mask_weights_the_loss(comfy, tiny_sd15):
    """A mask of ones trains exactly as no mask; a half mask changes what is learned; bad masks are refused."""
    model, clip, vae = tiny_sd15
    _, _, plain = train(comfy, model, clip, vae, "test_infusion_nomask")
    _, _, ones = train(comfy, model, clip, vae, "test_infusion_ones", mask=torch.ones(1, 64, 64))
    half = torch.zeros(2, 64, 64)
    half[:, :, :32] = 1.0
    _, _, halved = train(comfy, model, clip, vae, "test_infusion_half", mask=half)
    assert all(torch.equal(plain.residuals[k], ones.residuals[k]) for k in plain.residuals)
    assert not all(torch.equal(plain.residuals[k], halved.residuals[k]) for k in plain.residuals)
    assert halved.training["masked_loss"] is True
    with pytest.raises(ValueError, match="a mask is empty"):
        train(comfy, model, clip, vae, "test_infusion_bad", mask=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="one MASK for all concept images or one per image"):
        train(comfy, model, clip, vae, "test_infusion_bad", mask=torch.ones(3, 64, 64))


def test_infusion_trains_on_sd2(comfy):
    from dev.fixtures import tiny_sd2_in_memory

    with torch.inference_mode():
        model, clip, vae = tiny_sd2_in_memory(seed=0)
    m, c, concept = train(comfy, model, clip, vae, "test_infusion_sd2")
    assert concept.family == "sd2" and set(concept.tokens) == {"clip_h"} and concept.residuals
    assert torch.equal(sample(comfy, m, c, "a photo of a dog"), sample(comfy, model, clip, "a photo of a dog"))
    assert not torch.equal(sample(comfy, m, c, "a photo of qxz dog"), sample(comfy, model, c, "a photo of qxz dog"))


def test_concatenated_conditioning_keeps_the_trigger_rows(loaded):
    comfy, model, clip, m2, c2, _ = loaded
    (a,), _ = comfy.run_node("CLIPTextEncode", clip=c2, text="a photo of sks dog")
    (b,), _ = comfy.run_node("CLIPTextEncode", clip=c2, text="on grass")
    (cat,), _ = comfy.run_node("ConditioningConcat", conditioning_to=b, conditioning_from=a)
    neg = comfy.run_node("CLIPTextEncode", clip=c2, text="")[0][0]
    (latent,) = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]

    def run(model_):
        (out,), _ = comfy.run_node("KSampler", model=model_, seed=3, steps=3, cfg=5.0, sampler_name="euler",
                                   scheduler="normal", positive=cat, negative=neg, latent_image=latent, denoise=1.0)
        return out["samples"]

    assert not torch.equal(run(m2), run(model))  # the trigger's rows, now at 77 + j, still get the residual
