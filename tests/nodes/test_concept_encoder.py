"""Concept-encoder nodes in-process on the toy model: DCI Load Concept Encoder (bundled and user files) and DCI
Encode Concept (shapes, a saved concept that round-trips bit for bit, trigger spans for DCI Prompt Encode, the
stock text encoder, untouched inputs, the resize rule, clear errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dci.toyworld import render

TOY = "toyworld_base.safetensors"
PROMPT = "a large sks circle at the left on a green background"


def renders(obj=None, n: int = 3) -> torch.Tensor:
    obj = obj or render.ObjectSpec("circle", "red", "stripes", "yellow", emblem="star", emblem_colour="blue")
    scenes = [render.SceneSpec(render.ObjectSpec(**{**obj.__dict__, "jitter": (float(i), 0.0)}), "white")
              for i in range(n)]
    return torch.from_numpy(np.stack([render.render_scene(s) for s in scenes]).astype(np.float32) / 255.0)


@pytest.fixture(scope="module")
def toy(comfy):
    (model, clip, vae), _ = comfy.run_node("DCIToyWorldLoader", model_name=TOY)
    return model, clip, vae


@pytest.fixture(scope="module")
def encoder(comfy):
    (enc,), _ = comfy.run_node("DCILoadConceptEncoder", encoder_name="toyworld_concept_encoder.safetensors")
    return enc


def encode(comfy, model, clip, enc, images, save_name="", trigger="sks", class_noun="circle", overwrite=False):
    out, _ = comfy.run_node("DCIEncodeConcept", model=model, clip=clip, encoder=enc, images=images,
                            class_noun=class_noun, trigger_word=trigger, save_name=save_name, overwrite=overwrite)
    return out


def test_bundled_encoder_is_listed_first_and_loads(comfy, encoder):
    names = comfy.node_class("DCILoadConceptEncoder").INPUT_TYPES()["required"]["encoder_name"][0]
    assert names[0] == "toyworld_concept_encoder.safetensors"
    assert encoder.family == "sd1" and encoder.text_encoder == "clip_l"
    assert encoder.config.width == 64 and encoder.config.num_tokens >= 1
    assert not any(p.requires_grad and p.grad is not None for p in encoder.module.parameters())


def test_encodes_rows_of_the_text_encoders_width(comfy, toy, encoder):
    model, clip, _ = toy
    m, c, ref, report = encode(comfy, model, clip, encoder, renders())
    k = encoder.config.num_tokens
    assert ref.concept.tokens["clip_l"].shape == (k, 64)
    assert ref.concept.kv_deltas == {} and ref.concept.method == "encoder"
    assert (ref.trigger, ref.class_noun, ref.family, ref.num_tokens) == ("sks", "circle", "sd1", k)
    assert m is not model and c is not clip
    assert "3 image(s) encoded in" in report and "not saved" in report
    # other objects give other rows; the same images give the same rows
    other = renders(render.ObjectSpec("square", "green", "dots", "white", emblem="circle", emblem_colour="purple"))
    _, _, ref2, _ = encode(comfy, model, clip, encoder, other)
    _, _, ref3, _ = encode(comfy, model, clip, encoder, renders())
    assert not torch.allclose(ref.concept.tokens["clip_l"], ref2.concept.tokens["clip_l"], atol=1e-3)
    assert torch.equal(ref.concept.tokens["clip_l"], ref3.concept.tokens["clip_l"])


def test_saved_concept_round_trips_bit_for_bit_and_loads(comfy, toy, encoder):
    from dci.comfyui.folders import concept_path
    from dci.files.concept import load_concept, same_concept

    model, clip, _ = toy
    _, c, ref, report = encode(comfy, model, clip, encoder, renders(), save_name="enc_roundtrip", overwrite=True)
    assert ref.name == "enc_roundtrip.safetensors" and "enc_roundtrip.safetensors" in report
    loaded = load_concept(concept_path(ref.name))
    assert same_concept(loaded, ref.concept)
    assert loaded.tokens["clip_l"].dtype == torch.float32
    assert torch.equal(loaded.tokens["clip_l"], ref.concept.tokens["clip_l"])
    # the same images again: the identical file is kept; other images under that name need overwrite
    *_, again = encode(comfy, model, clip, encoder, renders(), save_name="enc_roundtrip")
    assert "kept" in again
    with pytest.raises(ValueError, match="already exists with another concept"):
        encode(comfy, model, clip, encoder, renders(n=1), save_name="enc_roundtrip")
    # DCI Load Concept gives the same conditioning as the encoder's own CLIP
    (m2, c2, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=ref.name,
                                    strength_model=1.0, strength_clip=1.0)
    (a,), _ = comfy.run_node("CLIPTextEncode", clip=c, text=PROMPT)
    (b,), _ = comfy.run_node("CLIPTextEncode", clip=c2, text=PROMPT)
    assert torch.equal(a[0][0], b[0][0])


def test_prompt_encoder_finds_the_trigger_spans(comfy, toy, encoder):
    from dci.comfyui.sampling.prompt import COND_KEY

    model, clip, _ = toy
    _, c, ref, _ = encode(comfy, model, clip, encoder, renders())
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=PROMPT, auxiliary_noun="", concept=ref)
    data = pos[0][1][COND_KEY]
    k = ref.num_tokens
    # [start] a large <k rows> circle ...: the phrase covers the k rows and the class noun
    assert torch.nonzero(data.concept_mask).flatten().tolist() == list(range(3, 3 + k + 1))


def test_stock_text_encoder_uses_the_rows_only_at_the_trigger(comfy, toy, encoder):
    model, clip, _ = toy
    _, c, _, _ = encode(comfy, model, clip, encoder, renders())
    (with_trigger,), _ = comfy.run_node("CLIPTextEncode", clip=c, text=PROMPT)
    (plain_base,), _ = comfy.run_node("CLIPTextEncode", clip=clip, text="a large red circle on a green background")
    (plain_enc,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="a large red circle on a green background")
    (word,), _ = comfy.run_node("CLIPTextEncode", clip=clip, text=PROMPT)
    assert torch.equal(plain_base[0][0], plain_enc[0][0])
    assert not torch.allclose(with_trigger[0][0], word[0][0])


def test_inputs_are_unchanged_and_samples_run(comfy, toy, encoder):
    model, clip, _ = toy
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    patches, tokenizer = dict(model.patches), clip.tokenizer
    m, c, ref, _ = encode(comfy, model, clip, encoder, renders())
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text=PROMPT, auxiliary_noun="", concept=ref)
    (neg,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=128, height=128, batch_size=1)
    args = dict(model=m, seed=3, steps=3, cfg=4.5, sampler_name="euler", scheduler="normal", positive=pos,
                negative=neg, latent_image=lat, denoise=1.0)
    (dci,), _ = comfy.run_node("DCIKSampler", **args, split=0.5, lam=1.0, aux_map="reference",
                               guidance="separate", aux_seed=11)
    (stock,), _ = comfy.run_node("KSampler", **args)
    assert dci["samples"].shape == stock["samples"].shape == (1, 4, 16, 16)
    assert torch.isfinite(dci["samples"]).all() and torch.isfinite(stock["samples"]).all()
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dict(model.patches) == patches and clip.tokenizer is tokenizer


def test_other_sizes_are_cropped_and_resized(comfy, toy, encoder):
    model, clip, _ = toy
    img = renders(n=1)
    wide = torch.cat([torch.ones(1, 128, 32, 3), img, torch.ones(1, 128, 32, 3)], dim=2)  # 192 × 128
    _, _, ref, report = encode(comfy, model, clip, encoder, wide)
    _, _, ref1, _ = encode(comfy, model, clip, encoder, img)
    assert "centre-cropped 192×128 to 128×128" in report
    assert torch.equal(ref.concept.tokens["clip_l"], ref1.concept.tokens["clip_l"])
    _, _, _, report = encode(comfy, model, clip, encoder, torch.nn.functional.interpolate(
        img.movedim(-1, 1), size=(256, 256)).movedim(1, -1))
    assert "resized 256×256 to 128×128" in report


def test_bad_inputs_give_clear_errors(comfy, toy, encoder, tiny_sdxl):
    model, clip, _ = toy
    with pytest.raises(ValueError, match="DCI Encode Concept: no images"):
        encode(comfy, model, clip, encoder, torch.zeros(0, 128, 128, 3))
    with pytest.raises(ValueError, match="trigger word 'two words'"):
        encode(comfy, model, clip, encoder, renders(), trigger="two words")
    with pytest.raises(ValueError, match="class noun is empty"):
        encode(comfy, model, clip, encoder, renders(), class_noun=" ")
    with pytest.raises(ValueError, match="must come from DCI Load Concept Encoder"):
        encode(comfy, model, clip, "not an encoder", renders())
    with pytest.raises(ValueError, match="writes tokens for SD1"):
        encode(comfy, tiny_sdxl[0], tiny_sdxl[1], encoder, renders())


def test_encoder_for_another_width_or_a_wrong_file_is_refused(comfy, toy):
    import folder_paths

    from dci.files.concept_encoder import save_encoder
    from dci.method.concept_encoder import ConceptEncoder, EncoderConfig
    from dev.fixtures import random_concept, write_concept

    model, clip, _ = toy
    folder = Path(folder_paths.get_folder_paths("concept_encoders")[0])
    cfg = EncoderConfig(width=32, num_tokens=1)
    save_encoder(folder / "narrow.safetensors", ConceptEncoder(cfg).state_dict(), cfg.to_dict(), "sd1", "clip_l",
                 overwrite=True)
    names = comfy.node_class("DCILoadConceptEncoder").INPUT_TYPES()["required"]["encoder_name"][0]
    assert "narrow.safetensors" in names
    (narrow,), _ = comfy.run_node("DCILoadConceptEncoder", encoder_name="narrow.safetensors")
    with pytest.raises(ValueError, match="writes 32-wide tokens; this CLIP's clip_l is 64 wide"):
        encode(comfy, model, clip, narrow, renders())
    # a concept file is not an encoder
    name = write_concept(random_concept(model, clip), "not_an_encoder")
    (folder / name).write_bytes((Path(folder_paths.get_folder_paths("concepts")[0]) / name).read_bytes())
    with pytest.raises(ValueError, match="is not a concept encoder"):
        comfy.run_node("DCILoadConceptEncoder", encoder_name=name)
    with pytest.raises(ValueError, match="was not found"):
        comfy.run_node("DCILoadConceptEncoder", encoder_name="missing.safetensors")


TRAIN = dict(num_tokens=2, mode="ico", prefix_context="photo of a", suffix_context=".", steps=1, batch_size=1,
             learning_rate=1e-4, context_lr_multiplier=10.0, resolution=128, seed=0, precision="fp32",
             gradient_checkpointing=False, overwrite=True, resume=False, checkpoint_every=0, random_flip=False)


def test_training_starts_from_the_encoded_rows(comfy, toy, encoder):
    from dci.comfyui.folders import concept_path
    from dci.files.concept import load_concept

    model, clip, vae = toy
    images = renders()
    _, _, ref, _ = encode(comfy, model, clip, encoder, images)
    k = ref.num_tokens
    (_, _, trained, _), _ = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                           class_noun="circle", trigger_word="qxz", save_name="enc_start",
                                           start_concept=ref, **{**TRAIN, "num_tokens": k})
    saved = load_concept(concept_path(trained.name))
    assert torch.equal(saved.token_init["clip_l"], ref.concept.tokens["clip_l"])
    (_, _, plain, _), _ = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                         class_noun="circle", trigger_word="qxz", save_name="enc_plain",
                                         **{**TRAIN, "num_tokens": k})
    assert not torch.equal(load_concept(concept_path(plain.name)).token_init["clip_l"], ref.concept.tokens["clip_l"])
    with pytest.raises(ValueError, match="set num_tokens to match"):
        comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images, class_noun="circle",
                       trigger_word="qxz", save_name="enc_bad", start_concept=ref, **{**TRAIN, "num_tokens": k + 1})


def test_the_encode_and_sample_workflow_runs(comfy):
    """workflows/api/encode_concept_and_sample.json as shipped (fewer sampling steps): a folder of photos in,
    the encoded concept saved, a stock and a DCI sample per prompt out."""
    import json
    import shutil

    import folder_paths

    from dci.comfyui.folders import concept_path
    from dci.files.concept import load_concept

    repo = Path(__file__).resolve().parents[2]
    graph = json.loads((repo / "workflows" / "api" / "encode_concept_and_sample.json").read_text())
    folder = Path(folder_paths.get_input_directory()) / graph["2"]["inputs"]["folder"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for src in sorted((repo / "assets" / "toyworld" / "concepts" / "badge").glob("*.png"))[:5]:
        shutil.copyfile(src, folder / src.name)
    for node in graph.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 4
    executor, history = comfy.run_graph(graph)
    assert executor.success, executor.status_messages[-1]
    (image,) = history["outputs"]["61"]["images"]
    assert image["filename"].endswith(".png")
    saved = load_concept(concept_path(graph["5"]["inputs"]["save_name"] + ".safetensors"))
    assert saved.method == "encoder" and saved.training["images"] == 5 and not saved.kv_deltas
