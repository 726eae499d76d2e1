"""DCI Model Info executed in-process the way ComfyUI executes nodes."""

from __future__ import annotations

import json

import pytest


def test_tiny_in_memory_model_is_described(comfy, tiny_sd15):
    model, clip, _ = tiny_sd15
    (text,), ui = comfy.run_node("DCIModelInfo", model=model, clip=clip)
    info = json.loads(text)
    assert info["family"] == "sd1"
    assert info["config"] == "SD15"
    assert info["context_dim"] == [64]
    # 2 levels with one transformer each on the way down, the middle block, 2 × 2 on the way up
    assert info["cross_attention_layers"] == 7
    assert info["kv_parameters"] == sum(2 * 64 * layer["heads"] * layer["dim_head"] for layer in info["layers"])
    assert info["infusion_values"] == sum(layer["heads"] * layer["dim_head"] for layer in info["layers"])
    assert info["text_encoders"] == ["l"]
    assert ui == {"text": [text]}


def test_tiny_checkpoint_loads_as_sd15_through_the_stock_loader(comfy, tiny_checkpoint):
    model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    (text,), _ = comfy.run_node("DCIModelInfo", model=model)
    info = json.loads(text)
    assert info["family"] == "sd1"
    assert info["context_dim"] == [768]
    assert info["cross_attention_layers"] == 4
    assert [layer["name"] for layer in info["layers"]] == ["input.1.0", "output.0.0", "output.1.0", "middle.0.0"]


@pytest.mark.parametrize("bad", ["not a model", None, 3])
def test_a_non_model_input_is_a_clear_error(comfy, bad):
    with pytest.raises(ValueError, match="'model' must be a MODEL"):
        comfy.run_node("DCIModelInfo", model=bad)


def test_runs_inside_the_prompt_executor(comfy, tiny_checkpoint):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": "DCIModelInfo", "inputs": {"model": ["1", 0], "clip": ["1", 1]}},
    }
    executor, history = comfy.run_graph(graph)
    assert executor.success, executor.status_messages
    text = history["outputs"]["2"]["text"][0]
    assert json.loads(text)["family"] == "sd1"
