"""Where a phrase sits in a tokenized prompt, and the token masks DBIM needs.

ComfyUI's CLIP tokenizers return a prompt as a list of chunks (77 tokens each for SD1/SDXL); each entry is
``(token, weight)`` or ``(token, weight, word_id)``, where ``token`` is a vocabulary id (int) or an
embedding vector (``embedding:name`` in the prompt). The text encoder encodes every chunk and concatenates
them along the token axis, so a mask over the cross-attention context is the chunks' masks concatenated.

Matching is exact on token ids (and on embedding values), never on strings: the same word can be spelled
with different case, spacing or weight syntax and still be the same tokens. Everything here is pure Python
plus torch for the masks; ``dci.comfyui.phrase`` feeds it from a ComfyUI CLIP object.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

Token = Union[int, torch.Tensor]
"""A vocabulary id, or an embedding vector that ComfyUI put in place of an id."""

Chunk = Sequence[Sequence[Any]]
"""One chunk of ComfyUI tokenizer output: entries ``(token, weight[, word_id])``."""


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a tokenizer wraps every chunk with (None where it has no such token), and the chunk length.

    For SD1's CLIP-L: start 49406, end 49407, pad 49407, 77 tokens. SDXL's CLIP-G pads with id 0 (the "!"
    token), which is why real prompt tokens are found by position (between start and the first end token) and
    not by excluding the pad id.
    """

    start: int | None
    end: int | None
    pad: int | None
    length: int = 77


@dataclass(frozen=True)
class TokenSpan:
    """Tokens ``start:end`` of chunk ``chunk`` belong to occurrence number ``occurrence`` of a phrase.

    An occurrence that ComfyUI split across two chunks gives two spans with the same ``occurrence``.
    """

    chunk: int
    start: int
    end: int
    occurrence: int = 0


def token_of(entry: Sequence[Any]) -> Token:
    """The id or embedding of one tokenizer entry."""
    return entry[0]


def same_token(a: Token, b: Token) -> bool:
    """Exact equality of two tokens: ids by value, embeddings by shape and values, never id vs embedding."""
    a_t, b_t = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    if a_t or b_t:
        return a_t and b_t and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return int(a) == int(b)


def prompt_positions(chunk: Chunk, special: SpecialTokens) -> list[int]:
    """Indices of the real prompt tokens of one chunk (not start, end or padding).

    With word ids (``return_word_ids=True``) the tokenizer marks every special token with word id 0, which
    is exact. Without them the real tokens are those after the start token and before the first end token
    (or, for a tokenizer without an end token, before the trailing padding).
    """
    if len(chunk) and all(len(e) >= 3 for e in chunk):
        return [i for i, e in enumerate(chunk) if e[2] != 0]
    ids = [token_of(e) for e in chunk]
    begin = 1 if special.start is not None and ids and same_token(ids[0], special.start) else 0
    stop = len(ids)
    if special.end is not None:
        for i in range(begin, len(ids)):
            if same_token(ids[i], special.end):
                stop = i
                break
    elif special.pad is not None:
        while stop > begin and same_token(ids[stop - 1], special.pad):
            stop -= 1
    return list(range(begin, stop))


def real_tokens(chunks: Sequence[Chunk], special: SpecialTokens) -> list[tuple[int, int, Token]]:
    """The prompt's real tokens across all chunks as ``(chunk, position, token)``, in reading order."""
    return [
        (c, i, token_of(chunk[i])) for c, chunk in enumerate(chunks) for i in prompt_positions(chunk, special)
    ]


def phrase_tokens(chunks: Sequence[Chunk], special: SpecialTokens) -> list[Token]:
    """The real tokens of a tokenized phrase (tokenized on its own), without start, end or padding."""
    return [t for _, _, t in real_tokens(chunks, special)]


def spans_from_stream(
    stream: Sequence[tuple[int, int, Token]], matches: Sequence[tuple[int, int]]
) -> list[TokenSpan]:
    """Turn ``[begin, end)`` ranges of a ``real_tokens`` stream into per-chunk spans, one run per chunk."""
    spans: list[TokenSpan] = []
    for occ, (begin, end) in enumerate(matches):
        run_chunk, run_start, run_end = stream[begin][0], stream[begin][1], stream[begin][1] + 1
        for c, i, _ in stream[begin + 1 : end]:
            if c == run_chunk and i == run_end:
                run_end += 1
                continue
            spans.append(TokenSpan(run_chunk, run_start, run_end, occ))
            run_chunk, run_start, run_end = c, i, i + 1
        spans.append(TokenSpan(run_chunk, run_start, run_end, occ))
    return spans


