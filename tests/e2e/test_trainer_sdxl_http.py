"""SDXL training in a real ComfyUI server, from a checkpoint file the stock loader detects as SDXL: the photos
come from the stock "Load Image Dataset from Folder" (a list of images of different sizes), DCI Train Concept
trains an ICO concept for both text encoders, and DCI KSampler samples it."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from dci.files.concept import load_concept

pytestmark = pytest.mark.e2e

TRAINER = "3"


@pytest.fixture(scope="module")
def sdxl_checkpoint(server):
    """The SDXL-detected tiny checkpoint (written once into the in-process models folder, then reused), linked
    into the server's checkpoints, and a folder of three photos of different sizes in its input folder."""
    import folder_paths
    from PIL import Image

    from dev.fixtures_sdxl import write_tiny_sdxl_checkpoint

    cached = write_tiny_sdxl_checkpoint(folder_paths.get_folder_paths("checkpoints")[0] + "/tiny_sdxl.safetensors")
    link = server.base / "models" / "checkpoints" / cached.name
    if not link.exists():
        os.symlink(cached, link)
    folder = server.base / "input" / "dci_sdxl_set"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(((72, 96), (64, 64), (100, 80))):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"photo_{i}.png")
    return cached.name


def graph(ckpt: str, save_name: str) -> dict:
    train = dict(class_noun="dog", trigger_word="qxz", num_tokens=1, mode="ico", prefix_context="photo of a",
                 suffix_context="", steps=1, batch_size=1, learning_rate=1e-5, context_lr_multiplier=10.0,
                 resolution=64, seed=0, precision="fp32", gradient_checkpointing=False, save_name=save_name,
                 overwrite=False, resume=False, checkpoint_every=0, random_flip=True)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "dci_sdxl_set"}},
        TRAINER: {"class_type": "DCITrainConcept", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                               "images": ["2", 0], **train}},
        "4": {"class_type": "DCIPromptEncode", "inputs": {"clip": ["3", 1], "text": "a photo of qxz dog",
                                                          "auxiliary_noun": "", "concept": ["3", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "blurry"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "DCIKSampler", "inputs": {"model": ["3", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                      "sampler_name": "euler", "scheduler": "normal",
                                                      "positive": ["4", 0], "negative": ["5", 0],
                                                      "latent_image": ["6", 0], "denoise": 1.0, "split": 0.5,
                                                      "lam": 1.0, "aux_map": "reference", "guidance": "shared",
                                                      "aux_seed": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


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
