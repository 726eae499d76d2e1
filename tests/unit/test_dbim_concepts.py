"""DBIM with several concepts in one prompt: each concept's map on its own ("separate") or one map of all of
their tokens ("union")."""

from __future__ import annotations

import pytest
import torch

from dci.method.dbim import dbim_weights

T, N, HEADS = 12, 1024, 2  # a 32×32 layer
PROMPT = torch.zeros(T, dtype=torch.bool)
PROMPT[1:9] = True
A = torch.zeros(T, dtype=torch.bool)
A[2:4] = True  # the first concept's tokens
B = torch.zeros(T, dtype=torch.bool)
B[6:8] = True  # the second's


def probs(strong_a: float = 0.6, strong_b: float = 0.2) -> torch.Tensor:
    """Attention where the first concept's tokens dominate pixels 0-127 and the second's pixels 512-639, the
    second less sharply (a concept the model attends to less)."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(1, HEADS, N, T, generator=g) * 0.05
    p[:, :, :128, 2:4] += strong_a
    p[:, :, 512:640, 6:8] += strong_b
    return p / p.sum(-1, keepdim=True)


def weights(concepts, p=None, **kw):
    return dbim_weights(probs() if p is None else p, None, concept_tokens=concepts, aux_tokens=None,
                        prompt_tokens_c=PROMPT, prompt_tokens_a=None, **kw)


def test_one_concept_in_a_list_is_the_single_mask_bit_for_bit():
    for normalization in ("reference", "pixel_count"):
        assert torch.equal(weights([A], normalization=normalization), weights(A, normalization=normalization))


def test_separate_takes_each_concepts_own_normalised_map_and_the_strongest_per_pixel():
    sep = weights([A, B])
    assert torch.equal(sep, torch.maximum(weights(A), weights(B)))  # sigmoid is monotonic, so max of M = max of w
    union = weights(A | B)
    assert not torch.allclose(sep, union)


def test_separate_protects_the_weaker_concept_as_a_lone_concept_union_does_not():
    """The union's spatial softmax shares one budget between both areas: the concept with the weaker attention
    gets less protection than alone; separately it keeps a lone concept's weight."""
    sep, union, alone_b = weights([A, B]), weights(A | B), weights(B)
    region_b = slice(512, 640)
    assert torch.equal(sep[..., region_b] >= alone_b[..., region_b], torch.ones_like(sep[..., region_b], dtype=bool))
    assert union[..., region_b].mean() < alone_b[..., region_b].mean() - 0.05
    assert sep[..., region_b].mean() > union[..., region_b].mean() + 0.05


def test_an_empty_concept_mask_among_several_is_refused():
    with pytest.raises(ValueError, match="concept mask is empty"):
        weights([A, torch.zeros(T, dtype=torch.bool)])
    with pytest.raises(ValueError, match="no concept mask"):
        weights([])
