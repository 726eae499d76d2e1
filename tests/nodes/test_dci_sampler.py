"""DCI Prompt Encode, DCI KSampler and DCI Guider in-process on tiny models."""

from __future__ import annotations

import pytest
import torch

from dci.comfyui.concept import base_kv_weights
from dci.comfyui.model import cross_attention_layers
from dci.comfyui.sampling import attention, wrapper
from dci.comfyui.sampling.guider import build_guider
from dci.method.branches import DCIPlan
from dci.method.dbim import DBIMSettings
from dev.fixtures import FixedBlend, dci_sample, random_concept, write_concept

PROMPT = "a photo of sks dog on the beach"


def dci_inputs(comfy, model, clip, family="sd1", batch=1, text=PROMPT, aux=""):
    name = write_concept(random_concept(model, clip, family=family), f"dci_{family}")
    (m, c, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=text, auxiliary_noun=aux, concept=ref)
    (neg,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="blurry")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=batch)
    return m, c, pos, neg, lat


def ksampler_args(m, pos, neg, lat, sampler="euler", scheduler="normal", steps=6, cfg=5.0, seed=7, denoise=1.0):
    return dict(model=m, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, positive=pos,
                negative=neg, latent_image=lat, denoise=denoise)


def dci(comfy, args, split=0.3, lam=0.0, aux_map="reference", guidance="shared", aux_seed=1, **advanced):
    (out,), _ = comfy.run_node("DCIKSampler", **args, split=split, lam=lam, aux_map=aux_map, guidance=guidance,
                               aux_seed=aux_seed, **advanced)
    return out["samples"]


def stock(comfy, args):
    (out,), _ = comfy.run_node("KSampler", **args)
    return out["samples"]


@pytest.mark.parametrize("sampler, scheduler", [
    ("euler", "normal"), ("euler_ancestral", "karras"), ("dpmpp_2m", "karras"), ("dpmpp_sde", "normal"),
    ("ddim", "ddim_uniform"), ("heun", "simple"), ("uni_pc", "sgm_uniform"), ("lcm", "exponential"),
])
def test_split_zero_reproduces_the_stock_ksampler_bit_identically(comfy, tiny_sd15, sampler, scheduler):
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2])
    args = ksampler_args(m, pos, neg, lat, sampler=sampler, scheduler=scheduler)
    assert torch.equal(dci(comfy, args, split=0.0, lam=1.5, guidance="separate"), stock(comfy, args))


def test_split_zero_with_denoise_below_one_and_cfg_one(comfy, tiny_sd15):
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2])
    for kw in ({"denoise": 0.6}, {"cfg": 1.0}):
        args = ksampler_args(m, pos, neg, lat, **kw)
        assert torch.equal(dci(comfy, args, split=0.0), stock(comfy, args)), kw


@pytest.mark.parametrize("guidance", ["shared", "separate"])
def test_blend_weight_one_leaves_the_concept_branch_unaffected_by_the_auxiliary_branch(comfy, tiny_sd15, guidance):
    """With w forced to 1 the concept rows never take the auxiliary output: another auxiliary noun or seed
    changes nothing, and the result matches plain sampling up to batched-arithmetic rounding."""
    import comfy.samplers as samplers

    def run(aux_noun, aux_seed):
        m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2], aux=aux_noun)
        plan = DCIPlan(split=0.5, guidance=guidance, aux_seed=aux_seed)
        guider = build_guider(m, pos, neg, 5.0, plan, FixedBlend(1.0))
        noise = torch.randn(lat["samples"].shape, generator=torch.Generator().manual_seed(3))
        ks = samplers.KSampler(m, steps=6, device=m.load_device, sampler="euler", scheduler="normal")
        with torch.inference_mode():
            return guider.sample(noise, lat["samples"], samplers.sampler_object("euler"), ks.sigmas, seed=3), (
                m, pos, neg, lat, noise, ks)

    a, (m, pos, neg, lat, noise, ks) = run("cat", 1)
    b, _ = run("car", 99)
    assert torch.equal(a, b)
    with torch.inference_mode():
        plain = samplers.CFGGuider(m)
        plain.set_conds(pos, neg)
        plain.set_cfg(5.0)
        ref = plain.sample(noise, lat["samples"], samplers.sampler_object("euler"), ks.sigmas, seed=3)
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max()))


