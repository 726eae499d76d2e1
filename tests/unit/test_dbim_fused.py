"""The fused, chunk-wise DBIM path (``DBIMSettings.plan`` + ``weights_qk``) against the explicit one.

The sampler's attention patch computes the blend weight from q and k one pixel chunk at a time, without the
full probability tensor P. It must give the weights of ``attention_probs`` + ``DBIMSettings.weights`` (the path
the loop re-computation and the reference restatement pin) to float32 rounding, at every chunk size, and reject
the same bad masks with the same messages.
"""

from __future__ import annotations

import pytest
import torch

from dci.method.dbim import DBIMSettings, attention_probs, token_maps

T = 20


def _masks(two_concepts: bool = False):
    prompt = torch.zeros(T, dtype=torch.bool)
    prompt[1:11] = True  # SOS at 0, EOS at 11, padding after
    concept = torch.zeros(T, dtype=torch.bool)
    concept[4:6] = True
    second = torch.zeros(T, dtype=torch.bool)
    second[8] = True
    aux_prompt = torch.zeros(T, dtype=torch.bool)
    aux_prompt[1:9] = True
    aux_noun = torch.zeros(T, dtype=torch.bool)
    aux_noun[4] = True
    return dict(concept_tokens=[concept, second] if two_concepts else concept, aux_noun_tokens=aux_noun,
                prompt_tokens_c=prompt, prompt_tokens_a=aux_prompt)


def _qk(rows: int, n: int, heads: int, d: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(rows, n, heads * d, generator=gen)).to(dtype)
    k = (2 * torch.randn(rows, T, heads * d, generator=gen)).to(dtype)
    return q, k


@pytest.mark.parametrize("lam", [0.0, 1.0, -2.0])
@pytest.mark.parametrize("reading", ["reference", "noun"])
@pytest.mark.parametrize("normalization", ["reference", "pixel_count"])
@pytest.mark.parametrize("two_concepts", [False, True])
def test_fused_weights_match_the_explicit_path(lam, reading, normalization, two_concepts) -> None:
    heads, n = 4, 64
    settings = DBIMSettings(lam=lam, reading=reading, normalization=normalization)
    masks = _masks(two_concepts)
    q_c, k_c = _qk(2, n, heads, 8, seed=1)
    q_a, k_a = _qk(2, n, heads, 8, seed=2)
    expected = settings.weights(attention_probs(q_c, k_c, heads), attention_probs(q_a, k_a, heads), **masks)
    plan = settings.plan(**masks)
    for chunk in (None, 1, 7, n):
        got = settings.weights_qk(q_c, k_c, q_a, k_a, heads, plan, chunk_size=chunk)
        assert got.shape == (2, heads, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, torch.full_like(expected, float(expected.mean())), atol=1e-3)


def test_token_maps_are_chunk_independent_and_accept_half_inputs() -> None:
    """Each pixel's map depends on that pixel's query only, so every chunking gives the same map (to float32
    rounding: the matrix product's blocking follows the chunk); fp16 q/k are promoted to float32 like
    ``attention_probs`` does."""
    heads, n = 2, 50
    masks = _masks()
    plan = DBIMSettings().plan(**masks)
    q, k = _qk(1, n, heads, 16, seed=3, dtype=torch.float16)
    whole = token_maps(q, k, heads, plan.prompt_c, plan.concepts, 10.0, chunk_size=n)[0]
    for chunk in (1, 3, 16):
        got = token_maps(q, k, heads, plan.prompt_c, plan.concepts, 10.0, chunk_size=chunk)[0]
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-7)
    p = attention_probs(q, k, heads)  # [1, H, N, T], float32
    sharp = torch.softmax(10.0 * p[..., masks["prompt_tokens_c"]], dim=-1)
    in_prompt = masks["concept_tokens"][masks["prompt_tokens_c"]]
    torch.testing.assert_close(whole, sharp[..., in_prompt].sum(-1), rtol=1e-5, atol=1e-6)


def test_plan_rejects_what_dbim_weights_rejects() -> None:
    masks = _masks()
    with pytest.raises(ValueError, match="concept mask is empty"):
        DBIMSettings().plan(**{**masks, "concept_tokens": torch.zeros(T, dtype=torch.bool)})
    outside = torch.zeros(T, dtype=torch.bool)
    outside[15] = True  # padding, not a prompt token
    with pytest.raises(ValueError, match="concept mask is empty"):
        DBIMSettings().plan(**{**masks, "concept_tokens": outside})
    with pytest.raises(ValueError, match="no real prompt tokens"):
        DBIMSettings().plan(**{**masks, "prompt_tokens_c": torch.zeros(T, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not among the auxiliary prompt's tokens"):
        DBIMSettings(lam=1.0, reading="noun").plan(**{**masks, "aux_noun_tokens": torch.zeros(T, dtype=torch.bool)})
    with pytest.raises(ValueError, match="lam != 0 needs"):
        DBIMSettings(lam=1.0).plan(**{**masks, "aux_noun_tokens": None})
    with pytest.raises(ValueError, match=r"\[T\] masks"):
        DBIMSettings().plan(**{**masks, "prompt_tokens_c": masks["prompt_tokens_c"][None]})


def test_context_reading_without_context_words_gives_a_uniform_auxiliary_map() -> None:
    """A prompt that is only the auxiliary noun leaves m_a = 0 (empty group), as in ``dbim_weights``."""
    masks = _masks()
    only_noun = masks["aux_noun_tokens"].clone()
    settings = DBIMSettings(lam=1.0)
    q_c, k_c = _qk(1, 16, 2, 8, seed=4)
    q_a, k_a = _qk(1, 16, 2, 8, seed=5)
    plan = settings.plan(**{**masks, "prompt_tokens_a": only_noun})
    assert plan.aux.numel() == 0
    got = settings.weights_qk(q_c, k_c, q_a, k_a, 2, plan)
    expected = settings.weights(attention_probs(q_c, k_c, 2), attention_probs(q_a, k_a, 2),
                                **{**masks, "prompt_tokens_a": only_noun})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
