"""Infusion's residual placement and the exact row matching that finds the trigger's rows."""

from __future__ import annotations

import pytest
import torch

from dci.method.infusion import PROBE, add_at, mark_rows, token_mask, trainable_values


def test_add_at_changes_only_the_masked_rows():
    x = torch.randn(2, 5, 4)
    x[0, 0, 0] = -0.0  # an unmasked -0.0 stays -0.0 (x + 0 would make it +0.0)
    mask = token_mask(2, 5, [[], [1, 3]])
    r = torch.randn(4)
    out = add_at(x, mask, r, 0.5)
    assert torch.equal(out[0], x[0]) and torch.signbit(out[0, 0, 0])
    assert torch.equal(out[1, [0, 2, 4]], x[1, [0, 2, 4]])
    torch.testing.assert_close(out[1, [1, 3]], x[1, [1, 3]] + 0.5 * r)
    assert add_at(x, torch.zeros(2, 5, dtype=torch.bool), r) is x


def test_mark_rows_matches_exactly_and_after_the_same_cast():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 6, 16, generator=g)
    marks = ctx[1, 2:4].clone()
    assert mark_rows(ctx, marks).nonzero().tolist() == [[1, 2], [1, 3]]
    half = ctx.half()
    assert mark_rows(half, marks).nonzero().tolist() == [[1, 2], [1, 3]]  # marks cast like the context
    near = ctx.clone()
    near[1, 2, PROBE + 1] += 1e-6  # equal on the probed features, different later: no match
    assert mark_rows(near, marks).nonzero().tolist() == [[1, 3]]
    assert not mark_rows(ctx, torch.zeros(0, 0)).any()
    assert not mark_rows(ctx, torch.randn(3, 8)).any()  # another width never matches


def test_token_mask_and_counts():
    with pytest.raises(ValueError, match="outside a context of 5 tokens"):
        token_mask(1, 5, [[5]])
    assert trainable_values([320, 640], unlock_keys=False) == 960
    assert trainable_values([320, 640], unlock_keys=True) == 1920
