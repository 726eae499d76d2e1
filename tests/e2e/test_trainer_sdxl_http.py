"""SDXL training in a real ComfyUI server, from a checkpoint file the stock loader detects as SDXL: the photos
come from the stock "Load Image Dataset from Folder" (a list of images of different sizes), DCI Train Concept
trains an ICO concept for both text encoders, and DCI KSampler samples it: the shipped SDXL template, as
``dev.templates.for_tiny`` makes it."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from dci.files.concept import load_concept
from dev import templates

pytestmark = pytest.mark.e2e

TRAINER = "3"
TEMPLATE = "sdxl_train_and_sample"


@pytest.fixture(scope="module")
def sdxl_checkpoint(server):
    """The SDXL-detected tiny checkpoint (written once into the host cache, then reused by every run), linked
    into the server's checkpoints as tiny_sdxl.safetensors, and a folder of three photos of different sizes in
    its input folder."""
    from PIL import Image

    from dev.fixtures_sdxl import cached_tiny_sdxl_checkpoint

    cached = cached_tiny_sdxl_checkpoint()
    link = server.base / "models" / "checkpoints" / "tiny_sdxl.safetensors"
    if not link.exists():
        os.symlink(cached, link)
    folder = server.base / "input" / "dci_sdxl_set"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(((72, 96), (64, 64), (100, 80))):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"photo_{i}.png")
    return link.name


def graph(ckpt: str, save_name: str) -> dict:
    """The shipped SDXL template (``workflows/api/sdxl_train_and_sample.json``) on the tiny SDXL checkpoint; this
    test is where that template runs (``test_templates`` leaves SDXL graphs to it: one 2 GB load, not two)."""
    g = templates.for_tiny(templates.load(TEMPLATE), max_train_steps=1)
    assert g["1"]["inputs"]["ckpt_name"] == ckpt
    g["2"]["inputs"]["folder"] = "dci_sdxl_set"
    g[TRAINER]["inputs"].update(save_name=save_name, num_tokens=1)
    return g


def test_sdxl_checkpoint_trains_from_a_dataset_folder_and_samples_with_dci(server, sdxl_checkpoint):
    name = f"e2e_sdxl_{uuid.uuid4().hex[:8]}"
    result = server.client().run(graph(sdxl_checkpoint, name), timeout=900)
    assert result.status == "success", result.error
    assert result.progress(node=TRAINER) == [(1, 1)]
    concept = load_concept(server.base / "models" / "concepts" / f"{name}.safetensors")
    assert concept.family == "sdxl" and concept.training["images"] == 3
    assert {k: tuple(v.shape) for k, v in concept.tokens.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}
    assert concept.contexts["clip_g.prefix"].shape == (3, 3, 1280)
    assert len(result.images()) >= 1
