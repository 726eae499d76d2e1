"""The regions ``dev.concept_probe --dci`` reports DBIM's blend weight in: the asked object's square, the
training renders' place, and the rest, at every cross-attention resolution of the toy model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dev.concept_probe import region_masks
from dev.toyworld.concepts import CONCEPTS, evaluation_scenes


@pytest.mark.parametrize("res", [16, 8, 4])
def test_the_three_regions_split_the_map(res: int) -> None:
    scene = evaluation_scenes(CONCEPTS["badge"])[0]
    asked, train, rest = region_masks(scene, res)
    assert asked.shape == train.shape == rest.shape == (res * res,)
    total = asked.int() + train.int() + rest.int()
    assert bool((total == 1).all())  # disjoint and covering
    assert asked.any() and rest.any()


def test_the_asked_square_follows_the_prompts_position() -> None:
    scene = evaluation_scenes(CONCEPTS["badge"])[0]
    left = replace(scene, obj=replace(scene.obj, position="left", size="small"))
    right = replace(scene, obj=replace(scene.obj, position="right", size="small"))
    a_left = region_masks(left, 16)[0].reshape(16, 16)
    a_right = region_masks(right, 16)[0].reshape(16, 16)
    cols = torch.arange(16).float()
    assert float(cols[a_left.any(0)].mean()) < 8 < float(cols[a_right.any(0)].mean())
    # an object asked at the training place leaves no separate training region
    centre = replace(scene, obj=replace(scene.obj, position="centre", size="large"))
    assert not region_masks(centre, 8)[1].any()
