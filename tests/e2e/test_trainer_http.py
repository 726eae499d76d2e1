"""DCI Train Concept in a real ComfyUI server: the example training workflow end to end (regularisation
images from the stock KSampler, training, sampling with the trained concept), progress on the websocket
every step, and Cancel (``POST /interrupt``) mid-training leaving a loadable, resumable checkpoint."""

from __future__ import annotations

import uuid

import pytest
import torch

from dci.files.concept import TRAIN_STATE_SUFFIX, load_concept
from dev import templates

pytestmark = pytest.mark.e2e

TRAINER = "10"


@pytest.fixture(scope="module")
def trainable(server, tiny_checkpoint):
    """The tiny checkpoint, and two concept photos in the server's input folder."""
    from PIL import Image

    name = tiny_checkpoint.name
    folder = server.base / "input" / templates.load("train_concept")["2"]["inputs"]["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(72, 96), (80, 64)], start=1):  # photos of different sizes, as users have them
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"dci_concept_{i}.png")
    return name


def graph(ckpt: str, save_name: str, steps: int) -> dict:
    g = templates.for_tiny(templates.load("train_concept"))
    assert g["1"]["inputs"]["ckpt_name"] == ckpt
    g["7"]["inputs"]["batch_size"] = 2
    g[TRAINER]["inputs"].update(steps=steps, save_name=save_name)
    return g


def test_training_workflow_runs_with_progress_every_step(server, trainable):
    name = f"e2e_{uuid.uuid4().hex[:8]}"
    result = server.client().run(graph(trainable, name, steps=3), timeout=600)
    assert result.status == "success", result.error
    assert result.progress(node=TRAINER) == [(1, 3), (2, 3), (3, 3)]
    concept = load_concept(server.base / "models" / "concepts" / f"{name}.safetensors")
    assert concept.steps == 3 and concept.method == "ico" and concept.training["reg_images"] == 2
    assert concept.contexts["clip_l.prefix"].shape == (2, 3, 768)
    assert any(img["filename"].startswith("train_concept") for img in result.images())


def test_interrupt_mid_training_leaves_a_loadable_checkpoint(server, trainable):
    name = f"e2e_cancel_{uuid.uuid4().hex[:8]}"
    client = server.client()
    sent = []

    def cancel_after_two_steps(event, data):
        if event == "progress" and str(data.get("node")) == TRAINER and data["value"] >= 2 and not sent:
            sent.append(data["value"])
            client.interrupt()

    g = graph(trainable, name, steps=2000)
    result = client.run(g, timeout=600, on_message=cancel_after_two_steps)
    assert result.status == "interrupted", result.messages[-3:]
    path = server.base / "models" / "concepts" / f"{name}.safetensors"
    concept = load_concept(path)
    assert sent and 2 <= concept.steps < 2000
    assert path.with_name(f"{name}{TRAIN_STATE_SUFFIX}").is_file()
    # the checkpoint loads in the stock pipeline through DCI Load Concept
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": trainable}},
        "2": {"class_type": "DCILoadConcept", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                         "concept_name": path.name, "strength_model": 1.0,
                                                         "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a qxz dog"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }
    loaded = client.run(g, timeout=300)
    assert loaded.status == "success", loaded.error
