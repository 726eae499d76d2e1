"""DBIM math against a direct, loop-based re-computation of the method's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from dci.method.dbim import (
    NORMALIZATIONS,
    REFERENCE_PIXELS,
    DBIMSettings,
    attention_probs,
    auxiliary_map_tokens,
    blend_outputs,
    dbim_weights,
)

T = 12


def _masks() -> dict[str, torch.Tensor]:
    """Two prompts of T tokens: SOS, words, EOS, padding; per row [B=2, T]."""
    prompt = torch.zeros(2, T, dtype=torch.bool)
    prompt[0, 1:8] = True  # SOS at 0, EOS at 8
    prompt[1, 1:6] = True
    concept = torch.zeros(2, T, dtype=torch.bool)
    concept[0, 3:5] = True  # "sks dog"
    concept[1, 1:3] = True
    aux_noun = torch.zeros(2, T, dtype=torch.bool)
    aux_noun[0, 4] = True  # "cat" (one token shorter prompt than the concept one is fine too)
    aux_noun[1, 2] = True
    return {"prompt": prompt, "concept": concept, "aux_noun": aux_noun}


def _random_probs(b: int, heads: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(b, heads, n, T, generator=gen, dtype=torch.float64), dim=-1)


def _loop_map(p: torch.Tensor, prompt: torch.Tensor, tokens: torch.Tensor, tau: float) -> list:
    """m[b][h][n] = sum over tokens of exp(tau P_t) / sum over prompt tokens of exp(tau P_t')."""
    b_, h_, n_, t_ = p.shape
    out = [[[0.0] * n_ for _ in range(h_)] for _ in range(b_)]
    for b in range(b_):
        prompt_idx = [t for t in range(t_) if prompt[b, t]]
        token_idx = [t for t in prompt_idx if tokens[b, t]]
        for h in range(h_):
            for n in range(n_):
                row = p[b, h, n].tolist()
                z = sum(math.exp(tau * row[t]) for t in prompt_idx)
                out[b][h][n] = sum(math.exp(tau * row[t]) for t in token_idx) / z
    return out


def _loop_normalize(m: list, tau: float, kappa: float, normalization: str) -> list:
    out = []
    for per_b in m:
        rows = []
        for per_h in per_b:
            n = len(per_h)
            z = sum(math.exp(tau * x) for x in per_h)
            scale = kappa if normalization == "reference" else kappa * n / REFERENCE_PIXELS
            rows.append([scale * math.exp(tau * x) / z for x in per_h])
        out.append(rows)
    return out


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _loop_weights(p_c, p_a, masks, reading, normalization, tau, kappa, lam) -> torch.Tensor:
    prompt, concept, aux_noun = masks["prompt"], masks["concept"], masks["aux_noun"]
    if reading == "noun":
        aux = [[bool(aux_noun[b, t]) for t in range(T)] for b in range(2)]
    else:  # the context words: every real prompt token but the auxiliary noun
        aux = [[bool(prompt[b, t]) and not bool(aux_noun[b, t]) for t in range(T)] for b in range(2)]
    mc = _loop_normalize(_loop_map(p_c, prompt, concept, tau), tau, kappa, normalization)
    ma = _loop_normalize(_loop_map(p_a, prompt, torch.tensor(aux), tau), tau, kappa, normalization)
    b_, h_, n_ = len(mc), len(mc[0]), len(mc[0][0])
    w = [
        [[_sigmoid(mc[b][h][n] - lam * ma[b][h][n]) for n in range(n_)] for h in range(h_)] for b in range(b_)
    ]
    return torch.tensor(w, dtype=torch.float64)


@pytest.mark.parametrize("n,heads", [(16, 1), (64, 8), (256, 2)])
@pytest.mark.parametrize("reading", ["reference", "noun"])
@pytest.mark.parametrize("normalization", ["reference", "pixel_count"])
def test_weights_match_loop_recomputation(n: int, heads: int, reading: str, normalization: str) -> None:
    gen = torch.Generator().manual_seed(n * 31 + heads)
    masks = _masks()
    p_c, p_a = _random_probs(2, heads, n, gen), _random_probs(2, heads, n, gen)
    tau, kappa, lam = 10.0, 500.0 if normalization == "reference" else 5000.0, 1.5
    w = dbim_weights(
        p_c,
        p_a,
        concept_tokens=masks["concept"],
        aux_tokens=auxiliary_map_tokens(masks["aux_noun"], masks["prompt"], reading),
        prompt_tokens_c=masks["prompt"],
        prompt_tokens_a=masks["prompt"],
        tau=tau,
        kappa=kappa,
        lam=lam,
        normalization=normalization,
    )
    expected = _loop_weights(p_c, p_a, masks, reading, normalization, tau, kappa, lam)
    assert w.shape == (2, heads, n) and w.dtype == torch.float32
    torch.testing.assert_close(w.double(), expected, rtol=1e-4, atol=1e-5)


def test_settings_build_the_same_weights_as_the_function() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = _masks()
    p_c, p_a = _random_probs(2, 2, 16, gen), _random_probs(2, 2, 16, gen)
    for reading in ("reference", "noun", "paper"):
        s = DBIMSettings(lam=-1.0, reading=reading, normalization="pixel_count")
        got = s.weights(
            p_c,
            p_a,
            concept_tokens=masks["concept"],
            aux_noun_tokens=masks["aux_noun"],
            prompt_tokens_c=masks["prompt"],
            prompt_tokens_a=masks["prompt"],
        )
        expected = _loop_weights(p_c, p_a, masks, reading, "pixel_count", 10.0, 500.0, -1.0)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_lam_zero_ignores_the_auxiliary_map() -> None:
    gen = torch.Generator().manual_seed(1)
    masks = _masks()
    p_c = _random_probs(2, 2, 64, gen)
    kwargs = dict(concept_tokens=masks["concept"], prompt_tokens_c=masks["prompt"], lam=0.0)
    w_none = dbim_weights(p_c, None, aux_tokens=None, prompt_tokens_a=None, **kwargs)
    for _ in range(2):
        p_a = _random_probs(2, 2, 64, gen)
        w = dbim_weights(p_c, p_a, aux_tokens=masks["aux_noun"], prompt_tokens_a=masks["prompt"], **kwargs)
        assert torch.equal(w, w_none)
    # and lam != 0 does use it
    w_lam = dbim_weights(
        p_c, p_a, aux_tokens=masks["aux_noun"], prompt_tokens_a=masks["prompt"], **{**kwargs, "lam": 1.0}
    )
    assert not torch.allclose(w_lam, w_none)


def test_masks_broadcast_from_one_dimension() -> None:
    gen = torch.Generator().manual_seed(2)
    masks = _masks()
    p_c = _random_probs(2, 1, 16, gen)
    full = dbim_weights(
        p_c,
        None,
        concept_tokens=masks["concept"][0].expand(2, T),
        aux_tokens=None,
        prompt_tokens_c=masks["prompt"][0].expand(2, T),
        prompt_tokens_a=None,
    )
    flat = dbim_weights(
        p_c,
        None,
        concept_tokens=masks["concept"][0],
        aux_tokens=None,
        prompt_tokens_c=masks["prompt"][0],
        prompt_tokens_a=None,
    )
    assert torch.equal(full, flat)


def test_pixel_count_is_resolution_independent_and_equals_reference_at_64x64() -> None:
    gen = torch.Generator().manual_seed(3)
    for n in (64, 256, 1024, 4096):
        m = torch.rand(1, 1, n, generator=gen)
        big = NORMALIZATIONS["pixel_count"](m, 10.0, 500.0)
        torch.testing.assert_close(big.mean(), torch.tensor(500.0 / REFERENCE_PIXELS))
    m = torch.rand(1, 2, REFERENCE_PIXELS, generator=gen)
    torch.testing.assert_close(
        NORMALIZATIONS["pixel_count"](m, 10.0, 500.0), NORMALIZATIONS["reference"](m, 10.0, 500.0)
    )


def test_empty_masks_raise_clear_errors() -> None:
    gen = torch.Generator().manual_seed(4)
    masks = _masks()
    p = _random_probs(2, 1, 16, gen)
    empty = torch.zeros(2, T, dtype=torch.bool)
    with pytest.raises(ValueError, match="concept mask is empty"):
        dbim_weights(
            p,
            None,
            concept_tokens=empty,
            aux_tokens=None,
            prompt_tokens_c=masks["prompt"],
            prompt_tokens_a=None,
        )
    with pytest.raises(ValueError, match="concept mask is empty"):
        dbim_weights(
            p,
            None,
            concept_tokens=masks["concept"],
            aux_tokens=None,
            prompt_tokens_c=empty,
            prompt_tokens_a=None,
        )
    # a prompt without context words (only the auxiliary noun): m_a = 0, so M_a is uniform (kappa / N)
    no_context = dbim_weights(
        p,
        p,
        concept_tokens=masks["concept"],
        aux_tokens=empty,
        prompt_tokens_c=masks["prompt"],
        prompt_tokens_a=masks["prompt"],
        lam=1.0,
    )
    m_c = torch.tensor(_loop_map(p, masks["prompt"], masks["concept"], 10.0), dtype=torch.float64)
    expected = torch.sigmoid(NORMALIZATIONS["reference"](m_c, 10.0, 500.0) - 500.0 / 16)
    torch.testing.assert_close(no_context.double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs p_a"):
        dbim_weights(
            p,
            None,
            concept_tokens=masks["concept"],
            aux_tokens=None,
            prompt_tokens_c=masks["prompt"],
            prompt_tokens_a=None,
            lam=1.0,
        )
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\]"):
        dbim_weights(
            p,
            None,
            concept_tokens=masks["concept"][:, :5],
            aux_tokens=None,
            prompt_tokens_c=masks["prompt"],
            prompt_tokens_a=None,
        )


def test_auxiliary_map_tokens_readings() -> None:
    prompt = torch.tensor([False, True, True, True, False])
    noun = torch.tensor([False, False, True, False, False])
    assert auxiliary_map_tokens(noun, prompt, "reference").tolist() == [False, True, False, True, False]
    assert auxiliary_map_tokens(noun, prompt, "paper").tolist() == [False, True, False, True, False]
    assert auxiliary_map_tokens(noun, prompt, "noun").tolist() == [False, False, True, False, False]
    assert not auxiliary_map_tokens(noun, noun, "reference").any()  # no context words: an empty map
    with pytest.raises(ValueError, match="auxiliary noun is not among"):
        auxiliary_map_tokens(torch.zeros(5, dtype=torch.bool), prompt, "noun")
    with pytest.raises(ValueError, match="reading"):
        auxiliary_map_tokens(noun, prompt, "figure")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"kappa": -1.0}, "kappa"),
        ({"lam": float("inf")}, "lam"),
        ({"reading": "figure"}, "reading"),
        ({"normalization": "max"}, "normalization"),
    ],
)
def test_settings_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DBIMSettings(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_probs_match_softmax_attention_and_sdpa(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    rows, n, t, heads, d = 2, 64, 77, 8, 16
    q = torch.randn(rows, n, heads * d, generator=gen).to(dtype)
    k = torch.randn(rows, t, heads * d, generator=gen).to(dtype)
    v = torch.randn(rows, t, heads * d, generator=gen).to(dtype)
    p = attention_probs(q, k, heads)
    assert p.shape == (rows, heads, n, t) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(rows, heads, n))

    qh, kh, vh = (x.float().reshape(rows, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    expected = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)

    fused = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    torch.testing.assert_close(p @ vh, fused, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attention_probs(q, k, heads, chunk_size=10), p)


def test_attention_probs_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        attention_probs(torch.zeros(1, 4, 10), torch.zeros(1, 3, 10), heads=3)
    with pytest.raises(ValueError, match="disagree"):
        attention_probs(torch.zeros(1, 4, 8), torch.zeros(2, 3, 8), heads=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blend_outputs(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    b, n, heads, d = 2, 16, 4, 8
    o_c = torch.randn(b, n, heads * d, generator=gen).to(dtype)
    o_a = torch.randn(b, n, heads * d, generator=gen).to(dtype)
    assert torch.equal(blend_outputs(o_c, o_a, torch.ones(b, heads, n), heads), o_c)
    assert torch.equal(blend_outputs(o_c, o_a, torch.zeros(b, heads, n), heads), o_a)

    w = torch.rand(b, heads, n, generator=gen)
    got = blend_outputs(o_c, o_a, w, heads)
    assert got.dtype == dtype
    expected = torch.empty_like(o_c, dtype=torch.float64)
    for i in range(b):
        for p in range(n):
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                wi = float(w[i, h, p])
                expected[i, p, sl] = wi * o_c[i, p, sl].double() + (1 - wi) * o_a[i, p, sl].double()
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="w_c"):
        blend_outputs(o_c, o_a, w.transpose(1, 2), heads)
