"""What the two DCI branches do to each other, checked through the real guider on a tiny SD1.5 model.

The blend weight is forced (``FixedBlend``): w = 1 keeps the concept rows' own attention output, w = 0 gives
them their auxiliary partner's. With w = 0 for the whole schedule and the auxiliary noise equal to the
concept noise, each concept image must become exactly what the stock sampler makes of the auxiliary prompt
for that image: proof that row k pairs with its own auxiliary row and with no other.
"""

from __future__ import annotations

import pytest
import torch
from comfy.sample import prepare_noise

from dci.comfyui.sampling import attention, wrapper
from dci.comfyui.sampling.guider import noise_batch_index
from dci.method.branches import DCIPlan
from dci.method.dbim import DBIMSettings
from dev.fixtures import FixedBlend, dci_sample, random_concept, write_concept


def prepared(comfy, tiny_sd15, batch=2, text="a photo of sks dog on the beach"):
    model, clip = tiny_sd15[:2]
    name = write_concept(random_concept(model, clip), "branches")
    (m, c, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=text, auxiliary_noun="", concept=ref)
    (neg,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="blurry")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=batch)
    return m, c, pos, neg, lat


def stock(comfy, m, pos, neg, lat, seed=7, steps=6, cfg=5.0, sampler="euler", denoise=1.0):
    (out,), _ = comfy.run_node("KSampler", model=m, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                               scheduler="normal", positive=pos, negative=neg, latent_image=lat, denoise=denoise)
    return out["samples"]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize("guidance", ["shared", "separate"])
def test_weight_zero_makes_each_image_its_own_auxiliary_rows_sampling(comfy, tiny_sd15, guidance):
    m, c, pos, neg, lat = prepared(comfy, tiny_sd15, batch=2)
    (aux_pos,), _ = comfy.run_node("CLIPTextEncode", clip=c, text=pos[0][1]["dci"].aux_prompt)
    out = dci_sample(m, pos, neg, lat, FixedBlend(0.0), DCIPlan(split=1.0, guidance=guidance, aux_seed=7))
    expected = stock(comfy, m, aux_pos, neg, lat)
    assert not torch.allclose(expected[0], expected[1])  # two different images: a swap would show
    close(out, expected)
    assert not torch.allclose(out, stock(comfy, m, pos, neg, lat), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "uni_pc_bh2", "res_multistep"])
def test_weight_one_leaves_every_sampler_on_the_concept_branchs_own_path(comfy, tiny_sd15, sampler):
    """Samplers that call the model several times per step or keep a history keep each row's state: with
    w = 1 the concept rows sample exactly as the stock sampler does (up to batched rounding). (Ancestral and
    SDE samplers draw their per-step noise for all 2B rows, so their concept rows get other noise than a
    B-row run: test_dci_sampler.py checks them for reproducibility instead.)"""
    m, c, pos, neg, lat = prepared(comfy, tiny_sd15, batch=1)
    out = dci_sample(m, pos, neg, lat, FixedBlend(1.0), DCIPlan(split=0.5, guidance="separate"), steps=4,
                 sampler=sampler)
    close(out, stock(comfy, m, pos, neg, lat, steps=4, sampler=sampler))


@pytest.mark.parametrize("kw", [{"cfg": 1.0}, {"denoise": 0.5}])
def test_cfg_one_and_partial_denoise_with_forced_weights(comfy, tiny_sd15, kw):
    """cfg 1 runs no unconditional pass, denoise < 1 starts late (below split 0.5's noise level, hence 0.8);
    the two branches still pair right."""
    m, c, pos, neg, lat = prepared(comfy, tiny_sd15, batch=2)
    (aux_pos,), _ = comfy.run_node("CLIPTextEncode", clip=c, text=pos[0][1]["dci"].aux_prompt)
    close(dci_sample(m, pos, neg, lat, FixedBlend(1.0), DCIPlan(split=0.8), **kw), stock(comfy, m, pos, neg, lat, **kw))
    close(dci_sample(m, pos, neg, lat, FixedBlend(0.0), DCIPlan(split=1.0, aux_seed=7), **kw),
          stock(comfy, m, aux_pos, neg, lat, **kw))