def test_two_branches_change_the_result_and_leave_the_input_model_untouched(comfy, tiny_sd15):
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2])
    args = ksampler_args(m, pos, neg, lat)
    before = stock(comfy, args)
    outs = {g: dci(comfy, args, split=0.5, lam=1.0, guidance=g) for g in ("shared", "separate")}
    for out in outs.values():
        assert torch.isfinite(out).all() and not torch.equal(out, before)
        assert (out - before).abs().max() > 1e-3 * before.abs().max()  # a visible change, not rounding
    assert not torch.equal(outs["shared"], outs["separate"])
    assert torch.equal(stock(comfy, args), before)
    assert not any("dci" in str(k) for k in m.model_options.get("transformer_options", {}).get("wrappers", {}))


def test_batch_rows_pair_only_with_their_own_auxiliary_row(comfy, tiny_sd15):
    m, c, pos, neg, lat2 = dci_inputs(comfy, *tiny_sd15[:2], batch=2)
    seen = []
    original = attention.DBIMPatch.__call__

    def recording(self, q, k, v, extra_options):
        rows = extra_options.get(attention.ROWS_KEY)
        if rows is not None:
            seen.append((rows[0].tolist(), rows[1].tolist(), q.shape[0]))
        return original(self, q, k, v, extra_options)

    attention.DBIMPatch.__call__ = recording
    try:
        for guidance, rows_per_call in (("shared", 6), ("separate", 8)):
            seen.clear()
            dci(comfy, ksampler_args(m, pos, neg, lat2), split=0.5, lam=1.0, guidance=guidance)
            assert seen, "the two-branch phase never ran"
            for c_rows, a_rows, total in seen:
                assert total == rows_per_call  # one UNet call for both branches: 3 or 4 rows per image
                assert [a - cr for cr, a in zip(c_rows, a_rows, strict=True)] == [2, 2]  # image k with aux row B + k
                assert c_rows[1] == c_rows[0] + 1
    finally:
        attention.DBIMPatch.__call__ = original
    # image 0 of a batch of two equals image 0 sampled alone (same noise through batch_index)
    lat1 = {"samples": lat2["samples"][:1], "batch_index": [0]}
    lat2i = {"samples": lat2["samples"], "batch_index": [0, 1]}
    both = dci(comfy, ksampler_args(m, pos, neg, lat2i), split=0.5, lam=1.0)
    alone = dci(comfy, ksampler_args(m, pos, neg, lat1), split=0.5, lam=1.0)
    torch.testing.assert_close(both[:1], alone, rtol=1e-4, atol=1e-3 * float(alone.abs().max()))


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "heun", "dpm_2", "uni_pc_bh2", "res_multistep"])
def test_every_kind_of_sampler_blends_reproducibly_with_two_branches(comfy, tiny_sd15, sampler):
    """Multi-evaluation, ancestral and SDE samplers: the blend changes the image, the same inputs give the same
    image, and the auxiliary branch's own noise matters (test_dci_branches.py forces the weights)."""
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2])
    args = ksampler_args(m, pos, neg, lat, sampler=sampler, steps=4)
    out = dci(comfy, args, split=0.5, lam=0.5)
    assert out.shape == lat["samples"].shape and torch.isfinite(out).all()
    assert torch.equal(dci(comfy, args, split=0.5, lam=0.5), out)
    assert not torch.equal(out, stock(comfy, args))
    assert not torch.equal(dci(comfy, args, split=0.5, lam=0.5, aux_seed=2), out)


def test_cfg_one_and_denoise_below_one_blend_and_stay_reproducible(comfy, tiny_sd15):
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2])
    for kw in ({"cfg": 1.0}, {"denoise": 0.5}):  # split 0.8 reaches into the partial schedule of denoise 0.5
        args = ksampler_args(m, pos, neg, lat, **kw)
        out = dci(comfy, args, split=0.8, lam=1.0, aux_map="noun")
        assert torch.equal(dci(comfy, args, split=0.8, lam=1.0, aux_map="noun"), out), kw
        assert not torch.equal(out, stock(comfy, args)), kw
        assert not torch.equal(out, dci(comfy, args, split=0.8, lam=1.0, aux_map="reference")), kw
        assert torch.equal(dci(comfy, args, split=0.8, lam=1.0, aux_map="paper"),
                           dci(comfy, args, split=0.8, lam=1.0, aux_map="reference")), kw


