"""DCI Apply: DCI inside the stock samplers (KSampler, KSamplerAdvanced, SamplerCustomAdvanced with any guider).

The reference is DCI KSampler / DCI Guider with the same settings: with CFGGuider the stock samplers make the very
model calls the DCI guider makes, so the latents must be equal bit for bit.
"""

from __future__ import annotations

import logging

import pytest
import torch

from dci.comfyui.sampling.apply import NO_DCI_POSITIVE
from dci.method.branches import DCIPlan
from dev.fixtures import random_concept, write_concept

PROMPT = "a photo of sks dog on the beach"
DCI = dict(split=0.5, lam=1.0, aux_map="reference", guidance="shared", aux_seed=3)


def prepared(comfy, tiny, family="sd1", batch=1):
    model, clip = tiny[:2]
    name = write_concept(random_concept(model, clip, family=family), f"apply_{family}")
    (m, c, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=PROMPT, auxiliary_noun="", concept=ref)
    (plain,), _ = comfy.run_node("CLIPTextEncode", clip=c, text=PROMPT)
    (neg,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="blurry")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=batch)
    return m, pos, plain, neg, lat


def applied(comfy, m, **dci):
    (out,), _ = comfy.run_node("DCIApply", model=m, **{**DCI, **dci})
    return out


def ksampler(comfy, node, m, pos, neg, lat, steps=6, cfg=5.0, sampler="euler", scheduler="normal", seed=7,
             denoise=1.0, **dci):
    (out,), _ = comfy.run_node(node, model=m, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                               scheduler=scheduler, positive=pos, negative=neg, latent_image=lat, denoise=denoise, **dci)
    return out["samples"]


def advanced(comfy, m, pos, neg, lat, start, end, steps=8, add_noise="enable", leftover="disable", seed=7):
    (out,), _ = comfy.run_node("KSamplerAdvanced", model=m, add_noise=add_noise, noise_seed=seed, steps=steps, cfg=5.0,
                               sampler_name="euler", scheduler="normal", positive=pos, negative=neg, latent_image=lat,
                               start_at_step=start, end_at_step=end, return_with_leftover_noise=leftover)
    return out["samples"]


def custom(comfy, guider, m, lat, steps=5, seed=11, sampler="euler"):
    (noise,), _ = comfy.run_node("RandomNoise", noise_seed=seed)
    (picked,), _ = comfy.run_node("KSamplerSelect", sampler_name=sampler)
    (sigmas,), _ = comfy.run_node("BasicScheduler", model=m, scheduler="normal", steps=steps, denoise=1.0)
    (out, _denoised), _ = comfy.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=picked,
                                         sigmas=sigmas, latent_image=lat)
    return out["samples"]


@pytest.mark.parametrize("sampler, scheduler, dci", [
    ("euler", "normal", {}),
    ("euler", "karras", {"guidance": "separate", "lam": -0.5}),
    ("euler_ancestral", "normal", {"aux_map": "noun"}),
    ("dpmpp_2m", "karras", {"split": 0.3}),
    ("heun", "simple", {"guidance": "separate"}),
    ("dpmpp_sde", "normal", {"normalization": "pixel_count", "tau": 5.0, "kappa": 200.0}),
])
def test_the_stock_ksampler_on_a_dci_apply_model_equals_dci_ksampler(comfy, tiny_sd15, sampler, scheduler, dci):
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15, batch=2)
    settings = {**DCI, **dci}
    ours = ksampler(comfy, "DCIKSampler", m, pos, neg, lat, sampler=sampler, scheduler=scheduler, **settings)
    stock = ksampler(comfy, "KSampler", applied(comfy, m, **dci), pos, neg, lat, sampler=sampler, scheduler=scheduler)
    assert torch.equal(stock, ours)
    assert not torch.equal(stock, ksampler(comfy, "KSampler", m, pos, neg, lat, sampler=sampler, scheduler=scheduler))


