"""The trigger word: a CLIP tokenizer wrapper that turns it into the concept's learned vectors.

A *clone* of the CLIP gets a tokenizer that rewrites each whole-word occurrence of the trigger into ComfyUI's
own ``embedding:`` syntax for a private name, and resolves that name to the learned vectors (per text encoder).
So the stock CLIPTextEncode produces the learned embeddings, prompts without the trigger go through the
unchanged tokenizer, no other token's embedding changes, and the input CLIP's tokenizer is never touched.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from . import seams


class ConceptMismatchError(ValueError):
    """The concept was made for another model family or architecture than the MODEL/CLIP given."""


@dataclass(frozen=True)
class Trigger:
    word: str
    marker: str
    weight: float  # multiplies the prompt weight of the trigger's vectors
    vectors: dict[str, torch.Tensor]  # encoder → [k, width]


class ConceptTokenizer:
    """A CLIP tokenizer that knows trigger words; everything else is delegated to the wrapped one.

    Built anew for every loader from the original tokenizer and the full set of triggers, so chained loaders
    never wrap wrappers.
    """

    def __init__(self, base, triggers: tuple[Trigger, ...]):
        self.base = base
        self.triggers = triggers
        patched = copy.copy(base)
        subs = seams.encoder_tokenizers(base)
        for attr, sub in list(vars(base).items()):
            if sub in subs.values():
                setattr(patched, attr, self._with_resolver(sub))
        self._patched = patched
        self._pattern = re.compile(
            "|".join(rf"(?<![\w:]){re.escape(t.word)}(?!\w)" for t in triggers), flags=re.IGNORECASE
        ) if triggers else None

    def _with_resolver(self, sub):
        by_marker = {t.marker: t.vectors[sub.embedding_key] for t in self.triggers if sub.embedding_key in t.vectors}

        def resolve(embedding_name: str, fallback):
            first, _, leftover = embedding_name.strip().partition(" ")
            if first in by_marker:
                return by_marker[first], leftover.strip()
            return fallback(embedding_name)

        return seams.with_embedding_resolver(sub, resolve)

    def rewrite(self, text: str) -> str:
        """The prompt with every trigger replaced by the private ``embedding:`` name of its vectors."""
        if self._pattern is None:
            return text
        by_word = {t.word.lower(): t for t in self.triggers}
        return self._pattern.sub(lambda m: f" embedding:{by_word[m.group(0).lower()].marker} ", text)

    def _scale_weights(self, tokenized: dict) -> dict:
        """Multiply the prompt weight of each trigger's vectors by its strength (0.5 in "(x:1.2)" → 0.6)."""
        scale = {}
        for t in self.triggers:
            if t.weight != 1.0:
                scale.update({seams.storage_key(v): t.weight for v in t.vectors.values()})
        if not scale:
            return tokenized

        def fix(tok):
            if isinstance(tok[0], torch.Tensor):
                w = scale.get(seams.storage_key(tok[0]))
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


def base_tokenizer(clip):
    """The CLIP's own tokenizer, under any trigger wrapper."""
    return clip.tokenizer.base if isinstance(clip.tokenizer, ConceptTokenizer) else clip.tokenizer


def text_encoder_widths(clip) -> dict[str, int]:
    """Width of every text encoder's token embeddings, read from the encoder itself."""
    widths = {}
    for enc in seams.encoder_tokenizers(base_tokenizer(clip)):
        te = getattr(clip.cond_stage_model, enc, None)
        if te is not None:
            widths[enc] = te.transformer.get_input_embeddings().weight.shape[1]
    if not widths:
        raise ConceptMismatchError("this CLIP has no CLIP-L/CLIP-G text encoder this pack can add tokens to")
    return widths


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
    out.tokenizer = ConceptTokenizer(base, (*triggers, Trigger(word, marker, float(weight), own)))
    return out
