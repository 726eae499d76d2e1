"""Locate a phrase in a prompt through a ComfyUI CLIP tokenizer: the one place that calls it for DBIM.

The prompt is tokenized exactly as ``CLIPTextEncode`` does it (weights, embeddings, chunking), once per
text encoder of the model ("l" for SD1; "g" and "l" for SDXL). The phrase is tokenized on its own with the
same tokenizer and matched on token ids (``dci.method.token_spans.find_phrase_spans``).

Matching the phrase on its own can miss an occurrence, because CLIP's tokenizer merges runs of punctuation
(``"dog."`` alone is ``dog .`` but ``"dog.,"`` in a prompt is ``dog .,``). So the matches are verified
against the phrase's whole-word occurrences in the text; when the ids find fewer, each occurrence is
located instead by tokenizing the prompt with that occurrence replaced by a marker word and taking the
tokens that differ (the common prefix and suffix of the two token streams are the untouched rest).

Long prompts are handled, not refused: the spans carry the chunk index, an occurrence that ComfyUI moved
across a chunk boundary gives two spans, and the per-chunk masks concatenate into a mask over the whole
encoded context (77 tokens per chunk), in the order the text encoder concatenates the chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..method.token_spans import (
    Chunk,
    ChunkMasks,
    SpecialTokens,
    Token,
    TokenSpan,
    chunk_masks,
    context_mask,
    find_phrase_spans,
    phrase_occurrences,
    phrase_tokens,
    real_tokens,
    same_token,
    spans_from_stream,
)

Tokenize = Callable[[str], dict[str, list[Chunk]]]

_MARKERS = ("zqxjv", "qvzkxw", "xqjzvk", "jxqvzw")
"""Nonsense words that replace one occurrence of the phrase when it has to be located by difference."""


@dataclass(frozen=True)
class PhraseTokens:
    """A phrase located in one text encoder's tokenization of a prompt."""

    encoder: str
    chunks: list[Chunk]
    spans: list[TokenSpan]
    masks: list[ChunkMasks]

    @property
    def prompt_mask(self) -> torch.Tensor:
        """Real prompt tokens over the whole encoded context [77 * chunks]."""
        return context_mask([m.prompt for m in self.masks])

    @property
    def phrase_mask(self) -> torch.Tensor:
        """The phrase's tokens over the whole encoded context [77 * chunks]."""
        return context_mask([m.phrase for m in self.masks])

    @property
    def occurrences(self) -> int:
        """How many times the phrase occurs in the prompt."""
        return len({s.occurrence for s in self.spans})


def _tokenize_fn(clip_or_tokenizer: Any) -> Tokenize:
    """A ``text -> {encoder: chunks}`` function with word ids, for a CLIP or its tokenizer."""
    if hasattr(clip_or_tokenizer, "tokenize_with_weights"):
        raw = clip_or_tokenizer.tokenize_with_weights
    elif hasattr(clip_or_tokenizer, "tokenize"):  # comfy.sd.CLIP: also applies its tokenizer options
        raw = clip_or_tokenizer.tokenize
    else:
        raise TypeError(f"expected a ComfyUI CLIP or its tokenizer, got {type(clip_or_tokenizer).__name__}")

    def tokenize(text: str) -> dict[str, list[Chunk]]:
        out = raw(text, return_word_ids=True)
        if not isinstance(out, dict):
            raise TypeError(
                "expected a model-level tokenizer that returns {encoder: chunks} (e.g. clip.tokenizer), "
                f"got {type(out).__name__} from {type(clip_or_tokenizer).__name__}"
            )
        return out

    return tokenize


def _special_tokens(clip_or_tokenizer: Any, encoder: str) -> SpecialTokens:
    """Start, end and pad ids of one encoder's tokenizer (a fallback: word ids already mark them)."""
    tokenizer = getattr(clip_or_tokenizer, "tokenizer", clip_or_tokenizer)
    sub = getattr(tokenizer, f"clip_{encoder}", None) or getattr(tokenizer, encoder, None)
    return SpecialTokens(
        getattr(sub, "start_token", None), getattr(sub, "end_token", None), getattr(sub, "pad_token", None)
    )


