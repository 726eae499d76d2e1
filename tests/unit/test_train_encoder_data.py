"""The concept encoder's training data: instances disjoint from the evaluation concepts, cross-reference pairs
(same instance, another scene), captions with the trigger's rows, and draws that depend only on seed and step."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dev.toyworld import train_encoder as te
from dev.toyworld.concepts import CONCEPTS

ARGS = SimpleNamespace(batch=6, num_tokens=2, object_weight=2.0, decoration_weight=4.0, omit_words=False)


def pool(seed: int = 0) -> te.TargetPool:
    return te.TargetPool(seed, 8, 1, lambda imgs: imgs.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 4, 16, 16))


def test_instances_never_are_an_evaluation_concept_or_its_named_twin():
    rng = np.random.default_rng(0)
    named = {te.named_parts(c.obj) for c in CONCEPTS.values()}
    for _ in range(300):
        assert te.named_parts(te.random_instance(rng)) not in named
    for c in CONCEPTS.values():
        with pytest.raises(AssertionError, match="overlaps an evaluation concept"):
            te.check_disjoint(c.obj)


def test_a_batch_pairs_references_with_the_same_instance_elsewhere():
    p = pool()
    ref, x0, texts, w = te.make_batch(np.random.default_rng([0, 5]), ARGS, 3, p, step=4)
    assert ref.shape == (6, 3, 3, 128, 128) and x0.shape == (6, 4, 16, 16) and w.shape == (6, 1, 16, 16)
    assert len(p.scenes) >= p.size_at(4) == 12
    for text in texts:
        assert text.count(te.PLACEHOLDER) == 2
    assert float(w.min()) == 1.0 and float(w.max()) > 3.0  # object and decoration cells weigh more
    # every reference shows the target's object (its body colour is in the reference) on another background
    rng = np.random.default_rng([0, 5])
    idx = rng.integers(0, 12, 6)
    from dci.toyworld.render import PALETTE

    for i, k in enumerate(idx):
        tgt = p.scenes[int(k)]
        body = torch.tensor(PALETTE[tgt.obj.colour], dtype=torch.float32) / 255
        close = ((ref[i, 0].permute(1, 2, 0) - body).abs().amax(-1) < 0.02).float().mean()
        assert close > 0.02
        bg = ref[i, 0, :, 1, 1] * 255
        assert not torch.allclose(bg, torch.tensor(PALETTE[tgt.background], dtype=torch.float32), atol=2)


def test_draws_depend_only_on_seed_and_step():
    a = te.make_batch(np.random.default_rng([0, 7]), ARGS, 2, pool(), step=3)
    b = te.make_batch(np.random.default_rng([0, 7]), ARGS, 2, pool(), step=3)
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    words = te.make_batch(np.random.default_rng([0, 7]), ARGS, 2, pool(), step=3, words=True)[2]
    assert all(te.PLACEHOLDER not in t for t in words) and len(words) == len(a[2])