@pytest.mark.parametrize("kw", [{"cfg": 1.0}, {"denoise": 0.5}])
def test_cfg_one_and_partial_denoise_equal_dci_ksampler(comfy, tiny_sd15, kw):
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    ours = ksampler(comfy, "DCIKSampler", m, pos, neg, lat, **kw, **{**DCI, "split": 0.8})
    stock = ksampler(comfy, "KSampler", applied(comfy, m, split=0.8), pos, neg, lat, **kw)
    assert torch.equal(stock, ours)
    assert not torch.equal(stock, ksampler(comfy, "KSampler", m, pos, neg, lat, **kw))


def test_batch_index_and_noise_mask_latents_equal_dci_ksampler(comfy, tiny_sd15):
    """A latent picked from a batch (its batch_index draws its own noise, for the auxiliary rows too) and an
    inpainting latent with a noise mask (the mask covers both branches' rows)."""
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15, batch=2)
    picked = {"samples": lat["samples"][:1], "batch_index": [3]}
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    (masked,), _ = comfy.run_node("SetLatentNoiseMask", samples=lat, mask=mask)
    model = applied(comfy, m)
    for latent in (picked, masked):
        ours = ksampler(comfy, "DCIKSampler", m, pos, neg, latent, **DCI)
        assert torch.equal(ksampler(comfy, "KSampler", model, pos, neg, latent), ours)
        assert not torch.equal(ours, ksampler(comfy, "KSampler", m, pos, neg, latent))


def test_aux_model_matches_dci_ksampler(comfy, tiny_sd15):
    base = tiny_sd15[0]
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    ours = ksampler(comfy, "DCIKSampler", m, pos, neg, lat, aux_model=base, **DCI)
    (model,), _ = comfy.run_node("DCIApply", model=m, aux_model=base, **DCI)
    assert torch.equal(ksampler(comfy, "KSampler", model, pos, neg, lat), ours)
    assert not torch.equal(ours, ksampler(comfy, "DCIKSampler", m, pos, neg, lat, **DCI))


def test_split_zero_and_a_plain_positive_are_stock_sampling_and_the_plain_one_warns_once_per_run(
        comfy, tiny_sd15, caplog):
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m"):
        reference = ksampler(comfy, "KSampler", m, pos, neg, lat, sampler=sampler)
        assert torch.equal(ksampler(comfy, "KSampler", applied(comfy, m, split=0.0), pos, neg, lat, sampler=sampler),
                           reference)
    model = applied(comfy, m)
    reference = ksampler(comfy, "KSampler", m, plain, neg, lat)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(ksampler(comfy, "KSampler", model, plain, neg, lat), reference)
        assert caplog.text.count(NO_DCI_POSITIVE) == 1  # one warning for a run of 6 steps
        ksampler(comfy, "KSampler", model, plain, neg, lat, steps=3)
        assert caplog.text.count(NO_DCI_POSITIVE) == 2  # and one for the next run
        caplog.clear()
        ksampler(comfy, "KSampler", applied(comfy, m, split=0.0), plain, neg, lat)
        ksampler(comfy, "KSampler", model, pos, neg, lat)
    assert NO_DCI_POSITIVE not in caplog.text  # split 0 asks for no DCI; a DCI positive needs no warning


