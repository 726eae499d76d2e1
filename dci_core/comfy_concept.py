"""Applying a concept to ComfyUI's MODEL and CLIP: the one place that patches them for concepts.

* K/V deltas become ``("diff", …)`` weight patches on a *clone* of the MODEL (ComfyUI adds them, scaled by
  the strength, when it loads the model; chained loaders add up).
* The trigger word: a *clone* of the CLIP gets a tokenizer that rewrites each whole-word occurrence of the
  trigger into ComfyUI's own ``embedding:`` syntax for a private name, and resolves that name to the learned
  vectors (per text encoder). So the stock CLIPTextEncode produces the learned embeddings, prompts without
  the trigger go through the unchanged tokenizer code, and no other token's embedding changes.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from dataclasses import dataclass

import torch

from . import comfy_model
from .concept_format import Concept, ConceptFileError, architecture_id

log = logging.getLogger(__name__)

ENCODER_OF_TOKENIZER_KEY = {"l": "clip_l", "g": "clip_g"}


class ConceptMismatchError(ValueError):
    """The concept was made for another model family or architecture than the MODEL/CLIP given."""


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


# -- MODEL side ---------------------------------------------------------------------------------------------
def kv_weight_keys(model_patcher) -> list[str]:
    keys = []
    for layer in comfy_model.cross_attention_layers(model_patcher):
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


# -- CLIP side ----------------------------------------------------------------------------------------------
def _encoder_tokenizers(tokenizer) -> dict[str, object]:
    """Per-encoder tokenizers of a ComfyUI CLIP tokenizer, keyed by their embedding key (clip_l, clip_g)."""
    from comfy.sd1_clip import SDTokenizer

    return {sub.embedding_key: sub for sub in vars(tokenizer).values() if isinstance(sub, SDTokenizer)}


def text_encoder_widths(clip) -> dict[str, int]:
    """Width of every text encoder's token embeddings, read from the encoder itself."""
    widths = {}
    tokenizer = clip.tokenizer.base if isinstance(clip.tokenizer, ConceptTokenizer) else clip.tokenizer
    for enc in _encoder_tokenizers(tokenizer):
        te = getattr(clip.cond_stage_model, enc, None)
        if te is None:
            continue
        widths[enc] = te.transformer.get_input_embeddings().weight.shape[1]
    if not widths:
        raise ConceptMismatchError("this CLIP has no CLIP-L/CLIP-G text encoder this pack can add tokens to")
    return widths


@dataclass(frozen=True)
class _Trigger:
    word: str
    marker: str
    weight: float  # multiplies the prompt weight of the trigger's vectors
    vectors: dict[str, torch.Tensor]  # encoder → [k, width]


class ConceptTokenizer:
    """A CLIP tokenizer that knows trigger words; everything else is delegated to the wrapped one.

    Built anew for every loader from the original tokenizer and the full set of triggers, so chained loaders
    never wrap wrappers and the input CLIP's tokenizer is never touched.
    """

    def __init__(self, base, triggers: tuple[_Trigger, ...]):
        self.base = base
        self.triggers = triggers
        patched = copy.copy(base)
        for attr, sub in list(vars(base).items()):
            if sub in _encoder_tokenizers(base).values():
                setattr(patched, attr, self._with_resolver(sub))
        self._patched = patched
        self._pattern = re.compile(
            "|".join(rf"(?<![\w:]){re.escape(t.word)}(?!\w)" for t in triggers), flags=re.IGNORECASE
        ) if triggers else None

    def _with_resolver(self, sub):
        encoder = sub.embedding_key
        by_marker = {t.marker: t.vectors[encoder] for t in self.triggers if encoder in t.vectors}
        fallback = sub._try_get_embedding
        clone = copy.copy(sub)
        if clone.embedding_directory is None:
            # ComfyUI only parses `embedding:` when a directory is set; an empty list finds no files.
            clone.embedding_directory = []

        def resolve(embedding_name: str):
            first, _, leftover = embedding_name.strip().partition(" ")
            if first in by_marker:
                return by_marker[first], leftover.strip()
            return fallback(embedding_name)

        clone._try_get_embedding = resolve
        return clone

    def rewrite(self, text: str) -> str:
        """The prompt with every trigger replaced by the private ``embedding:`` name of its vectors."""
        if self._pattern is None:
            return text
        by_word = {t.word.lower(): t for t in self.triggers}

        def sub(m: re.Match) -> str:
            return f" embedding:{by_word[m.group(0).lower()].marker} "

        return self._pattern.sub(sub, text)

    def _scale_weights(self, tokenized: dict) -> dict:
        """Multiply the prompt weight of each trigger's vectors by its strength (0.5 in "(x:1.2)" → 0.6)."""
        scale = {}
        for t in self.triggers:
            if t.weight != 1.0:
                scale.update({v.untyped_storage().data_ptr(): t.weight for v in t.vectors.values()})
        if not scale:
            return tokenized

        def fix(tok):
            if isinstance(tok[0], torch.Tensor):
                w = scale.get(tok[0].untyped_storage().data_ptr())
                if w is not None:
                    return (tok[0], tok[1] * w, *tok[2:])
            return tok

        return {enc: [[fix(tok) for tok in chunk] for chunk in chunks] for enc, chunks in tokenized.items()}

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        rewritten = self.rewrite(text)
        if rewritten == text:
            return self.base.tokenize_with_weights(text, return_word_ids, **kwargs)
        return self._scale_weights(self._patched.tokenize_with_weights(rewritten, return_word_ids, **kwargs))

    def __getattr__(self, name):
        return getattr(self._patched, name)


def existing_triggers(clip) -> list[str]:
    tok = clip.tokenizer
    return [t.word for t in tok.triggers] if isinstance(tok, ConceptTokenizer) else []


def add_trigger(clip, word: str, vectors: dict[str, torch.Tensor], weight: float = 1.0):
    """A clone of ``clip`` whose tokenizer turns ``word`` into ``vectors``; ``clip`` itself is unchanged."""
    if word.lower() in (w.lower() for w in existing_triggers(clip)):
        raise ConceptMismatchError(f"the trigger word {word!r} is already used by another concept loaded on this "
                                   "CLIP; give each concept its own trigger")
    out = clip.clone()
    old = clip.tokenizer
    base, triggers = (old.base, old.triggers) if isinstance(old, ConceptTokenizer) else (old, ())
    marker = f"dci__concept__{len(triggers)}"
    own = {enc: v.detach().clone() for enc, v in vectors.items()}  # own storage: identifies them in _scale_weights
    out.tokenizer = ConceptTokenizer(base, (*triggers, _Trigger(word, marker, float(weight), own)))
    return out


# -- both -------------------------------------------------------------------------------------------------------
def check_compatible(concept: Concept, model_patcher, clip=None, name: str = "concept") -> list[str]:
    """Raise ConceptMismatchError for another family/architecture; return warnings (e.g. other base weights)."""
    family = comfy_model.model_family(model_patcher)
    if family != concept.family:
        raise ConceptMismatchError(
            f"{name} was trained for {comfy_model.FAMILY_LABEL.get(concept.family, concept.family)} but this "
            f"MODEL is {comfy_model.FAMILY_LABEL[family]} ({comfy_model.config_name(model_patcher)}); load it "
            f"on a {comfy_model.FAMILY_LABEL.get(concept.family, concept.family)} checkpoint"
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
    clip_out = clip
    if clip is not None:
        clip_out = clip.clone()
        if concept.tokens and strength_clip != 0.0:
            clip_out = add_trigger(clip, concept.trigger, concept.tokens, strength_clip)
    return model_out, clip_out, warnings