def _common_prefix(a: Sequence[Token], b: Sequence[Token], limit: int) -> int:
    n = 0
    while n < limit and same_token(a[n], b[n]):
        n += 1
    return n


def _locate_by_difference(
    tokenize: Tokenize, prompt: str, phrase: str, encoder: str, chunks: list[Chunk], special: SpecialTokens
) -> list[TokenSpan]:
    """Spans of each text occurrence, found by replacing it with a marker word and diffing the tokens."""
    stream = real_tokens(chunks, special)
    ids = [t for _, _, t in stream]
    marker = next(
        (
            m
            for m in _MARKERS
            if not any(same_token(t, u) for t in phrase_tokens(tokenize(m)[encoder], special) for u in ids)
        ),
        None,
    )
    if marker is None:  # every marker's tokens occur in the prompt: the difference would be ambiguous
        return []
    matches: list[tuple[int, int]] = []
    for start, end in phrase_occurrences(prompt, phrase):
        edited = phrase_tokens(tokenize(f"{prompt[:start]} {marker} {prompt[end:]}")[encoder], special)
        limit = min(len(ids), len(edited))
        prefix = _common_prefix(ids, edited, limit)
        suffix = _common_prefix(ids[::-1], edited[::-1], limit - prefix)
        if prefix < len(ids) - suffix:
            matches.append((prefix, len(ids) - suffix))
    return spans_from_stream(stream, matches)


def locate_phrase(clip_or_tokenizer: Any, prompt: str, phrase: str) -> dict[str, PhraseTokens]:
    """Spans and masks of ``phrase`` in ``prompt`` for every text encoder of the model.

    ``clip_or_tokenizer`` is a ``comfy.sd.CLIP`` (its tokenizer options apply, as in CLIPTextEncode) or its
    ``.tokenizer``. The concept branch calls this with the concept phrase ("sks dog"), the auxiliary branch
    with its own prompt and the auxiliary noun ("cat").

    Raises:
        ValueError: the phrase is empty or occurs in none of the encoders' tokens.
    """
    if not phrase.strip():
        raise ValueError("the phrase is empty; give the words that name the concept, e.g. 'sks dog'")
    tokenize = _tokenize_fn(clip_or_tokenizer)
    prompt_tokens = tokenize(prompt)
    phrase_chunks = tokenize(phrase.strip())
    in_text = len(phrase_occurrences(prompt, phrase))
    result: dict[str, PhraseTokens] = {}
    for encoder, chunks in prompt_tokens.items():
        special = _special_tokens(clip_or_tokenizer, encoder)
        wanted = phrase_tokens(phrase_chunks[encoder], special)
        spans = find_phrase_spans(chunks, wanted, special) if wanted else []
        found = len({s.occurrence for s in spans})
        if found < in_text:
            by_difference = _locate_by_difference(tokenize, prompt, phrase, encoder, chunks, special)
            if len({s.occurrence for s in by_difference}) > found:
                spans = by_difference
        if not spans:
            raise ValueError(
                f"the phrase {phrase!r} was not found in the tokens of the prompt {prompt!r} "
                f"(text encoder {encoder!r}); write it in the prompt as whole words, as in "
                "'a photo of sks dog'"
            )
        result[encoder] = PhraseTokens(encoder, list(chunks), spans, chunk_masks(chunks, spans, special))
    return result


def shared_context_masks(located: dict[str, PhraseTokens]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (prompt, phrase) masks over the cross-attention context of a multi-encoder model.

    SDXL concatenates the CLIP-L and CLIP-G outputs feature-wise, so both encoders' tokens share the
    context positions; their masks must agree, and a disagreement is an error rather than a guess.
    """
    if not located:
        raise ValueError("no text encoder results to combine")
    first, *rest = located.values()
    for other in rest:
        if not (
            torch.equal(first.prompt_mask, other.prompt_mask)
            and torch.equal(first.phrase_mask, other.phrase_mask)
        ):
            raise ValueError(
                f"text encoders {first.encoder!r} and {other.encoder!r} place the phrase at different tokens; "
                "their masks can't be shared over one context"
            )
    return first.prompt_mask, first.phrase_mask
