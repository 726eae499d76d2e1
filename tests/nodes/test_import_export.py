"""DCI Import/Export Concept in-process: foreign Custom Diffusion files (built by dev/foreign_files.py from their
documented key layouts) import, sample and round-trip bit-exactly; exports load in the stock LoRA loader and
`embedding:` syntax; damaged or unsafe files are clear errors that write nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dci.comfyui.concept import base_kv_weights
from dci.comfyui.tokenizer import text_encoder_widths
from dci.files.concept import load_concept
from dev import templates
from dev.fixtures import random_concept, write_concept
from dev.foreign_files import (
    assert_same_concept,
    concept_file,
    diffusers_names,
    do_export,
    do_import,
    encode,
    finetuned,
    fresh_source,
    input_dir,
    reimport_exported,
    sample,
    snapshot,
    write_adobe,
    write_diffusers,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one torch thread is ~100x faster than two fighting a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- import, sample, export, re-import ----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_diffusers_import_samples_and_round_trips_exactly(comfy, tiny_sd15, suffix):
    model, clip, _ = tiny_sd15
    folder, full, tokens = write_diffusers(model, 64, suffix)
    m, c, ref, ui = do_import(comfy, model, clip, folder.name)
    assert (ref.trigger, ref.class_noun, ref.num_tokens) == ("new1_new2", "dog", 2)
    concept = load_concept(concept_file(ref))
    assert torch.equal(concept.tokens["clip_l"], torch.stack([tokens["<new1>"], tokens["<new2>"]]))
    base = base_kv_weights(model)
    for key, w in full.items():  # base + delta, in float64 and cast back, is the source weight bit for bit
        assert torch.equal((base[key].double() + concept.kv_deltas[key].double()).float(), w), key
    assert "saved:" in ui["text"][0] and "new1_new2 dog" in ui["text"][0]

    # the stock sampler uses it: the trigger prompt changes the result
    assert not torch.equal(sample(comfy, m, c, "a photo of new1_new2 dog"), sample(comfy, model, clip, "a photo of new1_new2 dog"))

    paths, ui = do_export(comfy, model, ref.name, "diffusers")
    names = sorted(p.name for p in paths)
    assert names == ["new1.safetensors", "new2.safetensors", "pytorch_custom_diffusion_weights.safetensors"]
    written = load_file(str(paths[0].parent / "pytorch_custom_diffusion_weights.safetensors"))
    for key, w in full.items():
        attn, _, proj = diffusers_names(model)[key].rpartition(".to_")
        assert torch.equal(written[f"{attn}.processor.to_{proj[0]}_custom_diffusion.weight"], w)
    assert load_file(str(paths[0].parent / "new2.safetensors")).keys() == {"<new2>"}
    assert "<new1> <new2> dog" in ui["text"][0]

    _, _, ref2, _ = reimport_exported(comfy, model, clip, paths[0].parent)
    assert_same_concept(concept, load_concept(concept_file(ref2)))


@pytest.mark.parametrize("variant", ["plain", "compressed", "compvis", "compvis-compressed"])
def test_adobe_delta_variants_import_and_round_trip_exactly(comfy, tiny_sd15, variant):
    model, clip, _ = tiny_sd15
    folder, full, tokens, factors = write_adobe(model, 64, variant)
    m, c, ref, _ = do_import(comfy, model, clip, f"{folder.name}/delta.bin", format="adobe", trigger="sks")
    concept = load_concept(concept_file(ref))
    assert ref.trigger == "sks" and concept.num_tokens == 2
    assert torch.equal(concept.tokens["clip_l"][1], tokens["<new2>"])
    if variant.endswith("compressed"):
        assert all(torch.equal(concept.kv_deltas[k], factors[k]) for k in factors)  # the change is u @ v
    else:
        base = base_kv_weights(model)
        assert all(torch.equal((base[k].double() + concept.kv_deltas[k].double()).float(), w) for k, w in full.items())
    paths, _ = do_export(comfy, model, ref.name, "diffusers")
    _, _, ref2, _ = reimport_exported(comfy, model, clip, paths[0].parent)
    assert_same_concept(concept, load_concept(concept_file(ref2)))
    # and once more: export → import is a fixed point for the exported weights as well
    paths2, _ = do_export(comfy, model, ref2.name, "diffusers")
    a = load_file(str(paths[0].parent / "pytorch_custom_diffusion_weights.safetensors"))
    b = load_file(str(paths2[0].parent / "pytorch_custom_diffusion_weights.safetensors"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_token_selection_for_a_multi_concept_source(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    folder, _, tokens = write_diffusers(model, 64, n_tokens=2)
    _, c, ref, _ = do_import(comfy, model, clip, folder.name, tokens="<new2>", class_noun="mug")
    assert (ref.trigger, ref.num_tokens) == ("new2", 1)
    vectors = [t[0] for t in c.tokenize("a new2 mug")["l"][0] if isinstance(t[0], torch.Tensor)]
    assert len(vectors) == 1 and torch.equal(vectors[0], tokens["<new2>"])
    with pytest.raises(ValueError, match=r"token '<new7>' is not in the source; it has <new1>, <new2>"):
        do_import(comfy, model, clip, folder.name, tokens="<new7>")


def test_reimport_is_idempotent_and_never_overwrites_silently(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    folder, _, _ = write_diffusers(model, 64)
    *_, ref, _ = do_import(comfy, model, clip, folder.name, save_name="interop_same")
    before = concept_file(ref).stat().st_mtime_ns
    *_, ui = do_import(comfy, model, clip, folder.name, save_name="interop_same")
    assert "unchanged" in ui["text"][0] and concept_file(ref).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="already exists with another concept; choose another save_name or allow"):
        do_import(comfy, model, clip, folder.name, save_name="interop_same", class_noun="cat")
    *_, ui = do_import(comfy, model, clip, folder.name, save_name="interop_same", class_noun="cat", overwrite=True)
    assert load_concept(concept_file(ref)).class_noun == "cat"

    paths, _ = do_export(comfy, model, ref.name, "comfy_lora_and_embedding", name="interop_same_export")
    again, ui = do_export(comfy, model, ref.name, "comfy_lora_and_embedding", name="interop_same_export")
    assert again == paths and ui["text"][0].count("unchanged") == 2
    other = write_concept(random_concept(model, clip, trigger="zq", class_noun="cup", k=1), "interop_other")
    with pytest.raises(ValueError, match="already exists with other content"):
        do_export(comfy, model, other, "comfy_lora_and_embedding", name="interop_same_export")


# -- exports in stock ComfyUI ------------------------------------------------------------------------------------
def test_exported_lora_in_the_stock_loader_matches_the_concept_loader(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    name = write_concept(random_concept(model, clip, trigger="qlx", class_noun="toy"), "interop_lora_src")
    paths, ui = do_export(comfy, model, name, "comfy_lora_and_embedding")
    lora = next(p for p in paths if "loras" in p.parts)
    assert all(k.endswith(".attn2.to_k.diff") or k.endswith(".attn2.to_v.diff") for k in load_file(str(lora)))
    for strength in (1.0, 0.5):
        (m_lora,), _ = comfy.run_node("LoraLoaderModelOnly", model=model, lora_name=lora.name, strength_model=strength)
        (m_dci, c_dci, _), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                              strength_model=strength, strength_clip=1.0)
        assert len(m_lora.patches) == len(m_dci.patches) == 14
        a = sample(comfy, m_lora, clip, "a photo of a toy")
        b = sample(comfy, m_dci, clip, "a photo of a toy")
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert not torch.equal(a, sample(comfy, model, clip, "a photo of a toy"))


def test_exported_embedding_works_through_embedding_syntax_in_the_stock_encoder(comfy, tiny_checkpoint):
    model, clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    folder, *_ = write_adobe(model, 768, "plain")
    m, c, ref, _ = do_import(comfy, model, clip, folder.name, trigger="zwx", class_noun="plush")
    paths, ui = do_export(comfy, model, ref.name, "comfy_lora_and_embedding", name="interop_zwx")
    emb = load_file(str(next(p for p in paths if "embeddings" in p.parts)))
    assert emb.keys() == {"clip_l"} and emb["clip_l"].shape == (2, 768)
    assert "embedding:interop_zwx plush" in ui["text"][0]
    stock = encode(comfy, clip, "a photo of embedding:interop_zwx plush")
    ours = encode(comfy, c, "a photo of zwx plush")
    assert torch.equal(stock, ours)
    assert not torch.equal(stock, encode(comfy, clip, "a photo of plush"))


def _tiny_sdxl():
    """An SDXL-family MODEL and a CLIP with a 64-wide clip_l and a 96-wide clip_g (import needs no sampling)."""
    from dev.fixtures import tiny_sdxl_in_memory

    model, clip, _ = tiny_sdxl_in_memory(seed=0)
    return model, clip


@pytest.mark.parametrize("layout", ["list", "concatenated"])
def test_sdxl_tokens_are_split_per_encoder_and_exported_for_both(comfy, layout):
    model, clip = _tiny_sdxl()
    assert text_encoder_widths(clip) == {"clip_l": 64, "clip_g": 96}
    folder = fresh_source("sdxl")
    g = torch.Generator().manual_seed(0)
    l_vec, g_vec = torch.randn(64, generator=g), torch.randn(96, generator=g)
    token = [l_vec, g_vec] if layout == "list" else torch.cat([l_vec, g_vec])
    unet = {diffusers_names(model)[k]: w for k, w in finetuned(model).items()}
    torch.save({"unet": unet, "modifier_token": {"<new1>": token}}, folder / "delta.bin")
    _, _, ref, _ = do_import(comfy, model, clip, folder.name, class_noun="cat")
    concept = load_concept(concept_file(ref))
    assert concept.family == "sdxl"
    assert torch.equal(concept.tokens["clip_l"][0], l_vec) and torch.equal(concept.tokens["clip_g"][0], g_vec)
    paths, _ = do_export(comfy, model, ref.name, "comfy_lora_and_embedding")
    emb = load_file(str(next(p for p in paths if "embeddings" in p.parts)))
    assert emb.keys() == {"clip_l", "clip_g"} and emb["clip_g"].shape == (1, 96)
    paths, _ = do_export(comfy, model, ref.name, "diffusers")
    _, _, ref2, _ = reimport_exported(comfy, model, clip, paths[0].parent)
    assert_same_concept(concept, load_concept(concept_file(ref2)))


# -- bad inputs: clear errors, nothing written -------------------------------------------------------------------
def _damage(kind: str, model, folder: Path) -> None:
    weights = folder / "pytorch_custom_diffusion_weights.safetensors"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
    elif kind == "corrupted header":
        data = bytearray(weights.read_bytes())
        data[8:20] = b"#not-json###"
        weights.write_bytes(bytes(data))
    elif kind == "empty":
        weights.write_bytes(b"")
    elif kind in ("int dtype", "wrong shape", "nan", "train_q_out"):
        sd = load_file(str(weights))
        key = next(iter(sd))
        if kind == "int dtype":
            sd[key] = sd[key].to(torch.int32)
        elif kind == "wrong shape":
            sd[key] = sd[key][:, :-1].contiguous()
        elif kind == "nan":
            sd[key][0, 0] = float("nan")
        else:
            sd[key.replace("to_k_custom_diffusion", "to_q_custom_diffusion")] = sd[key].clone()
        save_file(sd, str(weights))
    elif kind == "bad token file":
        (folder / "<new1>.bin").write_bytes(b"\x80\x02garbage")
    elif kind == "no tokens":
        for p in folder.glob("<new*"):
            p.unlink()


@pytest.mark.parametrize("kind, message", [
    ("truncated", "truncated"),
    ("corrupted header", "corrupted safetensors header"),
    ("empty", "is empty"),
    ("int dtype", "expected floating-point values, found torch.int32"),
    ("wrong shape", r"in the source but \[\d+, 64\] in this MODEL"),
    ("nan", "NaN or infinite"),
    ("train_q_out", "query/output"),
    ("bad token file", r"<new1>\.bin could not be read as a PyTorch file"),
    ("no tokens", "no modifier tokens"),
])
def test_damaged_sources_are_clear_errors_and_write_nothing(comfy, tiny_sd15, kind, message):
    model, clip, _ = tiny_sd15
    folder, _, _ = write_diffusers(model, 64)
    _damage(kind, model, folder)
    before = snapshot()
    with pytest.raises(ValueError, match=message) as err:
        do_import(comfy, model, clip, folder.name)
    assert str(err.value).startswith("DCI Import Concept: ")
    assert snapshot() == before


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_malicious_pickle_is_refused_and_its_code_never_runs(comfy, tiny_sd15, tmp_path):
    model, clip, _ = tiny_sd15
    folder = fresh_source("pickle")
    marker = tmp_path / "payload-ran"
    torch.save({"unet": {"x.attn2.to_k.weight": _Payload(str(marker))}, "modifier_token": {}}, folder / "delta.bin")
    # the payload is live: an unrestricted load runs it
    torch.load(folder / "delta.bin", weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    before = snapshot()
    with pytest.raises(ValueError, match=r"delta\.bin was refused: unpickling it needs Python objects") as err:
        do_import(comfy, model, clip, folder.name)
    assert "weights_only" in str(err.value)
    assert not marker.exists()
    assert snapshot() == before


def test_wrong_family_is_a_clear_error(comfy, tiny_sd15, tiny_checkpoint):
    model, clip, _ = tiny_sd15
    ck_model, ck_clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    folder, _, _ = write_diffusers(ck_model, 768)  # made for another layout, 768-wide tokens
    before = snapshot()
    with pytest.raises(ValueError, match="made for another model family or architecture"):
        do_import(comfy, model, clip, folder.name)
    folder, _, _ = write_diffusers(model, 768)  # right layout, tokens of another width
    with pytest.raises(ValueError, match="token <new1> is 768 wide, but this CLIP expects clip_l 64"):
        do_import(comfy, model, clip, folder.name)
    sdxl_model, sdxl_clip = _tiny_sdxl()
    with pytest.raises(ValueError, match="made for another model family or architecture"):
        do_import(comfy, sdxl_model, sdxl_clip, folder.name)
    assert snapshot() == before


def test_sources_names_and_choices_are_validated(comfy, tiny_sd15, tmp_path):
    model, clip, _ = tiny_sd15
    folder, _, _ = write_diffusers(model, 64)
    outside = tmp_path / "outside"
    shutil.copytree(folder, outside)
    before = snapshot()
    cases = [
        (dict(source="../" + folder.name), "without '..'"),
        (dict(source=str(outside)), "is outside the folders imports may read"),
        (dict(source="no_such_run"), "was not found in"),
        (dict(source=""), "no source given"),
        (dict(source=folder.name, save_name="../evil"), "must be a plain file name"),
        (dict(source=folder.name, format="adobe"), "is in diffusers format, not adobe"),
        (dict(source=folder.name, format="kohya"), "format must be one of auto, diffusers, adobe"),
        (dict(source=folder.name, trigger="two words"), "trigger word 'two words' is not usable"),
        (dict(source=folder.name, class_noun=""), "enter the class noun"),
        (dict(source=folder.name, overwrite="yes"), "overwrite must be true or false"),
    ]
    for kw, message in cases:
        source = kw.pop("source")
        with pytest.raises(ValueError, match=message):
            do_import(comfy, model, clip, source, **kw)
    name = write_concept(random_concept(model, clip, trigger="vv", class_noun="cup", k=1), "interop_names")
    before = snapshot()
    for kw, message in [
        (dict(name="../evil"), "must be a plain file name"),
        (dict(target="a1111"), "target must be one of"),
        (dict(precision="float8"), "precision must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            do_export(comfy, model, name, kw.pop("target", "diffusers"), **kw)
    with pytest.raises(ValueError, match="was not found"):
        do_export(comfy, model, "interop_missing.safetensors", "diffusers")
    assert snapshot() == before


# -- example workflows ------------------------------------------------------------------------------------------
def _workflow(name: str) -> dict:
    """A shipped template, on the tiny checkpoint."""
    return templates.for_tiny(templates.load(name))


def test_load_concept_and_sample_workflow_runs(comfy, tiny_checkpoint):
    graph = _workflow("load_concept_and_sample.json")
    graph["1"]["inputs"]["ckpt_name"] = tiny_checkpoint.name
    model, clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    concept = random_concept(model, clip, trigger="sks", class_noun="dog", k=1)
    write_concept(concept, graph["2"]["inputs"]["concept_name"])
    assert "sks dog" in graph["3"]["inputs"]["text"]
    graph["6"]["inputs"]["steps"] = 2
    executor, history = comfy.run_graph(graph)
    assert executor.success, executor.status_messages[-1]
    assert history["outputs"]["8"]["images"]


def test_concept_import_export_workflow_runs(comfy, tiny_checkpoint):
    import folder_paths

    graph = _workflow("concept_import_export.json")
    graph["1"]["inputs"]["ckpt_name"] = tiny_checkpoint.name
    model, _, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    source = input_dir() / graph["2"]["inputs"]["source"]
    shutil.rmtree(source, ignore_errors=True)
    folder, _, _ = write_diffusers(model, 768, n_tokens=1)
    folder.rename(source)
    for node in ("2", "3", "4"):
        graph[node]["inputs"]["overwrite"] = True  # the models folders are shared by the whole test session
    graph["7"]["inputs"]["steps"] = 2
    executor, history = comfy.run_graph(graph)
    assert executor.success, executor.status_messages[-1]
    outputs = history["outputs"]
    lora_name = graph["3"]["inputs"]["name"] + ".safetensors"
    assert lora_name in folder_paths.get_filename_list("loras")
    assert any("pytorch_custom_diffusion_weights.safetensors" in t for t in outputs["4"]["text"])
    assert outputs["9"]["images"]