def test_the_guider_with_sampler_custom_advanced(comfy, tiny_sd15):
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2])
    (guider,), _ = comfy.run_node("DCIGuider", model=m, positive=pos, negative=neg, cfg=5.0, split=0.0, lam=0.0,
                                  aux_map="reference", guidance="shared", aux_seed=1)
    (cfg_guider,), _ = comfy.run_node("CFGGuider", model=m, positive=pos, negative=neg, cfg=5.0)
    (noise,), _ = comfy.run_node("RandomNoise", noise_seed=11)
    (sampler,), _ = comfy.run_node("KSamplerSelect", sampler_name="euler")
    (sigmas,), _ = comfy.run_node("BasicScheduler", model=m, scheduler="normal", steps=5, denoise=1.0)

    def run(g):
        (out, _denoised), _ = comfy.run_node("SamplerCustomAdvanced", noise=noise, guider=g, sampler=sampler,
                                             sigmas=sigmas, latent_image=lat)
        return out["samples"]

    assert torch.equal(run(guider), run(cfg_guider))
    (guider2,), _ = comfy.run_node("DCIGuider", model=m, positive=pos, negative=neg, cfg=5.0, split=0.4, lam=1.0,
                                   aux_map="reference", guidance="separate", aux_seed=1)
    out = run(guider2)
    assert torch.isfinite(out).all() and not torch.equal(out, run(cfg_guider))


def test_sdxl_family(comfy, tiny_sdxl):
    """Two text encoders, pooled outputs in the mixed cond: split 0 is the stock sampler, w = 1 the stock
    sampler up to rounding, and the real blend changes the image."""
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sdxl[:2], family="sdxl")
    args = ksampler_args(m, pos, neg, lat, steps=4)
    plain = stock(comfy, args)
    assert torch.equal(dci(comfy, args, split=0.0), plain)
    for guidance in ("shared", "separate"):
        forced = dci_sample(m, pos, neg, lat, FixedBlend(1.0), DCIPlan(split=0.5, guidance=guidance), steps=4)
        torch.testing.assert_close(forced, plain, rtol=1e-4, atol=1e-3 * float(plain.abs().max()))
        assert not torch.equal(dci(comfy, args, split=0.5, lam=1.0, guidance=guidance), plain)


def test_prompt_encode_finds_the_phrase_and_builds_the_auxiliary_prompt(comfy, tiny_sd15):
    model, clip = tiny_sd15[:2]
    name = write_concept(random_concept(model, clip), "dci_prompt")
    (m, c, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    cases = {
        "sks dog running": ("cat running", [1, 2, 3]),
        "a (red:1.2) ball and SKS dog": ("a (red:1.2) ball and cat", [5, 6, 7]),
        "a photo of sks dog, a dog, and a cat": ("a photo of car, a dog, and a cat", [4, 5, 6]),
    }
    for text, (aux_prompt, concept_positions) in cases.items():
        (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=text, auxiliary_noun="", concept=ref)
        data = pos[0][1]["dci"]
        assert data.aux_prompt == aux_prompt, text
        assert data.concept_mask.nonzero().flatten().tolist() == concept_positions, text
        (plain,), _ = comfy.run_node("CLIPTextEncode", clip=c, text=text)
        assert torch.equal(pos[0][0], plain[0][0])  # the concept branch's conditioning is CLIPTextEncode's
    # typed phrase instead of the concept input; the auxiliary noun chosen by the user
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text="sks dog at night", auxiliary_noun="teapot",
                               concept_phrase="sks dog")
    assert pos[0][1]["dci"].aux_prompt == "teapot at night"


def test_long_prompts_spanning_two_chunks(comfy, tiny_sd15):
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2],
                                     text="a very detailed scene, " * 20 + "and a photo of sks dog on the beach")
    data = pos[0][1]["dci"]
    assert pos[0][0].shape[1] == 154 and data.concept_mask.shape[0] == 154 and data.concept_mask[77:].any()
    assert not data.concept_mask[:77].any() and data.aux_noun_mask[77:].any()
    args = ksampler_args(m, pos, neg, lat, steps=3)
    plain = stock(comfy, args)
    forced = dci_sample(m, pos, neg, lat, FixedBlend(1.0), DCIPlan(split=0.5), steps=3)
    torch.testing.assert_close(forced, plain, rtol=1e-4, atol=1e-3 * float(plain.abs().max()))
    assert not torch.equal(dci(comfy, args, split=0.5, lam=1.0), plain)


