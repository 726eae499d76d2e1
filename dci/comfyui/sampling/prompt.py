"""DCI Prompt Encode's work: the concept prompt's conditioning, carrying what the auxiliary branch needs.

The positive CONDITIONING is exactly what CLIPTextEncode gives for the prompt (so it also works with the stock
samplers); its options dict carries one extra entry, ``COND_KEY``, with the auxiliary prompt's conditioning and
the token masks DBIM needs. The masks come from the CLIP's own tokenization (``phrase.locate_phrase``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...method.branches import stack_branches
from ...method.token_spans import phrase_occurrences, replace_phrase
from ..phrase import locate_phrase, shared_context_masks

COND_KEY = "dci"  # the conditioning-dict entry DCI Prompt Encode adds


class DCIError(ValueError):
    """A DCI input is missing or inconsistent; the message says what to change."""


CONCEPT_MAPS = ("separate", "union")
"""How DBIM protects several concepts of one prompt: "separate": each concept's own map, spatially normalised
on its own, and the strongest one at each pixel; "union": one map of all the concepts' tokens together."""


@dataclass
class DCIPrompt:
    """The auxiliary branch's conditioning and the token masks DBIM needs, carried inside CONDITIONING."""

    phrase: str
    aux_noun: str
    aux_prompt: str
    aux_cond: torch.Tensor  # [1, T_a, D]
    aux_pooled: torch.Tensor | None
    concept_mask: torch.Tensor  # [T_c] bool: tokens of the concept phrase (of every concept's phrase)
    prompt_mask: torch.Tensor  # [T_c] bool: real prompt tokens of the concept prompt
    aux_noun_mask: torch.Tensor  # [T_a] bool (every auxiliary noun's tokens)
    aux_prompt_mask: torch.Tensor  # [T_a] bool
    concept_masks: tuple[torch.Tensor, ...] = ()  # [T_c] bool per concept, when there are several
    maps: str = "separate"  # one of CONCEPT_MAPS, for several concepts

    @property
    def dbim_concepts(self) -> list[torch.Tensor]:
        """The concept masks DBIM protects one by one: one per concept ("separate"), else their union."""
        if self.maps == "separate" and len(self.concept_masks) > 1:
            return list(self.concept_masks)
        return [self.concept_mask]


def dci_prompt_of(positive) -> tuple[list, DCIPrompt]:
    """The single positive conditioning entry and its DCI data; clear errors otherwise."""
    if not isinstance(positive, list) or not positive:
        raise DCIError("'positive' must be a CONDITIONING")
    entries = [c for c in positive if isinstance(c, (list, tuple)) and len(c) == 2 and COND_KEY in c[1]]
    if not entries:
        raise DCIError("'positive' must come from a DCI Prompt Encode node (it carries the concept's tokens and "
                       "the auxiliary prompt); a plain CLIPTextEncode has no auxiliary branch")
    if len(positive) != 1:
        raise DCIError("DCI needs exactly one positive conditioning entry from DCI Prompt Encode; combined, "
                       "concatenated or area conditioning is not supported for the two-branch phase")
    return positive[0], positive[0][1][COND_KEY]


def mixed_positive(positive, batch: int) -> tuple[list, DCIPrompt, int]:
    """One cond whose context rows are [concept × B, auxiliary × B] (contexts repeated to a common length)."""
    (cond, extras), data = dci_prompt_of(positive)
    mixed, length = stack_branches(cond, data.aux_cond, batch)
    out = {k: v for k, v in extras.items() if k != COND_KEY}
    pooled = extras.get("pooled_output")
    if pooled is not None:
        aux_pooled = data.aux_pooled if data.aux_pooled is not None else pooled
        out["pooled_output"] = torch.cat([pooled.repeat(batch, 1), aux_pooled.to(pooled).repeat(batch, 1)])
    return [[mixed, out]], data, length


def _encode(clip, text: str):
    """Exactly what the stock CLIPTextEncode returns for ``text``."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _clean(phrase: str) -> str:
    return " ".join(phrase.split())


def encode_dci_prompt(clip, text: str, phrase: str, aux_noun: str, more: tuple[tuple[str, str], ...] = (),
                      maps: str = "separate") -> list:
    """The concept prompt's CONDITIONING (as CLIPTextEncode makes it) carrying the auxiliary branch's data.

    ``more``: further (phrase, auxiliary noun) pairs, one per further concept in the same prompt; ``maps``: how
    DBIM protects several concepts (``CONCEPT_MAPS``).
    """
    pairs = [(_clean(phrase), _clean(aux_noun)), *((_clean(p), _clean(a)) for p, a in more)]
    if not pairs[0][0]:
        raise DCIError("no concept phrase: connect the concept from DCI Load Concept or type the phrase "
                       "(trigger word and class noun, e.g. 'sks dog')")
    if maps not in CONCEPT_MAPS:
        raise DCIError(f"concept_maps must be one of {CONCEPT_MAPS}; got {maps!r}")
    phrases = [p.lower() for p, _ in pairs]
    if len(set(phrases)) != len(phrases):
        raise DCIError("the same concept phrase is given twice; each concept needs its own phrase")
    concept_masks, prompt_mask = [], None
    for p, a in pairs:
        if not a:
            raise DCIError(f"the auxiliary noun of {p!r} is empty")
        if a.lower() in phrases:
            raise DCIError(f"the auxiliary noun {a!r} must differ from the concept phrases")
        if not phrase_occurrences(text, p):
            raise DCIError(f"the concept phrase {p!r} is not in the prompt {text!r}: write it there as whole "
                           f"words, e.g. 'a photo of {p} on the beach'")
        prompt_mask, mask = shared_context_masks(locate_phrase(clip, text, p))
        if any(bool((mask & other).any()) for other in concept_masks):
            raise DCIError(f"the concept phrase {p!r} overlaps another concept's phrase in the prompt; give "
                           "phrases that name different words")
        concept_masks.append(mask)
    aux_prompt = text
    for p, a in pairs:
        aux_prompt = replace_phrase(aux_prompt, p, a)
    aux_noun_mask = None
    for a in dict.fromkeys(a for _, a in pairs):
        aux_prompt_mask, mask = shared_context_masks(locate_phrase(clip, aux_prompt, a))
        aux_noun_mask = mask if aux_noun_mask is None else aux_noun_mask | mask
    concept_mask = torch.stack(concept_masks).any(0)
    positive = _encode(clip, text)
    auxiliary = _encode(clip, aux_prompt)
    if len(positive) != 1 or len(auxiliary) != 1:
        raise DCIError("scheduled text-encoder hooks are not supported by DCI Prompt Encode")
    cond, extras = positive[0]
    aux_cond, aux_extras = auxiliary[0]
    if cond.shape[1] != concept_mask.shape[0] or aux_cond.shape[1] != aux_noun_mask.shape[0]:
        raise DCIError(f"token masks ({concept_mask.shape[0]}, {aux_noun_mask.shape[0]}) do not match the "
                       f"encoded lengths ({cond.shape[1]}, {aux_cond.shape[1]})")
    data = DCIPrompt(
        phrase=pairs[0][0], aux_noun=pairs[0][1], aux_prompt=aux_prompt, aux_cond=aux_cond,
        aux_pooled=aux_extras.get("pooled_output"), concept_mask=concept_mask, prompt_mask=prompt_mask,
        aux_noun_mask=aux_noun_mask, aux_prompt_mask=aux_prompt_mask,
        concept_masks=tuple(concept_masks) if len(pairs) > 1 else (), maps=maps,
    )
    return [[cond, {**extras, COND_KEY: data}]]
