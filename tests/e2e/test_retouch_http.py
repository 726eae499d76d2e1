"""Layout-and-Retouch through a real server: both stages and the inversion run in one graph, with progress."""

from __future__ import annotations

import io

import pytest

from dci.files.concept import save_concept
from dev.fixtures import random_concept

pytestmark = pytest.mark.e2e

PROMPT = "a photo of sks dog on the beach"


@pytest.fixture(scope="module")
def concept_on_server(server, comfy, tiny_checkpoint):
    model, clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    save_concept(random_concept(model, clip), server.base / "models" / "concepts", "lr_concept", overwrite=True)
    return server


def graph(ckpt: str, steps: int = 4) -> dict:
    sampler = {"seed": 3, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
               "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "DCILoadConcept", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "concept_name": "lr_concept.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "DCILayoutPromptEncode", "inputs": {"clip": ["2", 1], "concept": ["2", 2],
                                                                 "text": PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "DCILayoutKSampler", "inputs": {"model": ["2", 0], "vanilla_model": ["1", 0],
                                                             "positive": ["3", 0], "layout_positive": ["3", 1],
                                                             "switch": 0.5, **sampler}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "DCIInvertReference", "inputs": {"model": ["2", 0], "vae": ["1", 2], "image": ["7", 0],
                                                              "positive": ["3", 0], "steps": steps,
                                                              "scheduler": "normal", "refine": 1}},
        "9": {"class_type": "DCIRetouchModel", "inputs": {"model": ["2", 0], "reference": ["8", 0],
                                                           "context": ["6", 1], "mask_threshold": 0.4, "start": 0.3,
                                                           "end": 0.8, "decoder_levels": 2, "positive": ["3", 0]}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["9", 0], "positive": ["3", 0], **sampler}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "lr_http"}},
        "13": {"class_type": "PreviewAny", "inputs": {"source": ["8", 2]}},
    }


def test_layout_and_retouch_runs_on_a_server(concept_on_server, tiny_checkpoint):
    server = concept_on_server
    client = server.client()
    result = client.run(graph(tiny_checkpoint.name), timeout=300)
    assert result.status == "success", result.error
    # the retouch pass begins at start 0.3 (the first of the 4 steps is the context's own): 3 steps, each reported
    assert [v for v, _ in result.progress(node="10")] == [1, 2, 3]
    assert [v for v, _ in result.progress(node="6")][-1] == 2  # stage 1's second segment: steps 2-4 of 4
    inversion = [v for v, _ in result.progress(node="8")]
    assert inversion and inversion[-1] == 4 * (1 + 2)  # (refine + 2) model calls per step
    from PIL import Image

    (image,) = result.images()
    assert Image.open(io.BytesIO(client.view(image))).size == (64, 64)
    assert "round trip" in str(result.outputs()["13"])


def test_a_bad_switch_is_refused_before_anything_runs(concept_on_server, tiny_checkpoint):
    from dev.comfy_client import ComfyError

    g = graph(tiny_checkpoint.name)
    g["6"]["inputs"]["switch"] = 1.5
    with pytest.raises(ComfyError) as refused:
        concept_on_server.client().run(g, timeout=60)
    assert "switch" in str(refused.value.details)


def test_a_prompt_without_the_trigger_fails_with_the_node_message(concept_on_server, tiny_checkpoint):
    g = graph(tiny_checkpoint.name)
    g["3"]["inputs"]["text"] = "a photo of a dog on the beach"
    result = concept_on_server.client().run(g, timeout=120)
    assert result.status == "error"
    assert "is not in the prompt" in result.error["exception_message"]
