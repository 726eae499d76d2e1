"""The two-branch bookkeeping of DCI sampling, in plain torch: which rows of a UNet call pair with which,
which run under shared guidance, and the shared-guidance formula itself."""

from __future__ import annotations

import math

import pytest
import torch

from dci.method.branches import (
    BranchError,
    DCIPlan,
    call_rows,
    kept_rows,
    shared_uncond,
    stack_branches,
    two_branch_steps,
)


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_call_rows_pair_concept_row_k_with_auxiliary_row_b_plus_k(order):
    """ComfyUI lists the conds of a call in either order; each chunk holds B concept then B auxiliary rows."""
    b = 3
    rows = call_rows(order, total=4 * b, batch=b, mixed_index=0, uncond_index=1)
    mixed, uncond = order.index(0) * 2 * b, order.index(1) * 2 * b
    assert rows.concept.tolist() == list(range(mixed, mixed + b))
    assert rows.aux.tolist() == list(range(mixed + b, mixed + 2 * b))
    assert rows.concept_uncond.tolist() == list(range(uncond, uncond + b))
    assert rows.aux_uncond.tolist() == list(range(uncond + b, uncond + 2 * b))
    assert (rows.aux - rows.concept).tolist() == [b] * b


def test_call_rows_without_the_uncond_or_without_whole_pairs():
    cfg1 = call_rows([0], total=4, batch=2, mixed_index=0, uncond_index=None)
    assert cfg1.concept.tolist() == [0, 1] and cfg1.aux.tolist() == [2, 3] and cfg1.aux_uncond is None
    only_uncond = call_rows([1], total=4, batch=2, mixed_index=0, uncond_index=1)
    assert only_uncond.concept is None and only_uncond.concept_uncond.tolist() == [0, 1]
    assert call_rows([0, 1, 1], total=6, batch=2, mixed_index=0, uncond_index=1) is None  # chunks of 2, not 4
    assert call_rows([0, 1], total=7, batch=2, mixed_index=0, uncond_index=1) is None
    assert call_rows([], total=4, batch=2, mixed_index=0, uncond_index=1) is None


def test_kept_rows_give_each_row_its_place_in_the_smaller_batch():
    keep, position = kept_rows(8, torch.tensor([6, 7]))
    assert keep.tolist() == [True] * 6 + [False] * 2
    assert position[:6].tolist() == list(range(6))
    keep, position = kept_rows(6, torch.tensor([1, 4]))
    assert keep.tolist() == [True, False, True, True, False, True]
    assert position[torch.tensor([0, 2, 3, 5])].tolist() == [0, 1, 2, 3]
    keep, position = kept_rows(4, None)
    assert keep.all() and position.tolist() == [0, 1, 2, 3]


def test_shared_uncond_gives_the_auxiliary_latent_the_concept_latents_noise_prediction():
    """ε_u(x_a) must equal ε_u(x_c) = (x_c − D_u(x_c)) / σ, i.e. D_u(x_a) = x_a − σ·ε_u(x_c)."""
    g = torch.Generator().manual_seed(0)
    x_c, x_a, d_uc = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for sigma in (0.03, 1.0, 14.6):
        d_ua = shared_uncond(d_uc, x_c, x_a)
        torch.testing.assert_close((x_a - d_ua) / sigma, (x_c - d_uc) / sigma)
    assert torch.equal(shared_uncond(d_uc, x_c, x_c), d_uc)  # same latent, same prediction
    half = shared_uncond(d_uc.half(), x_c, x_a)
    assert half.dtype == torch.float16


def test_two_branch_steps_count_the_steps_that_start_above_the_split_sigma():
    sigmas = torch.linspace(10.0, 0.0, 11)  # 10 steps, starting at 10, 9, ..., 1
    assert two_branch_steps(sigmas, math.inf) == 0  # split 0
    assert two_branch_steps(sigmas, 6.5) == 4  # steps from 10, 9, 8, 7
    assert two_branch_steps(sigmas, 7.0) == 3  # a step that starts at the split sigma runs one branch
    assert two_branch_steps(sigmas, 0.0) == 10  # split 1: every step
    assert two_branch_steps(torch.tensor([1.0]), 0.5) == 0  # no steps at all


def test_stack_branches_repeats_contexts_to_their_common_length():
    concept = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 2, 3)
    aux = torch.full((1, 3, 3), -1.0)
    stacked, length = stack_branches(concept, aux, batch=2)
    assert length == 6 and stacked.shape == (4, 6, 3)
    assert torch.equal(stacked[0], torch.cat([concept[0]] * 3)) and torch.equal(stacked[1], stacked[0])
    assert torch.equal(stacked[2], torch.cat([aux[0]] * 2)) and torch.equal(stacked[3], stacked[2])


def test_plan_refuses_settings_out_of_range():
    assert DCIPlan() == DCIPlan(split=0.3, guidance="shared", aux_seed=1)
    with pytest.raises(BranchError, match="split must be between 0 and 1"):
        DCIPlan(split=1.5)
    with pytest.raises(BranchError, match="guidance must be one of"):
        DCIPlan(guidance="both")