def test_ksampler_advanced_start_and_end_steps(comfy, tiny_sd15):
    """A KSamplerAdvanced pass is DCI over its part of the schedule: equal to the DCI guider on the same sigmas;
    a pass that starts below the split's noise level is the stock pass bit for bit."""
    from comfy.sample import prepare_noise
    from comfy.samplers import KSampler, sampler_object

    from dci.comfyui.sampling.guider import build_guider
    from dci.method.dbim import DBIMSettings

    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    model = applied(comfy, m)
    sigmas = KSampler(m, steps=8, device=m.load_device, sampler="euler", scheduler="normal").sigmas
    noise = prepare_noise(lat["samples"], 7, None)
    plan = DCIPlan(split=DCI["split"], guidance=DCI["guidance"], aux_seed=DCI["aux_seed"])
    settings = DBIMSettings(lam=DCI["lam"])
    for start, end, leftover in ((0, 5, "enable"), (2, 8, "disable"), (1, 3, "enable")):
        part = sigmas[start:end + 1].clone()
        if leftover == "disable":
            part[-1] = 0.0
        guider = build_guider(m, pos, neg, 5.0, plan, settings)
        with torch.inference_mode():
            expected = guider.sample(noise, lat["samples"], sampler_object("euler"), part, seed=7)
        got = advanced(comfy, model, pos, neg, lat, start, end, leftover=leftover)
        assert torch.equal(got, expected), (start, end)
        assert not torch.equal(got, advanced(comfy, m, pos, neg, lat, start, end, leftover=leftover))
    # second stage of a two-stage graph: below the split, no added noise -> the stock pass
    first = {"samples": advanced(comfy, model, pos, neg, lat, 0, 5, leftover="enable")}
    assert torch.equal(advanced(comfy, model, pos, neg, first, 5, 8, add_noise="disable"),
                       advanced(comfy, m, pos, neg, first, 5, 8, add_noise="disable"))
    # a pass without added noise that starts above the split: the auxiliary rows start from the same latent
    out = advanced(comfy, model, pos, neg, first, 1, 8, add_noise="disable")
    assert torch.isfinite(out).all() and not torch.equal(out, advanced(comfy, m, pos, neg, first, 1, 8,
                                                                       add_noise="disable"))


def test_sampler_custom_advanced_with_cfg_and_basic_guiders(comfy, tiny_sd15):
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    model = applied(comfy, m)
    (dci_guider,), _ = comfy.run_node("DCIGuider", model=m, positive=pos, negative=neg, cfg=5.0, **DCI)
    (cfg_guider,), _ = comfy.run_node("CFGGuider", model=model, positive=pos, negative=neg, cfg=5.0)
    (plain_guider,), _ = comfy.run_node("CFGGuider", model=m, positive=pos, negative=neg, cfg=5.0)
    for sampler in ("euler", "dpmpp_2m_sde"):
        expected = custom(comfy, dci_guider, m, lat, sampler=sampler)
        assert torch.equal(custom(comfy, cfg_guider, m, lat, sampler=sampler), expected)
        assert not torch.equal(expected, custom(comfy, plain_guider, m, lat, sampler=sampler))
    # BasicGuider: conditional rows only; the same as the DCI guider at cfg 1 up to that guider's CFG arithmetic
    (basic,), _ = comfy.run_node("BasicGuider", model=model, conditioning=pos)
    (basic_plain,), _ = comfy.run_node("BasicGuider", model=m, conditioning=pos)
    (dci_cfg1,), _ = comfy.run_node("DCIGuider", model=m, positive=pos, negative=neg, cfg=1.0, **DCI)
    out = custom(comfy, basic, m, lat)
    torch.testing.assert_close(out, custom(comfy, dci_cfg1, m, lat), rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, custom(comfy, basic_plain, m, lat))


def test_a_guider_of_another_shape_dual_cfg(comfy, tiny_sd15, caplog):
    """DualCFGGuider passes [negative, middle, positive] to calc_cond_batch: the DCI positive is found at index 2;
    with two other conds shared guidance can't pick the unconditional one, so it runs as separate, with a
    warning once per run."""
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    (middle,), _ = comfy.run_node("CLIPTextEncode", clip=tiny_sd15[1], text="a photo")

    def dual(model):
        (g,), _ = comfy.run_node("DualCFGGuider", model=model, cond1=pos, cond2=middle, negative=neg, cfg_conds=4.0,
                                 cfg_cond2_negative=2.0, style="regular")
        return custom(comfy, g, m, lat)

    reference = dual(m)
    with caplog.at_level(logging.WARNING):
        shared = dual(applied(comfy, m, guidance="shared"))
    assert caplog.text.count("shared guidance needs exactly one unconditional") == 1
    assert torch.isfinite(shared).all() and not torch.equal(shared, reference)
    assert torch.equal(shared, dual(applied(comfy, m, guidance="separate")))
    assert torch.equal(dual(applied(comfy, m, split=0.0)), reference)


