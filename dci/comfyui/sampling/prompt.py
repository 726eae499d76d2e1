"""DCI Prompt Encode's work: the concept prompt's conditioning, carrying what the auxiliary branch needs.

The positive CONDITIONING is exactly what CLIPTextEncode gives for the prompt (so it also works with the stock
samplers); its options dict carries one extra entry, ``COND_KEY``, with the auxiliary prompt's conditioning and
the token masks DBIM needs. The masks come from the CLIP's own tokenization (``phrase.locate_phrase``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...method.branches import stack_branches
from ...method.token_spans import replace_phrase
from ..phrase import locate_phrase, shared_context_masks

COND_KEY = "dci"  # the conditioning-dict entry DCI Prompt Encode adds


class DCIError(ValueError):
    """A DCI input is missing or inconsistent; the message says what to change."""


@dataclass
class DCIPrompt:
    """The auxiliary branch's conditioning and the token masks DBIM needs, carried inside CONDITIONING."""

    phrase: str
    aux_noun: str
    aux_prompt: str
    aux_cond: torch.Tensor  # [1, T_a, D]
    aux_pooled: torch.Tensor | None
    concept_mask: torch.Tensor  # [T_c] bool: tokens of the concept phrase
    prompt_mask: torch.Tensor  # [T_c] bool: real prompt tokens of the concept prompt
    aux_noun_mask: torch.Tensor  # [T_a] bool
    aux_prompt_mask: torch.Tensor  # [T_a] bool


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


def encode_dci_prompt(clip, text: str, phrase: str, aux_noun: str) -> list:
    """The concept prompt's CONDITIONING (as CLIPTextEncode makes it) carrying the auxiliary branch's data."""
    phrase = " ".join(phrase.split())
    aux_noun = " ".join(aux_noun.split())
    if not phrase:
        raise DCIError("no concept phrase: connect the concept from DCI Load Concept or type the phrase "
                       "(trigger word and class noun, e.g. 'sks dog')")
    if not aux_noun:
        raise DCIError("the auxiliary noun is empty")
    if aux_noun.lower() == phrase.lower():
        raise DCIError("the auxiliary noun must differ from the concept phrase")
    try:
        aux_prompt = replace_phrase(text, phrase, aux_noun)
    except ValueError:
        raise DCIError(f"the concept phrase {phrase!r} is not in the prompt {text!r}: write it there as whole "
                       f"words, e.g. 'a photo of {phrase} on the beach'") from None
    prompt_mask, concept_mask = shared_context_masks(locate_phrase(clip, text, phrase))
    aux_prompt_mask, aux_noun_mask = shared_context_masks(locate_phrase(clip, aux_prompt, aux_noun))
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
        phrase=phrase, aux_noun=aux_noun, aux_prompt=aux_prompt, aux_cond=aux_cond,
        aux_pooled=aux_extras.get("pooled_output"), concept_mask=concept_mask, prompt_mask=prompt_mask,
        aux_noun_mask=aux_noun_mask, aux_prompt_mask=aux_prompt_mask,
    )
    return [[cond, {**extras, COND_KEY: data}]]
