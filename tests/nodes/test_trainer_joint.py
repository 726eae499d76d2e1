"""Joint training of several concepts, as Custom Diffusion does it: DCI Concept Dataset nodes chained into DCI
Train Concept's more_concepts give one run and one file with several triggers; loading it registers them all;
resume stays bit-exact; single-concept files keep format 1."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from dci.comfyui.tokenizer import existing_triggers
from dci.files.concept import load_concept
from dev.fixtures import concepts_folder

from .test_trainer import BASE, sample


@pytest.fixture()
def setup(comfy, tiny_sd15_loaded):
    model, clip, vae = tiny_sd15_loaded
    g = torch.Generator().manual_seed(3)
    dogs = torch.rand(2, 64, 64, 3, generator=g)
    cats = [torch.rand(1, 72, 64, 3, generator=g), torch.rand(1, 64, 80, 3, generator=g)]  # a list, any sizes
    return comfy, model, clip, vae, dogs, cats


def chain(comfy, cats, **kw):
    (first,), _ = comfy.run_node_lists("DCIConceptDataset", images=cats, class_noun=["cat"],
                                       trigger_word=[kw.get("trigger", "zwv")])
    return first[0]


def joint(comfy, model, clip, vae, dogs, more, name, **overrides):
    out, ui = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=dogs, save_name=name,
                             more_concepts=more, **{**BASE, **overrides})
    return out, load_concept(concepts_folder() / f"{name}.safetensors")


def rows(clip, text: str) -> list[torch.Tensor]:
    return [t[0] for t in clip.tokenize(text)["l"][0] if isinstance(t[0], torch.Tensor)]


def test_two_concepts_train_into_one_file_whose_loading_registers_both_triggers(setup):
    comfy, model, clip, vae, dogs, cats = setup
    (m, c, ref, curve), concept = joint(comfy, model, clip, vae, dogs, chain(comfy, cats), "t_joint")
    assert (concept.trigger, concept.class_noun) == ("qxz", "dog")
    assert [(x.trigger, x.class_noun) for x in concept.more] == [("zwv", "cat")]
    assert concept.training["images"] == 4 and concept.contexts["clip_l.prefix"].shape == (4, 3, 64)
    assert [x["trigger"] for x in concept.training["more_concepts"]] == ["zwv"]
    dog, cat = concept.tokens["clip_l"], concept.more[0].tokens["clip_l"]
    assert dog.shape == cat.shape == (2, 64) and not torch.equal(dog, cat)
    assert torch.equal(concept.token_init["clip_l"], concept.more[0].token_init["clip_l"])  # same starting rows
    assert not torch.equal(cat, concept.more[0].token_init["clip_l"])
    with safe_open(str(concepts_folder() / "t_joint.safetensors"), framework="pt") as f:
        assert f.metadata()["format_version"] == "2" and "token.clip_l.1" in f.keys()
    # the trainer's CLIP and the file loaded by DCI Load Concept both know both triggers, with the saved rows
    (m2, c2, ref2), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=ref.name,
                                       strength_model=1.0, strength_clip=1.0)
    for out_clip in (c, c2):
        assert existing_triggers(out_clip) == ["qxz", "zwv"]
        assert torch.equal(rows(out_clip, "a zwv cat")[0], cat[0]) and torch.equal(rows(out_clip, "a qxz dog")[1], dog[1])
    both = "a qxz dog and a zwv cat"
    assert torch.equal(sample(comfy, m, c, both), sample(comfy, m2, c2, both))
    assert existing_triggers(clip) == []
    # a single-concept run still writes format 1
    joint(comfy, model, clip, vae, dogs, None, "t_single", steps=1)
    with safe_open(str(concepts_folder() / "t_single.safetensors"), framework="pt") as f:
        assert f.metadata()["format_version"] == "1" and "more_triggers" not in f.metadata()


def test_joint_resume_is_bit_exact_and_needs_the_same_concepts(setup):
    comfy, model, clip, vae, dogs, cats = setup
    more = chain(comfy, cats)
    _, full = joint(comfy, model, clip, vae, dogs, more, "t_joint_full", steps=3, checkpoint_every=0)
    (_, _, ref, _), _ = joint(comfy, model, clip, vae, dogs, more, "t_joint_resume", steps=1)
    _, resumed = joint(comfy, model, clip, vae, dogs, more, "t_joint_resume", steps=3, resume=True, overwrite=False)
    for part in ("kv_deltas", "tokens", "contexts"):
        a, b = getattr(full, part), getattr(resumed, part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert torch.equal(full.more[0].tokens["clip_l"], resumed.more[0].tokens["clip_l"])
    with pytest.raises(ValueError, match="more_concepts"):
        joint(comfy, model, clip, vae, dogs, chain(comfy, cats, trigger="vvk"), "t_joint_resume", steps=4,
              resume=True, overwrite=False)


@pytest.mark.parametrize(("case", "message"), [
    ("same trigger", "already used by a chained concept|its own trigger word"),
    ("infusion", "supports the ico and custom_diffusion modes"),
    ("masks", "give one mask for all or one per photo"),
])
def test_joint_training_refuses_clear_mistakes(setup, case, message):
    comfy, model, clip, vae, dogs, cats = setup
    overrides, more = {}, None
    if case == "same trigger":
        more = chain(comfy, cats, trigger="qxz")
    elif case == "infusion":
        more, overrides = chain(comfy, cats), {"mode": "infusion"}
    else:
        (more,), _ = comfy.run_node_lists("DCIConceptDataset", images=cats, class_noun=["cat"], trigger_word=["zwv"],
                                          mask=[torch.ones(3, 64, 64)])
        more = more[0]
    with pytest.raises(ValueError, match=message):
        joint(comfy, model, clip, vae, dogs, more, "t_joint_bad", **overrides)
    assert not (concepts_folder() / "t_joint_bad.safetensors").exists()
