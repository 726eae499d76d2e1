"""Token spans and masks: pure functions on synthetic chunks, then ComfyUI's real SD1/SDXL tokenizers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from dci.method.token_spans import (
    SpecialTokens,
    TokenSpan,
    chunk_masks,
    context_mask,
    find_phrase_spans,
    phrase_occurrences,
    prompt_positions,
    replace_phrase,
    tile_mask,
)

SOS, EOS = 49406, 49407
SD1 = SpecialTokens(start=SOS, end=EOS, pad=EOS)


def _chunk(ids: list[int], length: int = 10, pad: int = EOS, word_ids: bool = False) -> list[tuple]:
    body = [SOS, *ids, EOS]
    body += [pad] * (length - len(body))
    if not word_ids:
        return [(t, 1.0) for t in body]
    return [(t, 1.0, 0 if i == 0 or i > len(ids) else 1) for i, t in enumerate(body)]


# --- pure functions -------------------------------------------------------------------------------------


def test_spans_at_start_middle_end_and_repeated() -> None:
    phrase = [7, 8]
    assert find_phrase_spans([_chunk([7, 8, 1, 2])], phrase, SD1) == [TokenSpan(0, 1, 3, 0)]
    assert find_phrase_spans([_chunk([1, 7, 8, 2])], phrase, SD1) == [TokenSpan(0, 2, 4, 0)]
    assert find_phrase_spans([_chunk([1, 2, 7, 8])], phrase, SD1) == [TokenSpan(0, 3, 5, 0)]
    assert find_phrase_spans([_chunk([7, 8, 7, 8, 7])], phrase, SD1) == [
        TokenSpan(0, 1, 3, 0),
        TokenSpan(0, 3, 5, 1),
    ]
    assert find_phrase_spans([_chunk([7, 1, 8])], phrase, SD1) == []


def test_special_tokens_never_match() -> None:
    # A phrase made of the end/pad id must not match the padding.
    assert find_phrase_spans([_chunk([1, 2])], [EOS], SD1) == []
    # SDXL's CLIP-G pads with id 0, which is also a real token ("!"): only tokens before EOS count.
    g = SpecialTokens(start=SOS, end=EOS, pad=0)
    chunk = _chunk([0, 5], pad=0)
    assert prompt_positions(chunk, g) == [1, 2]
    assert find_phrase_spans([chunk], [0], g) == [TokenSpan(0, 1, 2, 0)]


def test_word_ids_mark_prompt_tokens() -> None:
    chunk = _chunk([4, 5, 6], word_ids=True)
    assert prompt_positions(chunk, SpecialTokens(None, None, None)) == [1, 2, 3]


def test_embedding_tokens_match_by_value() -> None:
    emb = torch.arange(4.0)
    chunk = [(SOS, 1.0), (3, 1.0), (emb.clone(), 1.0), (9, 1.0), (EOS, 1.0)]
    assert find_phrase_spans([chunk], [emb, 9], SD1) == [TokenSpan(0, 2, 4, 0)]
    assert find_phrase_spans([chunk], [emb + 1, 9], SD1) == []


def test_span_across_chunks_and_masks() -> None:
    first = _chunk([1, 2, 3, 7], length=6)  # SOS 1 2 3 7 EOS
    second = _chunk([8, 4], length=6)
    spans = find_phrase_spans([first, second], [7, 8], SD1)
    assert spans == [TokenSpan(0, 4, 5, 0), TokenSpan(1, 1, 2, 0)]
    masks = chunk_masks([first, second], spans, SD1)
    assert context_mask([m.prompt for m in masks]).tolist() == [0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0]
    assert context_mask([m.phrase for m in masks]).tolist() == [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]
    assert tile_mask(masks[0].phrase, 12).tolist() == [0, 0, 0, 0, 1, 0] * 2
    with pytest.raises(ValueError, match="multiple"):
        tile_mask(masks[0].phrase, 8)


def test_empty_phrase_is_an_error() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        find_phrase_spans([_chunk([1])], [], SD1)


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("sks dog swimming", "cat swimming"),
        ("a photo of SKS  Dog in a pool", "a photo of cat in a pool"),
        ("a (red:1.2) ball and sks dog", "a (red:1.2) ball and cat"),
        ("a photo of (sks dog:1.3), ((sunset))", "a photo of (cat:1.3), ((sunset))"),
        ("sks dog and sks dog", "cat and cat"),
        ("sks dog.", "cat."),
    ],
)
def test_replace_phrase(prompt: str, expected: str) -> None:
    assert replace_phrase(prompt, "sks dog", "cat") == expected


def test_replace_phrase_whole_words_only() -> None:
    with pytest.raises(ValueError, match="does not occur"):
        replace_phrase("a photo of sks dogs", "sks dog", "cat")
    with pytest.raises(ValueError, match="does not occur"):
        replace_phrase("a photo of a cat", "sks dog", "cat")
    assert replace_phrase("embedding:dog and a dog", "dog", "cat") == "embedding:dog and a cat"
    assert replace_phrase("a photo of V* dog", "v* dog", "cat") == "a photo of cat"
    assert phrase_occurrences("x sks\tdog", " sks dog ") == [(2, 9)]


# --- ComfyUI's real tokenizers ----------------------------------------------------------------------------

COMFYUI_DIR = Path(os.environ.get("DCI_COMFYUI_DIR", "/tmp/ctest/ComfyUI"))
needs_comfy = pytest.mark.skipif(
    not (COMFYUI_DIR / "comfy" / "sd1_clip.py").is_file(),
    reason=f"no ComfyUI tree at {COMFYUI_DIR} (set DCI_COMFYUI_DIR or build it with dev/host.py)",
)


@pytest.fixture(scope="module")
def comfy_tokenizers():
    if str(COMFYUI_DIR) not in sys.path:
        sys.path.insert(0, str(COMFYUI_DIR))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from comfy.sd1_clip import SD1Tokenizer
    from comfy.sdxl_clip import SDXLTokenizer

    return SD1Tokenizer(), SDXLTokenizer()


@pytest.fixture
def sd1(comfy_tokenizers):
    return comfy_tokenizers[0]


def _ids(tokenizer, text: str) -> list[int]:
    return [t for t, _ in tokenizer.tokenize_with_weights(text)["l"][0]]


def _decoded(tokenizer, located, encoder: str = "l") -> list[str]:
    inv = tokenizer.clip_l.inv_vocab
    r = located[encoder]
    return [inv[r.chunks[s.chunk][i][0]] for s in r.spans for i in range(s.start, s.end)]


@needs_comfy
@pytest.mark.parametrize(
    "prompt,start",
    [
        ("sks dog swimming in a pool", 1),
        ("a photo of sks dog swimming", 4),
        ("a photo of a happy sks dog", 6),
        ("a (red:1.2) ball, (sks dog:1.1) on ((grass))", 5),
    ],
)
def test_real_tokenizer_start_middle_end_and_weights(sd1, prompt: str, start: int) -> None:
    from dci.comfyui.phrase import locate_phrase

    located = locate_phrase(sd1, prompt, "sks dog")
    r = located["l"]
    assert list(located) == ["l"]
    assert r.spans == [TokenSpan(0, start, start + 2, 0)]
    assert _decoded(sd1, located) == ["sks</w>", "dog</w>"]
    assert r.phrase_mask.shape == r.prompt_mask.shape == (77,)
    assert int(r.phrase_mask.sum()) == 2 and not r.prompt_mask[0] and bool(r.prompt_mask[1])
    assert bool((r.phrase_mask & ~r.prompt_mask).sum() == 0)


@needs_comfy
def test_real_tokenizer_repeated_words(sd1) -> None:
    from dci.comfyui.phrase import locate_phrase

    r = locate_phrase(sd1, "sks dog and another dog next to sks dog", "sks dog")["l"]
    assert r.occurrences == 2
    assert [(s.start, s.end) for s in r.spans] == [(1, 3), (8, 10)]
    dog = locate_phrase(sd1, "sks dog and another dog", "dog")["l"]
    assert [(s.start, s.end) for s in dog.spans] == [(2, 3), (5, 6)]


@needs_comfy
def test_real_tokenizer_phrase_absent(sd1) -> None:
    from dci.comfyui.phrase import locate_phrase

    with pytest.raises(ValueError, match="not found in the tokens"):
        locate_phrase(sd1, "a photo of a cat", "sks dog")
    with pytest.raises(ValueError, match="empty"):
        locate_phrase(sd1, "a photo of a cat", "  ")


@needs_comfy
def test_real_tokenizer_punctuation_merged_at_the_boundary(sd1) -> None:
    from dci.comfyui.phrase import locate_phrase

    # Alone, "dog." is `dog .`; inside "dog.," CLIP merges the punctuation into one `.,` token.
    assert _ids(sd1, "dog.,")[2] != _ids(sd1, "dog.")[2]
    located = locate_phrase(sd1, "a photo of sks dog., in a pool", "sks dog.")
    assert _decoded(sd1, located) == ["sks</w>", "dog</w>", ".,</w>"]
    # A phrase that starts and ends with punctuation, the end merged with the prompt's full stop.
    located = locate_phrase(sd1, "a dog next to V*.", "V*")
    assert _decoded(sd1, located) == ["v</w>", "*.</w>"]
    located = locate_phrase(sd1, "a photo of V* dog, swimming", "v* dog")
    assert _decoded(sd1, located) == ["v</w>", "*</w>", "dog</w>"]


@needs_comfy
def test_real_tokenizer_long_prompt_spans_carry_the_chunk(sd1) -> None:
    from dci.comfyui.phrase import locate_phrase

    filler = " ".join(["a"] * 80)
    r = locate_phrase(sd1, f"{filler} sks dog", "sks dog")["l"]
    assert len(r.chunks) == 2
    assert r.spans == [TokenSpan(1, 6, 8, 0)]
    assert r.phrase_mask.shape == (154,) and r.phrase_mask.nonzero().flatten().tolist() == [77 + 6, 77 + 7]
    # ComfyUI cuts a long weighted segment at 75 tokens, which can split the phrase between two chunks.
    straddle = locate_phrase(sd1, " ".join(["a"] * 74) + " sks dog", "sks dog")["l"]
    assert straddle.spans == [TokenSpan(0, 75, 76, 0), TokenSpan(1, 1, 2, 0)]
    assert straddle.occurrences == 1


@needs_comfy
def test_sdxl_encoders_agree_and_a_clip_object_works(comfy_tokenizers) -> None:
    from dci.comfyui.phrase import locate_phrase, shared_context_masks

    sdxl = comfy_tokenizers[1]
    located = locate_phrase(sdxl, "a photo of sks dog on a beach!", "sks dog")
    assert set(located) == {"g", "l"}
    prompt, phrase = shared_context_masks(located)
    assert phrase.nonzero().flatten().tolist() == [4, 5]
    assert prompt.nonzero().flatten().tolist() == list(range(1, 10))  # "!" is real even though G pads with 0

    class FakeClip:  # the part of comfy.sd.CLIP that locate_phrase uses
        tokenizer = sdxl

        def tokenize(self, text: str, return_word_ids: bool = False, **kwargs):
            return sdxl.tokenize_with_weights(text, return_word_ids, **kwargs)

    via_clip = locate_phrase(FakeClip(), "a photo of sks dog on a beach!", "sks dog")
    assert via_clip["g"].spans == located["g"].spans
