"""Every shipped workflow is a template for a real checkpoint (or the toy model) and runs, as shipped, on a real
server once ``dev.templates.for_tiny`` has swapped in the tiny checkpoint, its resolution and short step counts;
the files a template reads (photos, concepts, a foreign training run) are put where its widgets say."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dci.files.concept import save_concept
from dev import templates
from dev.fixtures import random_concept

pytestmark = pytest.mark.e2e

NAMES = sorted(p.stem for p in templates.API.glob("*.json"))
# SDXL templates run in test_trainer_sdxl_http.py, whose server holds the (2 GB) tiny SDXL checkpoint file
SD15_OR_TOY = [n for n in NAMES if templates.families(templates.load(n)) <= {"sd15"}]
TOY_LOADER = "DCIToyWorldLoader"
OUTPUT_NODES = {"SaveImage", "PreviewImage", "PreviewAny", "DCIModelInfo"}
TOY_RENDERS = templates.API.parents[1] / "assets" / "toyworld" / "concepts" / "badge"


def _is_toy(graph: dict) -> bool:
    return any(n["class_type"] == TOY_LOADER for n in graph.values())


@pytest.mark.parametrize("name", NAMES)
def test_a_template_names_a_real_model_at_its_native_resolution(name):
    graph = templates.load(name)
    if _is_toy(graph):
        assert not templates.families(graph), "a toy-world graph names a real checkpoint too"
        return
    (family,) = templates.families(graph)
    real, size, *_ = templates.REAL_MODELS[family]
    sizes = [v for n in graph.values() for k, v in n["inputs"].items() if k in templates.SIZE_INPUTS]
    assert sizes and set(sizes) == {size}, f"{name}: sizes {sizes} are not the native {size} of {real}"
    tiny = templates.for_tiny(graph)
    assert all(v == templates.REAL_MODELS[family][3] for n in tiny.values() for k, v in n["inputs"].items()
               if k in templates.SIZE_INPUTS)


def _photos(folder, n: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        h, w = (72, 96) if i % 2 else (80, 64)  # photos of different sizes
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"photo_{i}.png")


CONCEPT_WORDS = (("sks", "dog"), ("zwx", "mug"))  # (trigger, class noun) of a graph's first, second concept


def _prepare(server, comfy, ckpt: str, graph: dict) -> None:
    """The files the template's widgets name, in the server's folders."""
    base = server.base
    concepts = 0
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "LoadImageDataSetFromFolder":
            folder = base / "input" / inputs["folder"]
            if _is_toy(graph):
                folder.mkdir(parents=True, exist_ok=True)
                for src in sorted(TOY_RENDERS.glob("*.png"))[:5]:
                    shutil.copyfile(src, folder / src.name)
            else:
                _photos(folder, 3)
        elif kind == "LoadImage":
            _photos(base / "input" / "_single", 1)
            shutil.copyfile(base / "input" / "_single" / "photo_0.png", base / "input" / inputs["image"])
        elif kind == "DCILoadConcept":
            model, clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=ckpt)[0]
            name = inputs["concept_name"].removesuffix(".safetensors")
            trigger, noun = CONCEPT_WORDS[concepts]
            concepts += 1
            save_concept(random_concept(model, clip, trigger=trigger, class_noun=noun), base / "models" / "concepts",
                         name, overwrite=True)
        elif kind == "DCIImportConcept":
            from dev.foreign_files import write_diffusers

            model, _, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=ckpt)[0]
            folder, _, _ = write_diffusers(model, 768, n_tokens=1)
            target = base / "input" / inputs["source"]
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(folder), target)


def test_every_sdxl_template_is_run_elsewhere():
    runner = Path(__file__).with_name("test_trainer_sdxl_http.py").read_text()
    others = [n for n in NAMES if n not in SD15_OR_TOY]
    assert others and all(f'TEMPLATE = "{n}"' in runner for n in others), others


@pytest.mark.parametrize("name", SD15_OR_TOY)
def test_every_template_runs_on_the_tiny_models(server, comfy, tiny_checkpoint, name):
    graph = templates.for_tiny(templates.load(name))
    _prepare(server, comfy, tiny_checkpoint.name, graph)
    result = server.client().run(graph, timeout=900)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    outputs = result.outputs()
    expected = {k for k, n in graph.items() if n["class_type"] in OUTPUT_NODES}
    assert expected and expected <= set(outputs), f"no output from {sorted(expected - set(outputs))}"