def test_shared_guidance_skips_the_auxiliary_uncond_rows_and_reuses_the_concept_prediction():
    """The APPLY_MODEL wrapper with a stand-in UNet: which rows run, which get blended, what comes back."""
    b = 2
    run = attention.DCIRun(DBIMSettings(), data=None, context_length=77)
    x = torch.randn(4 * b, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def unet(x_in, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        calls.append((x_in.clone(), transformer_options))
        return x_in * 3 + 1

    for order in ([0, 1], [1, 0]):
        for shared in (True, False):
            calls.clear()
            info = wrapper.StepInfo(run=run, mixed_index=0, uncond_index=1, batch=b, shared=shared)
            options = {attention.STEP_KEY: info, "cond_or_uncond": order}
            out = wrapper.apply_model_wrapper(unet, x, torch.ones(4 * b), None, torch.zeros(4 * b, 77, 8), None,
                                              options)
            (x_in, seen), = calls
            mixed, uncond = order.index(0) * 2 * b, order.index(1) * 2 * b
            c, a = torch.arange(mixed, mixed + b), torch.arange(mixed + b, mixed + 2 * b)
            uc, ua = torch.arange(uncond, uncond + b), torch.arange(uncond + b, uncond + 2 * b)
            if shared:
                assert x_in.shape[0] == 3 * b  # the auxiliary rows' unconditional pass is not run
                kept = [i for i in range(4 * b) if i not in ua.tolist()]
                assert torch.equal(x_in, x[kept])
                torch.testing.assert_close(out[ua], (x[uc] * 3 + 1) + (x[ua] - x[uc]))
            else:
                assert torch.equal(x_in, x)
                torch.testing.assert_close(out[ua], x[ua] * 3 + 1)
            others = [i for i in range(4 * b) if i not in ua.tolist()]
            torch.testing.assert_close(out[others], x[others] * 3 + 1)
            blend_c, blend_a = seen[attention.ROWS_KEY]
            assert torch.equal(x_in[blend_c], x[c]) and torch.equal(x_in[blend_a], x[a])


def test_the_auxiliary_noise_follows_the_latents_batch_index(comfy, tiny_sd15):
    """SamplerCustomAdvanced hands the guider only the noise and its seed; the guider reads the batch_index
    back, so DCI Guider and DCI KSampler draw the same auxiliary noise for a batch_index latent."""
    latent = torch.zeros(2, 4, 8, 8)
    for index in ([3, 1], [5, 5], [0, 9]):
        assert noise_batch_index(prepare_noise(latent, 11, index), latent, 11) == index
    assert noise_batch_index(prepare_noise(latent, 11, [0, 1]), latent, 11) is None  # the plain draw
    assert noise_batch_index(prepare_noise(latent, 11, None), latent, 11) is None
    assert noise_batch_index(torch.zeros(2, 4, 8, 8), latent, 11) is None  # not drawn from the seed
    assert noise_batch_index(prepare_noise(latent, 11, [1, 2]), latent, None) is None

    m, c, pos, neg, lat = prepared(comfy, tiny_sd15, batch=1)
    picked = {"samples": lat["samples"], "batch_index": [2]}
    (ksampled,), _ = comfy.run_node("DCIKSampler", model=m, seed=5, steps=4, cfg=5.0, sampler_name="euler",
                                    scheduler="normal", positive=pos, negative=neg, latent_image=picked, denoise=1.0,
                                    split=0.5, lam=1.0, aux_map="reference", guidance="shared", aux_seed=3)
    (guider,), _ = comfy.run_node("DCIGuider", model=m, positive=pos, negative=neg, cfg=5.0, split=0.5, lam=1.0,
                                  aux_map="reference", guidance="shared", aux_seed=3)
    (noise,), _ = comfy.run_node("RandomNoise", noise_seed=5)
    (sampler,), _ = comfy.run_node("KSamplerSelect", sampler_name="euler")
    (sigmas,), _ = comfy.run_node("BasicScheduler", model=m, scheduler="normal", steps=4, denoise=1.0)
    (custom, _), _ = comfy.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler,
                                    sigmas=sigmas, latent_image=picked)
    assert torch.equal(custom["samples"], ksampled["samples"])
    unpicked = {"samples": lat["samples"]}
    (other,), _ = comfy.run_node("DCIKSampler", model=m, seed=5, steps=4, cfg=5.0, sampler_name="euler",
                                 scheduler="normal", positive=pos, negative=neg, latent_image=unpicked, denoise=1.0,
                                 split=0.5, lam=1.0, aux_map="reference", guidance="shared", aux_seed=3)
    assert not torch.equal(other["samples"], ksampled["samples"])
