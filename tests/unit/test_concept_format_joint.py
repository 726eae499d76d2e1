"""Concept files with several triggers (joint training): format 2 round trip, SDXL's two encoders per trigger,
and precise errors for inconsistent files; single-trigger files stay format 1."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dci.files.concept import ConceptFileError, MoreTrigger, load_concept, same_concept, save_concept

from .test_concept_format import small_concept


def joint_concept(**overrides):
    g = torch.Generator().manual_seed(1)
    tokens = {"clip_l": torch.randn(2, 16, generator=g), "clip_g": torch.randn(2, 24, generator=g)}
    base = small_concept(family="sdxl", tokens=tokens, token_init={k: v + 1 for k, v in tokens.items()}, contexts={})
    more = [MoreTrigger("zwv", "cat", {k: v * 2 for k, v in tokens.items()}, {k: v + 1 for k, v in tokens.items()}),
            MoreTrigger("vvk", "mug", {k: v * 3 for k, v in tokens.items()})]
    for k, v in overrides.items():
        setattr(base, k, v)
    base.more = overrides.get("more", more)
    return base


def test_several_triggers_round_trip_as_format_2(tmp_path):
    c = joint_concept()
    path = save_concept(c, tmp_path, "pets")
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format_version"] == "2"
    assert json.loads(meta["more_triggers"]) == [{"trigger": "zwv", "class_noun": "cat"},
                                                  {"trigger": "vvk", "class_noun": "mug"}]
    assert {"token.clip_g.1", "token.clip_l.2", "token_init.clip_l.1"} <= keys and "token_init.clip_l.2" not in keys
    back = load_concept(path)
    assert same_concept(back, c) and [t for t, _, _ in back.triggers] == ["sks", "zwv", "vvk"]
    assert set(back.tokens) == {"clip_l", "clip_g"} and torch.equal(back.more[1].tokens["clip_g"], c.more[1].tokens["clip_g"])
    single = load_concept(save_concept(small_concept(), tmp_path, "one"))
    assert single.more == [] and single.metadata()["format_version"] == "1"


@pytest.mark.parametrize(("more", "message"), [
    ([MoreTrigger("SKS", "cat", {"clip_l": torch.zeros(2, 16), "clip_g": torch.zeros(2, 24)})], "appears twice"),
    ([MoreTrigger("zwv", "cat", {"clip_l": torch.zeros(3, 16), "clip_g": torch.zeros(3, 24)})], "do not match"),
    ([MoreTrigger("zwv", "cat", {"clip_l": torch.zeros(2, 16)})], "do not match"),
    ([MoreTrigger("two words", "cat", {"clip_l": torch.zeros(2, 16), "clip_g": torch.zeros(2, 24)})], "trigger word"),
    ([MoreTrigger("zwv", " ", {"clip_l": torch.zeros(2, 16), "clip_g": torch.zeros(2, 24)})], "class noun"),
])
def test_inconsistent_further_triggers_are_refused(tmp_path, more, message):
    with pytest.raises(ConceptFileError, match=message):
        save_concept(joint_concept(more=more), tmp_path, "bad")


def test_token_rows_of_no_listed_trigger_are_refused(tmp_path):
    path = save_concept(joint_concept(), tmp_path, "pets")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["token.clip_l.3"] = torch.zeros(2, 16)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ConceptFileError, match="no listed trigger: token.clip_l.3"):
        load_concept(path)
    meta["more_triggers"] = json.dumps([{"trigger": "zwv"}])
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ConceptFileError, match="more_triggers"):
        load_concept(path)
