"""DCI on a MODEL that another extension patched the way IP-Adapter packs do: one attn2 *replace* patch object
per cross-attention layer, which runs the attention itself and adds its own image-prompt term, and keeps
state across calls. The stand-in below follows that public structure only (set_model_attn2_replace with a
callable object per layer); no code of any such pack is used.

DCI must keep that patch working in both branches while they run (it is called with the concept and the
auxiliary rows of one UNet call), and alone after the split, with DCI KSampler and with DCI Apply + the stock
KSampler; the blend then works on the patch's output; the MODEL that carries the patch is left unchanged.
"""

from __future__ import annotations

import torch
from comfy.ldm.modules.attention import optimized_attention

from dci.comfyui.model import cross_attention_layers
from dev.fixtures import random_concept, write_concept

PROMPT = "a photo of sks dog on the beach"
STEPS = 6


CALLS: dict[int, list[int]] = {}  # layer → batch size of every call (ComfyUI deep-copies patches with the model)


class ImagePromptStandIn:
    """Per layer: plain attention plus a fixed 'image prompt' term scaled by ``weight``; records the batch size
    of each call."""

    def __init__(self, inner_dim: int, weight: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.term = torch.randn(inner_dim, generator=g) * weight
        self.layer = seed

    @property
    def batches(self) -> list[int]:
        return CALLS.setdefault(self.layer, [])

    def __call__(self, q, k, v, extra_options):
        self.batches.append(q.shape[0])
        out = optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))
        return out + self.term.to(out)


def _patched(model, weight: float):
    CALLS.clear()
    m = model.clone()
    patches = []
    for i, layer in enumerate(cross_attention_layers(m)):
        p = ImagePromptStandIn(layer.inner_dim, weight, seed=i)
        m.set_model_attn2_replace(p, layer.block[0], layer.block[1], layer.depth)
        patches.append(p)
    return m, patches


def _inputs(comfy, tiny_sd15):
    model, clip = tiny_sd15[:2]
    name = write_concept(random_concept(model, clip), "ipadapter_bridge")
    (m, c, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=PROMPT, auxiliary_noun="", concept=ref)
    (neg,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="blurry")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    return m, pos, neg, lat


def _args(m, pos, neg, lat):
    return dict(model=m, seed=7, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal", positive=pos,
                negative=neg, latent_image=lat, denoise=1.0)


DCI = dict(split=0.5, lam=1.0, aux_map="reference", guidance="shared", aux_seed=1)


def test_the_patch_runs_in_both_branches_then_alone_with_dci_ksampler(comfy, tiny_sd15):
    m, pos, neg, lat = _inputs(comfy, tiny_sd15)
    patched, patches = _patched(m, weight=0.5)
    (out,), _ = comfy.run_node("DCIKSampler", **_args(patched, pos, neg, lat), **DCI)
    for p in patches:
        # shared guidance: 3 rows (concept cond + uncond, auxiliary cond) in the two-branch phase, then 2
        assert 3 in p.batches and 2 in p.batches, p.batches
        assert p.batches.index(2) > p.batches.index(3)  # two branches first, then the concept branch alone
        assert len(p.batches) == STEPS
    # the patch's term reaches the result: without it (weight 0) DCI samples something else
    plain, _ = _patched(m, weight=0.0)
    (without,), _ = comfy.run_node("DCIKSampler", **_args(plain, pos, neg, lat), **DCI)
    assert not torch.equal(out["samples"], without["samples"])
    # and the patched MODEL stays as it was: the stock KSampler gives the same result before and after
    (a,), _ = comfy.run_node("KSampler", **_args(patched, pos, neg, lat))
    (b,), _ = comfy.run_node("KSampler", **_args(patched, pos, neg, lat))
    assert torch.equal(a["samples"], b["samples"])
    assert not any("dci" in str(k) for k in patched.model_options.get("transformer_options", {}).get("wrappers", {}))


def test_the_patch_runs_in_both_branches_with_dci_apply_and_the_stock_ksampler(comfy, tiny_sd15):
    m, pos, neg, lat = _inputs(comfy, tiny_sd15)
    patched, patches = _patched(m, weight=0.5)
    (applied,), _ = comfy.run_node("DCIApply", model=patched, **DCI)
    (out,), _ = comfy.run_node("KSampler", **_args(applied, pos, neg, lat))
    for p in patches:
        assert 3 in p.batches and 2 in p.batches, p.batches
    (ref,), _ = comfy.run_node("DCIKSampler", **_args(patched, pos, neg, lat), **DCI)
    assert torch.equal(out["samples"], ref["samples"])  # DCI Apply and DCI KSampler agree with the patch on