def find_phrase_spans(
    chunks: Sequence[Chunk], phrase: Sequence[Token], special: SpecialTokens
) -> list[TokenSpan]:
    """Every occurrence of the token sequence ``phrase`` among the prompt's real tokens.

    Occurrences are found left to right without overlap, across chunk boundaries too (ComfyUI may move a
    word of a long prompt to the next chunk). Returns an empty list when there is none.
    """
    if len(phrase) == 0:
        raise ValueError("the phrase has no tokens; give the concept phrase as it appears in the prompt")
    stream = real_tokens(chunks, special)
    n = len(phrase)
    matches: list[tuple[int, int]] = []
    i = 0
    while i + n <= len(stream):
        if all(same_token(stream[i + j][2], phrase[j]) for j in range(n)):
            matches.append((i, i + n))
            i += n
        else:
            i += 1
    return spans_from_stream(stream, matches)


def prompt_mask(chunk: Chunk, special: SpecialTokens) -> torch.Tensor:
    """Boolean mask [T] of one chunk's real prompt tokens."""
    mask = torch.zeros(len(chunk), dtype=torch.bool)
    mask[prompt_positions(chunk, special)] = True
    return mask


def span_mask(length: int, spans: Sequence[TokenSpan], chunk: int) -> torch.Tensor:
    """Boolean mask [length] of chunk ``chunk`` that is true on the given spans."""
    mask = torch.zeros(length, dtype=torch.bool)
    for s in spans:
        if s.chunk == chunk:
            mask[s.start : s.end] = True
    return mask


@dataclass(frozen=True)
class ChunkMasks:
    """The masks of one chunk: real prompt tokens and the located phrase's tokens, each [T]."""

    prompt: torch.Tensor
    phrase: torch.Tensor


def chunk_masks(
    chunks: Sequence[Chunk], spans: Sequence[TokenSpan], special: SpecialTokens
) -> list[ChunkMasks]:
    """Per-chunk masks for a prompt and the spans of one phrase in it.

    The concept branch passes the concept phrase's spans (V* and the class noun), the auxiliary branch the
    auxiliary noun's spans; ``dbim.auxiliary_map_tokens`` derives the context tokens from those.
    """
    return [
        ChunkMasks(prompt_mask(chunk, special), span_mask(len(chunk), spans, c))
        for c, chunk in enumerate(chunks)
    ]


def context_mask(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-chunk masks into one mask over the encoded context, as the text encoder does."""
    return torch.cat(list(masks))


def tile_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a context mask to ``length`` tokens.

    When conds of different lengths share one UNet batch, ComfyUI repeats the shorter context up to the
    least common multiple of the lengths; the masks must be repeated the same way.
    """
    if length % mask.shape[-1] != 0:
        raise ValueError(f"context length {length} is not a multiple of the mask length {mask.shape[-1]}")
    return mask.repeat(length // mask.shape[-1])


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = phrase.split()
    if not words:
        raise ValueError("the concept phrase is empty; give the words that name the concept, e.g. 'sks dog'")
    # Whole word: no letter, digit or underscore right before or after (also right for phrases that start
    # or end with punctuation), and never the name of an `embedding:` reference.
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!embedding:)(?<![\w])({body})(?![\w])", re.IGNORECASE)


def phrase_occurrences(prompt: str, phrase: str) -> list[tuple[int, int]]:
    """Character ranges ``[start, end)`` of each whole-word, case-insensitive occurrence of ``phrase``.

    Runs of spaces inside the phrase or the prompt match any whitespace; weight syntax around the phrase
    (``(sks dog:1.2)``) is left outside the range, so replacing the range keeps the weight.
    """
    return [m.span(1) for m in _phrase_pattern(phrase).finditer(prompt)]


def replace_phrase(prompt: str, phrase: str, replacement: str) -> str:
    """The prompt with every occurrence of ``phrase`` replaced, e.g. the auxiliary branch's prompt.

    Only the phrase's own characters change; weight syntax anywhere in the prompt, including parentheses
    and a weight around the phrase itself, stays as it was.
    """
    spans = phrase_occurrences(prompt, phrase)
    if not spans:
        raise ValueError(
            f"the concept phrase {phrase!r} does not occur in the prompt {prompt!r}; write it in the prompt "
            "as whole words (case and extra spaces don't matter)"
        )
    out, last = [], 0
    for start, end in spans:
        out.append(prompt[last:start])
        out.append(replacement)
        last = end
    out.append(prompt[last:])
    return "".join(out)


AUX_NOUN_CANDIDATES = ("cat", "dog", "car", "chair", "cup", "bird")


def default_aux_noun(class_noun: str, prompt: str) -> str:
    """A common noun different from the class noun and absent from the prompt (the method's 'cat' example)."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", prompt)} | {class_noun.lower().strip()}
    for noun in AUX_NOUN_CANDIDATES:
        if noun not in words:
            return noun
    return "thing"