def test_clear_errors(comfy, tiny_sd15):
    model, clip = tiny_sd15[:2]
    name = write_concept(random_concept(model, clip), "dci_errors")
    (m, c, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match="'sks dog' is not in the prompt"):
        comfy.run_node("DCIPromptEncode", clip=c, text="a photo of a cat", auxiliary_noun="", concept=ref)
    with pytest.raises(ValueError, match="no concept phrase"):
        comfy.run_node("DCIPromptEncode", clip=c, text="a photo of a cat", auxiliary_noun="")
    (plain,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="a photo of sks dog")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    with pytest.raises(ValueError, match="must come from a DCI Prompt Encode"):
        dci(comfy, ksampler_args(m, plain, plain, lat))
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text="a photo of sks dog", auxiliary_noun="", concept=ref)
    with pytest.raises(ValueError, match="split must be between 0 and 1"):
        dci(comfy, ksampler_args(m, pos, plain, lat), split=1.5)
    with pytest.raises(ValueError, match="guidance must be one of"):
        dci(comfy, ksampler_args(m, pos, plain, lat), guidance="both")
    with pytest.raises(ValueError, match="tau must be"):
        dci(comfy, ksampler_args(m, pos, plain, lat), tau=0.0)


def test_a_call_without_whole_branch_pairs_falls_back_and_warns_once(comfy, caplog):
    """If ComfyUI ever split a UNet batch so that a concept row's partner is elsewhere, that call runs
    without the blend (never mixing wrong rows) and one warning says so."""
    import logging

    run = attention.DCIRun(DBIMSettings(), data=None, context_length=77)
    seen = []

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen.append(transformer_options)
        return x * 2

    info = wrapper.StepInfo(run=run, mixed_index=0, uncond_index=1, batch=2, shared=True)
    x = torch.randn(6, 4, 8, 8)  # 3 chunks of 2 rows: not whole pairs of a batch of 2 images
    options = {attention.STEP_KEY: info, "cond_or_uncond": [0, 1, 1]}
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            out = wrapper.apply_model_wrapper(executor, x, torch.ones(6), None, torch.randn(6, 77, 8), None, options)
            assert torch.equal(out, x * 2)
    assert all(attention.ROWS_KEY not in o for o in seen)
    assert caplog.text.count("did not contain whole branch pairs") == 1


def test_aux_model_gives_the_auxiliary_branch_that_models_keys_and_values(comfy, tiny_sd15):
    """aux_model: the auxiliary rows' K/V come from another MODEL (here the base model before the concept):
    its weights are read with its own patches applied, the concept model itself reproduces the default run,
    the base model changes the result, and neither input model is left patched."""
    base = tiny_sd15[0]
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2])
    own = base_kv_weights(base)
    layers = {layer.patch_key: layer for layer in cross_attention_layers(m)}
    from_base = attention.aux_kv_weights(base, m)
    from_concept = attention.aux_kv_weights(m, m)
    assert from_base.keys() == layers.keys()
    for key, (wk, wv) in from_base.items():
        prefix = layers[key].weight_prefix
        assert torch.equal(wk, own[prefix + "to_k.weight"].float()) and torch.equal(wv, own[prefix + "to_v.weight"].float())
        assert not torch.equal(from_concept[key][0], wk)  # the concept's delta is applied for the concept model

    args = ksampler_args(m, pos, neg, lat)
    before_concept, before_base = stock(comfy, args), stock(comfy, {**args, "model": base})
    for guidance in ("shared", "separate"):
        default = dci(comfy, args, split=0.5, lam=1.0, guidance=guidance)
        same = dci(comfy, args, split=0.5, lam=1.0, guidance=guidance, aux_model=m)
        on_base = dci(comfy, args, split=0.5, lam=1.0, guidance=guidance, aux_model=base)
        torch.testing.assert_close(same, default, rtol=1e-4, atol=1e-4 * float(default.abs().max()))
        assert torch.isfinite(on_base).all()
        assert (on_base - default).abs().max() > 1e-3 * float(default.abs().max())
    assert torch.equal(stock(comfy, args), before_concept)
    assert torch.equal(stock(comfy, {**args, "model": base}), before_base)


def test_aux_model_of_another_architecture_is_refused(comfy, tiny_sd15, tiny_sdxl):
    m, c, pos, neg, lat = dci_inputs(comfy, *tiny_sd15[:2])
    with pytest.raises(ValueError, match="DCI KSampler: aux_model"):
        dci(comfy, ksampler_args(m, pos, neg, lat), split=0.5, lam=1.0, aux_model=tiny_sdxl[0])
    with pytest.raises(ValueError, match="'aux_model' must be a MODEL"):
        dci(comfy, ksampler_args(m, pos, neg, lat), split=0.5, lam=1.0, aux_model="not a model")
