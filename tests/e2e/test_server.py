"""The pack inside a real ComfyUI server, driven over HTTP and the websocket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_client import ComfyError

pytestmark = pytest.mark.e2e

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / name).read_text())


def test_object_info_lists_our_nodes(server):
    info = server.client().object_info()
    assert "DCIModelInfo" in info
    node = info["DCIModelInfo"]
    assert node["category"] == "concept/utils"
    assert node["input"]["required"]["model"][0] == "MODEL"
    assert node["output_node"] is True


def test_example_graph_runs_with_progress_history_and_view(server):
    graph = load_api("model_info_and_sample.json")
    graph["3"]["inputs"]["steps"] = 4
    client = server.client()
    result = client.run(graph, timeout=300)
    assert result.status == "success", result.error
    sampler_progress = result.progress(node="3")
    assert [v for v, _ in sampler_progress] == [1, 2, 3, 4], result.messages
    info = json.loads(result.outputs()["8"]["text"][0])
    assert info["family"] == "sd1" and info["cross_attention_layers"] == 4
    images = result.images()
    assert len(images) == 1
    png = client.view(images[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_graph_is_refused_with_node_errors_and_the_server_keeps_serving(server):
    graph = load_api("model_info_and_sample.json")
    graph["1"]["inputs"]["ckpt_name"] = "does_not_exist.safetensors"
    client = server.client()
    with pytest.raises(ComfyError) as err:
        client.queue(graph)
    assert "1" in err.value.details["node_errors"]
    assert "does_not_exist.safetensors" in str(err.value)
    assert server.alive()
    assert "DCIModelInfo" in client.object_info("DCIModelInfo")
