"""Applying a concept to ComfyUI's MODEL and CLIP: the one place that patches them for concepts.

* K/V deltas become ``("diff", …)`` weight patches on a *clone* of the MODEL (ComfyUI adds them, scaled by
  the strength, when it loads the model; chained loaders add up).
* The trigger word goes into a *clone* of the CLIP (``tokenizer.add_trigger``).
* Infusion residual vectors become attn2 patches on the MODEL clone and the CLIP clone records where the
  trigger's tokens are (``infusion``).

Everything is checked before anything is patched: another family or architecture is refused with a message
naming both, other base weights of the same architecture give a warning.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from ..files.concept import Concept, ConceptFileError, architecture_id
from . import infusion
from .model import FAMILY_LABEL, config_name, cross_attention_layers, model_family
from .tokenizer import ConceptMismatchError, add_trigger, text_encoder_widths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptRef:
    """What the CONCEPT output carries: enough for the DCI sampler to find the concept in a prompt."""

    name: str
    trigger: str
    class_noun: str
    family: str
    num_tokens: int

    @property
    def phrase(self) -> str:
        return f"{self.trigger} {self.class_noun}"

    @classmethod
    def of(cls, name: str, concept: Concept) -> ConceptRef:
        return cls(name=name, trigger=concept.trigger, class_noun=concept.class_noun, family=concept.family,
                   num_tokens=concept.num_tokens)


# -- MODEL side ---------------------------------------------------------------------------------------------
def kv_weight_keys(model_patcher) -> list[str]:
    keys = []
    for layer in cross_attention_layers(model_patcher):
        keys += [layer.weight_prefix + "to_k.weight", layer.weight_prefix + "to_v.weight"]
    return keys


def base_kv_weights(model_patcher) -> dict[str, torch.Tensor]:
    """The MODEL's own attn2 K/V weights, before any patch ComfyUI may have applied in place."""
    wanted = set(kv_weight_keys(model_patcher))
    out = {}
    for key, entries in model_patcher.get_key_patches("diffusion_model.").items():
        if key in wanted:
            weight, convert = entries[0]
            out[key] = convert(weight)
    return out


def model_architecture(model_patcher) -> str:
    weights = base_kv_weights(model_patcher)
    return architecture_id({k: tuple(v.shape) for k, v in weights.items()})


def base_fingerprint(model_patcher) -> str:
    """Identifies the base weights a concept was trained on (K/V weights rounded to fp16, hashed)."""
    h = hashlib.sha256()
    for key, w in sorted(base_kv_weights(model_patcher).items()):
        h.update(key.encode())
        h.update(w.detach().to(torch.float16).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -- checks and patches ----------------------------------------------------------------------------------------
def check_compatible(concept: Concept, model_patcher, clip=None, name: str = "concept") -> list[str]:
    """Raise ConceptMismatchError for another family/architecture; return warnings (e.g. other base weights)."""
    family = model_family(model_patcher)
    if family != concept.family:
        raise ConceptMismatchError(
            f"{name} was trained for {FAMILY_LABEL.get(concept.family, concept.family)} but this "
            f"MODEL is {FAMILY_LABEL[family]} ({config_name(model_patcher)}); load it "
            f"on a {FAMILY_LABEL.get(concept.family, concept.family)} checkpoint"
        )
    warnings = []
    if concept.kv_deltas:
        arch = model_architecture(model_patcher)
        if arch != concept.architecture:
            raise ConceptMismatchError(
                f"{name} was trained for a {concept.family} UNet with cross-attention layout {concept.architecture}, "
                f"but this MODEL's layout is {arch} (same family, different architecture)"
            )
        if concept.base_fingerprint and concept.base_fingerprint != base_fingerprint(model_patcher):
            warnings.append(
                f"{name} was trained on other base weights (fingerprint {concept.base_fingerprint}); it loads, "
                "but may look different than on its own base model"
            )
    if concept.residuals:
        try:
            infusion.residual_layers(model_patcher, concept.residuals)
        except ValueError as e:
            raise ConceptMismatchError(f"{name}: {e}") from None
    if clip is not None and concept.tokens:
        widths = text_encoder_widths(clip)
        for enc, vec in concept.tokens.items():
            if enc not in widths:
                raise ConceptMismatchError(f"{name} has token embeddings for {enc}, which this CLIP does not have "
                                           f"(it has {', '.join(sorted(widths))})")
            if vec.shape[1] != widths[enc]:
                raise ConceptMismatchError(f"{name}'s {enc} token embeddings are {vec.shape[1]} wide; this CLIP's "
                                           f"{enc} is {widths[enc]} wide")
        missing = sorted(set(widths) - set(concept.tokens))
        if missing:
            raise ConceptMismatchError(f"{name} has no token embeddings for {', '.join(missing)} of this CLIP")
    return warnings


def apply_concept(concept: Concept, model_patcher, clip, strength_model: float = 1.0, strength_clip: float = 1.0,
                  name: str = "concept"):
    """Patched clones of MODEL and CLIP; the inputs are never modified. Returns (model, clip, warnings)."""
    warnings = check_compatible(concept, model_patcher, clip, name)
    for w in warnings:
        log.warning(w)
    model_out = model_patcher.clone()
    if concept.kv_deltas and strength_model != 0.0:
        patches = {key: ("diff", (delta,)) for key, delta in concept.kv_deltas.items()}
        added = model_out.add_patches(patches, strength_model)
        if len(added) != len(patches):
            raise ConceptFileError(f"{name}: {len(patches) - len(added)} key/value deltas match no weight of this MODEL")
    marks = infusion.Marks() if concept.residuals else None
    if marks is not None and strength_model != 0.0:
        model_out = infusion.patch_model(model_out, concept.residuals, marks, strength_model)
    clip_out = clip
    if clip is not None:
        clip_out = clip.clone()
        if concept.tokens and strength_clip != 0.0:
            clip_out = add_trigger(clip, concept.trigger, concept.tokens, strength_clip)
            if marks is not None:
                clip_out = infusion.mark_clip(clip_out, marks, clip_out.tokenizer.triggers[-1].vectors)
            for more in concept.more:  # a jointly trained file: every trigger is registered
                clip_out = add_trigger(clip_out, more.trigger, more.tokens, strength_clip)
    return model_out, clip_out, warnings