def test_a_model_evaluation_that_bypasses_calc_cond_batch_warns_once(comfy, tiny_sd15, caplog):
    """A sampler_calc_cond_batch_function that skips ComfyUI's calc_cond_batch (and so its wrappers) can't get
    the blend: one warning per run says so, instead of a silent no-op."""
    import comfy.samplers as samplers

    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    bypassing = applied(comfy, m).clone()
    bypassing.model_options["sampler_calc_cond_batch_function"] = lambda a: samplers._calc_cond_batch(
        a["model"], a["conds"], a["input"], a["sigma"], a["model_options"])
    with caplog.at_level(logging.WARNING):
        ksampler(comfy, "KSampler", applied(comfy, m), pos, neg, lat)
        assert "without the blend" not in caplog.text
        ksampler(comfy, "KSampler", bypassing, pos, neg, lat)
    assert caplog.text.count("evaluated the model without ComfyUI's calc_cond_batch") == 1


def test_a_combined_positive_is_refused_clearly(comfy, tiny_sd15):
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    (combined,), _ = comfy.run_node("ConditioningCombine", conditioning_1=pos, conditioning_2=plain)
    with pytest.raises(ValueError, match="DCI Apply: DCI needs exactly one positive conditioning entry"):
        ksampler(comfy, "KSampler", applied(comfy, m), combined, neg, lat)


def test_the_input_model_is_unchanged_and_dci_nodes_on_an_applied_model_blend_once(comfy, tiny_sd15):
    m, pos, plain, neg, lat = prepared(comfy, tiny_sd15)
    before = ksampler(comfy, "KSampler", m, pos, neg, lat)
    options_before = repr(sorted(m.model_options.get("transformer_options", {}).keys()))
    model = applied(comfy, m)
    ksampler(comfy, "KSampler", model, pos, neg, lat)
    assert torch.equal(ksampler(comfy, "KSampler", m, pos, neg, lat), before)
    assert repr(sorted(m.model_options.get("transformer_options", {}).keys())) == options_before
    assert not m.model_options.get("transformer_options", {}).get("wrappers", {})
    # DCI KSampler on a DCI Apply model: its own settings, one blend (the same as on the plain model)
    assert torch.equal(ksampler(comfy, "DCIKSampler", model, pos, neg, lat, **DCI),
                       ksampler(comfy, "DCIKSampler", m, pos, neg, lat, **DCI))


def test_sdxl_family(comfy, tiny_sdxl):
    m, pos, plain, neg, lat = prepared(comfy, tiny_sdxl, family="sdxl")
    ours = ksampler(comfy, "DCIKSampler", m, pos, neg, lat, steps=4, **DCI)
    assert torch.equal(ksampler(comfy, "KSampler", applied(comfy, m), pos, neg, lat, steps=4), ours)


def test_clear_errors(comfy, tiny_sd15):
    m = prepared(comfy, tiny_sd15)[0]
    with pytest.raises(ValueError, match="DCI Apply: split must be between 0 and 1"):
        applied(comfy, m, split=1.5)
    with pytest.raises(ValueError, match="DCI Apply: 'model' must be a MODEL"):
        comfy.run_node("DCIApply", model="nope", **DCI)
    with pytest.raises(ValueError, match="DCI Apply: 'aux_model' must be a MODEL"):
        comfy.run_node("DCIApply", model=m, aux_model="not a model", **DCI)
