"""The pack's DBIM against an independent restatement of the method's public reference code.

What is restated (not copied): jinjianRick/DCI_ICO at commit 653b97b3, ``src/model.py``, the cross-attention
``new_forward`` that the reference installs on every attention layer: the attention itself (lines 187-191)
and the DBIM block (lines 194-250) for the model calls of the two-branch phase. In words, per layer call:

- rows come in one batch, in the order [unconditional, concept conditional, auxiliary conditional] (shared
  guidance) or [concept unconditional, concept conditional, auxiliary unconditional, auxiliary conditional]
  (separate guidance), B images each;
- P = softmax(q·kᵀ/√d) per row and head, O = P·v;
- for the two conditional rows, the token range 1 … L of P (the L real prompt tokens after the start token)
  is sharpened and renormalised: S = softmax(10·P[1 … L]);
- the concept map is the sum of S_c over the concept's token indices; the auxiliary map is the *total* of
  S_a minus the sum over the auxiliary noun's indices (so it measures the context words);
- each map m becomes 500·softmax over the layer's pixels of 10·m;
- the two weights are a softmax over the pair (M_c, λ·M_a); the concept conditional row's output becomes
  w_c·O_c + w_a·O_a; every other row keeps its own output.

The pack computes the same with its own row bookkeeping (ComfyUI's cond chunks, the auxiliary
unconditional rows skipped under shared guidance) and masks over the full 77-token context. The
"pixel_count" normalisation is the reference block with κ scaled by N / 4096, so it is checked by running
the restatement with that κ.
"""

from __future__ import annotations

import pytest
import torch

from dci.method.branches import call_rows, kept_rows
from dci.method.dbim import REFERENCE_PIXELS, DBIMSettings, attention_probs, blend_outputs

TOKENS = 77

# (B images, heads, pixels, head width, concept prompt: length L_c and concept indices within 1 … L_c,
#  auxiliary prompt: length L_a and noun indices within 1 … L_a), indices counted from the first word.
SHAPES = [
    (1, 1, 16, 8, (8, [3, 4]), (7, [3])),  # "a photo of sks dog on the beach" / "a photo of cat on the beach"
    (2, 4, 64, 8, (6, [0, 1, 2]), (5, [0, 1])),  # a three-token concept phrase first, a two-token noun
    (3, 8, 256, 4, (20, [17, 18]), (19, [17])),  # a longer prompt, the phrase near its end
]
LAMBDAS = [-2.0, -0.5, 0.0, 1.0, 2.0]


def reference_block(q, k, v, heads, shared, batch, concept, aux, lam, tau=10.0, kappa=500.0):
    """The restated reference layer: q [R, N, H·d], k and v [R, T, H·d] in the reference's row order."""
    q, k, v = q.double(), k.double(), v.double()
    rows, n, inner = q.shape
    d = inner // heads

    def per_head(x):  # [R, X, H·d] → [R, H, X, d]
        return x.reshape(x.shape[0], x.shape[1], heads, d).permute(0, 2, 1, 3)

    p = torch.softmax(per_head(q) @ per_head(k).transpose(-1, -2) * d**-0.5, dim=-1)  # [R, H, N, T]
    out = (p @ per_head(v)).permute(0, 2, 1, 3).reshape(rows, n, inner)
    c_first, a_first = (batch, 2 * batch) if shared else (batch, 3 * batch)
    (len_c, idx_c), (len_a, idx_a) = concept, aux
    result = out.clone()
    for i in range(batch):
        pc, pa = p[c_first + i], p[a_first + i]  # [H, N, T]
        s_c = torch.softmax(tau * pc[..., 1 : 1 + len_c], dim=-1)
        s_a = torch.softmax(tau * pa[..., 1 : 1 + len_a], dim=-1)
        m_c = sum(s_c[..., j] for j in idx_c)
        m_a = s_a.sum(dim=-1) - sum(s_a[..., j] for j in idx_a)
        big_c = kappa * torch.softmax(tau * m_c, dim=-1)  # over the pixels
        big_a = kappa * torch.softmax(tau * m_a, dim=-1)
        pair = torch.softmax(torch.stack([big_c, lam * big_a]), dim=0)  # [2, H, N]
        o_c = out[c_first + i].reshape(n, heads, d)
        o_a = out[a_first + i].reshape(n, heads, d)
        w_c, w_a = (w.transpose(0, 1).unsqueeze(-1) for w in pair)  # [N, H, 1]
        result[c_first + i] = (w_c * o_c + w_a * o_a).reshape(n, inner)
    return result


def mask(indices, offset=1) -> torch.Tensor:
    m = torch.zeros(TOKENS, dtype=torch.bool)
    m[[offset + j for j in indices]] = True
    return m


