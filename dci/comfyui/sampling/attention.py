"""DCI's attn2 replace patch: fused attention for the outputs, the DBIM blend on the concept rows.

One ``DBIMPatch`` per cross-attention layer (found from the model, never a per-architecture list). It keeps
no state of a sampling run: the run (``DCIRun``: settings, token masks, optional auxiliary K/V weights) and the
rows to blend arrive with each call in ``extra_options``, put there by the guider and the APPLY_MODEL wrapper
(``wrapper.py``). Outside the two-branch phase those entries are absent and the patch is plain attention.
An attn2 replace patch another extension set before ours is called for the attention itself, not dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.lora
import torch
from comfy.ldm.modules.attention import optimized_attention

from ...method.dbim import DBIMSettings, blend_outputs
from ...method.token_spans import tile_mask
from .. import seams
from ..model import CrossAttentionLayer, cross_attention_layers
from .prompt import DCIError, DCIPrompt

log = logging.getLogger(__name__)

STEP_KEY = "dci_step"  # transformer_options entry the guider sets on a two-branch model call (a StepInfo)
ROWS_KEY = "dci_rows"  # (concept rows, auxiliary rows) to blend, set by the APPLY_MODEL wrapper
AUX_ROWS_KEY = "dci_aux_rows"  # every auxiliary-branch row of the call (conditional, and unconditional if run)


@dataclass
class DCIRun:
    """What one DCI sampling run shares with every layer: settings, token masks, optional auxiliary K/V."""

    settings: DBIMSettings
    data: DCIPrompt
    context_length: int
    aux_kv: dict | None = None  # per layer (patch key): the attn2 K/V weights the auxiliary branch uses
    masks: dict[tuple, tuple] = field(default_factory=dict)  # (context length, device) → tiled masks
    warned: set = field(default_factory=set)

    def masks_for(self, length: int, device=None):
        """(concept mask or per-concept masks, prompt mask, auxiliary noun mask, auxiliary prompt mask) for a
        context of ``length`` tokens, on ``device`` (that of the attention probabilities)."""
        key = (length, str(device))
        if key not in self.masks:
            d = self.data
            c_len, a_len = d.concept_mask.shape[0], d.aux_noun_mask.shape[0]
            if length % c_len or length % a_len:
                raise DCIError(f"context length {length} is not a multiple of the prompt lengths {c_len}/{a_len}")

            def tiled(mask):
                return tile_mask(mask, length).to(device) if device is not None else tile_mask(mask, length)

            concepts = [tiled(m) for m in d.dbim_concepts]
            self.masks[key] = (concepts[0] if len(concepts) == 1 else concepts, tiled(d.prompt_mask),
                               tiled(d.aux_noun_mask), tiled(d.aux_prompt_mask))
        return self.masks[key]

    def plan_for(self, length: int, device=None):
        """The settings' token plan (``DBIMSettings.plan``) for a context of ``length`` tokens on ``device``:
        built and checked on a run's first blended layer call, then reused by every layer and step."""
        key = ("plan", length, str(device))
        if key not in self.masks:
            concept, prompt_c, aux_noun, prompt_a = self.masks_for(length, device)
            self.masks[key] = self.settings.plan(concept_tokens=concept, aux_noun_tokens=aux_noun,
                                                 prompt_tokens_c=prompt_c, prompt_tokens_a=prompt_a)
        return self.masks[key]

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message)


class DBIMPatch:
    """attn2 replace patch of one layer."""

    def __init__(self, layer: CrossAttentionLayer, inner=None):
        self.layer = layer
        self.inner = inner  # an attn2 replace patch that was there before ours (another extension's)

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        step = extra_options.get(STEP_KEY)
        run: DCIRun | None = step.run if step is not None else None
        aux_rows = extra_options.get(AUX_ROWS_KEY)
        stashed = seams.stashed_attn2_context(extra_options)
        if run is not None and run.aux_kv is not None and aux_rows is not None and stashed is not None:
            # the auxiliary branch's keys and values from the other model's weights (its own context rows)
            context, value = stashed
            wk, wv = run.aux_kv[self.layer.patch_key]
            k, v = k.clone(), v.clone()
            k[aux_rows] = torch.nn.functional.linear(context[aux_rows], wk.to(k))
            v[aux_rows] = torch.nn.functional.linear(value[aux_rows], wv.to(v))
        if self.inner is not None:
            out = self.inner(q, k, v, extra_options)
        else:
            out = optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
        rows = extra_options.get(ROWS_KEY)
        if rows is None or run is None:
            return out
        c_rows, a_rows = rows
        plan = run.plan_for(k.shape[1], q.device)
        lam = run.settings.lam != 0.0
        w = run.settings.weights_qk(q[c_rows], k[c_rows], q[a_rows] if lam else None, k[a_rows] if lam else None,
                                    heads, plan)
        if self.inner is not None:  # another extension's output: not ours to change in place
            out = out.clone()
        out[c_rows] = blend_outputs(out[c_rows], out[a_rows], w.to(out.device), heads)
        return out


def patch_attention(model_patcher, aux_kv: bool) -> None:
    """Put a ``DBIMPatch`` on every cross-attention layer of ``model_patcher`` (a clone: setters mutate it)."""
    if aux_kv:
        model_patcher.set_model_attn2_patch(seams.stash_attn2_context)
    existing = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in cross_attention_layers(model_patcher):
        inner = existing.get(layer.patch_key) or existing.get(layer.block)
        if isinstance(inner, DBIMPatch):  # a MODEL from DCI Apply: one blend, not two
            inner = inner.inner
        model_patcher.set_model_attn2_replace(DBIMPatch(layer, inner), layer.block[0], layer.block[1], layer.depth)


def aux_kv_weights(aux_model, model) -> dict:
    """Per cross-attention layer of ``model``: ``aux_model``'s effective attn2 to_k/to_v weights (its own
    patches applied, e.g. the MODEL before DCI Load Concept: the base model's K/V)."""
    entries = aux_model.get_key_patches("diffusion_model.")
    out = {}
    for layer in cross_attention_layers(model):
        pair = []
        for name in ("to_k", "to_v"):
            key = layer.weight_prefix + name + ".weight"
            found = entries.get(key)
            if found is None:
                raise DCIError(f"aux_model has no cross-attention layer {layer.name} ({key}); connect a MODEL of "
                               "the same architecture, e.g. the checkpoint before DCI Load Concept")
            weight, convert = found[0]
            w = convert(weight).float().clone()
            if len(found) > 1:
                w = comfy.lora.calculate_weight(found[1:], w, key)
            if tuple(w.shape) != (layer.inner_dim, layer.context_dim):
                raise DCIError(f"aux_model's {key} is {tuple(w.shape)}, the model's is "
                               f"{(layer.inner_dim, layer.context_dim)}: not the same architecture")
            pair.append(w)
        out[layer.patch_key] = tuple(pair)
    return out