def pack_layer(roles, heads, shared, batch, concept, aux, settings):
    """The pack's method layer on ComfyUI's row layout: the mixed cond's chunk [concept × B, auxiliary × B]
    (cond index 0), then the negative's chunk (index 1), whose auxiliary rows are left out under shared
    guidance; rows found with ``call_rows``/``kept_rows``, weights by ``DBIMSettings``, blend by
    ``blend_outputs``. Returns the output per role."""
    order = ["cond_c", "cond_a", "uncond_c", "uncond_a"]
    rows = call_rows([0, 1], total=4 * batch, batch=batch, mixed_index=0, uncond_index=1)
    keep, position = kept_rows(4 * batch, rows.aux_uncond if shared else None)
    q, k, v = (torch.cat([roles[r][x] for r in order])[keep] for x in range(3))
    p = attention_probs(q, k, heads)
    d = q.shape[-1] // heads
    vh = v.float().reshape(v.shape[0], TOKENS, heads, d).transpose(1, 2)
    out = (p @ vh).transpose(1, 2).reshape(q.shape)
    c_rows, a_rows = position[rows.concept], position[rows.aux]
    (len_c, idx_c), (len_a, idx_a) = concept, aux
    w = settings.weights(p[c_rows], p[a_rows], concept_tokens=mask(idx_c),
                         aux_noun_tokens=mask(idx_a), prompt_tokens_c=mask(range(len_c)),
                         prompt_tokens_a=mask(range(len_a)))
    out[c_rows] = blend_outputs(out[c_rows], out[a_rows], w, heads)
    found = {"cond_c": rows.concept, "cond_a": rows.aux, "uncond_c": rows.concept_uncond}
    if not shared:
        found["uncond_a"] = rows.aux_uncond
    return {role: out[position[r]] for role, r in found.items()}


def random_roles(batch, heads, n, d, seed):
    """q [B, N, H·d] and k, v [B, 77, H·d] for each role; keys scaled so that attention is peaked, as in a
    trained model (flat maps would make every reading look alike)."""
    g = torch.Generator().manual_seed(seed)
    roles = {}
    for r in ("uncond_c", "cond_c", "uncond_a", "cond_a"):
        roles[r] = (torch.randn(batch, n, heads * d, generator=g),
                    3 * torch.randn(batch, TOKENS, heads * d, generator=g),
                    torch.randn(batch, TOKENS, heads * d, generator=g))
    return roles


def both(shape, lam, normalization, guidance, reading="reference"):
    batch, heads, n, d, concept, aux = shape
    shared = guidance == "shared"
    roles = random_roles(batch, heads, n, d, seed=batch * 1000 + n)
    layout = ["uncond_c", "cond_c", "cond_a"] if shared else ["uncond_c", "cond_c", "uncond_a", "cond_a"]
    q, k, v = (torch.cat([roles[r][x] for r in layout]) for x in range(3))
    kappa = 500.0 if normalization == "reference" else 500.0 * n / REFERENCE_PIXELS
    ref = reference_block(q, k, v, heads, shared, batch, concept, aux, lam, kappa=kappa)
    expected = {r: ref[i * batch : (i + 1) * batch] for i, r in enumerate(layout)}
    settings = DBIMSettings(lam=lam, reading=reading, normalization=normalization)
    return pack_layer(roles, heads, shared, batch, concept, aux, settings), expected


@pytest.mark.parametrize("guidance", ["shared", "separate"])
@pytest.mark.parametrize("normalization", ["reference", "pixel_count"])
@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-h{s[1]}-N{s[2]}")
def test_dbim_equals_the_reference_block(shape, lam, normalization, guidance):
    got, expected = both(shape, lam, normalization, guidance)
    assert got.keys() == expected.keys()
    for role, value in expected.items():
        # float32 against float64; the largest difference over all these cases is below 1e-5
        torch.testing.assert_close(got[role].double(), value, rtol=0, atol=2e-5, msg=role)
    if lam != 0.0:  # and the auxiliary map matters here: λ moves the concept rows
        assert not torch.allclose(got["cond_c"].double(), both(shape, 0.0, normalization, guidance)[0]["cond_c"]
                                  .double(), atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-h{s[1]}-N{s[2]}")
def test_the_noun_reading_is_not_the_reference_block(shape):
    """The restatement tells the readings apart: the noun variant differs from it wherever λ ≠ 0, and the
    older name 'paper' computes exactly what 'reference' computes."""
    differences = []
    for normalization in ("reference", "pixel_count"):
        for lam in (-2.0, 1.0):
            noun, expected = both(shape, lam, normalization, "shared", reading="noun")
            differences.append(float((noun["cond_c"].double() - expected["cond_c"]).abs().max()))
            paper, _ = both(shape, lam, normalization, "shared", reading="paper")
            reference, _ = both(shape, lam, normalization, "shared")
            assert all(torch.equal(paper[r], reference[r]) for r in reference)
    # (at 16 pixels the reference κ saturates w_c, so there only the pixel-count normalisation tells them apart)
    assert max(differences) > 0.1
    same, expected = both(shape, 0.0, "reference", "shared", reading="noun")  # λ 0: the map has no effect
    torch.testing.assert_close(same["cond_c"].double(), expected["cond_c"], rtol=0, atol=2e-5)
