"""The pack inside a real ComfyUI server, driven over HTTP and the websocket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dev import templates
from dev.comfy_client import ComfyError

pytestmark = pytest.mark.e2e

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def load_api(name: str) -> dict:
    """A shipped template, on the tiny checkpoint."""
    return templates.for_tiny(templates.load(name), max_steps=8)


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


def _client_cli(server, *args):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "dev" / "comfy_client.py"
    return subprocess.run([sys.executable, str(script), "--server", server.url, *args],
                          capture_output=True, text=True, timeout=300)


def tiny_workflow_file(tmp_path) -> str:
    path = tmp_path.parent / f"{tmp_path.name}_model_info_and_sample.json"
    path.write_text(json.dumps(load_api("model_info_and_sample.json")))
    return str(path)


def test_headless_client_queues_overrides_follows_and_downloads(server, tmp_path):
    wf = tiny_workflow_file(tmp_path)
    run = _client_cli(server, wf, "--set", "3.steps=3", "--set", "KSampler.seed=5", "--set",
                      "2.text=a red ball", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    (path,) = run.stdout.split()
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    assert "3/3" in run.stderr  # the progress bar of the sampler
    # a second run never overwrites the first download
    again = _client_cli(server, wf, "--set", "3.steps=2", "--out", str(tmp_path))
    assert again.returncode == 0 and again.stdout.split() != [path] and Path(path).exists()


def test_headless_client_reports_errors_readably(server, tmp_path):
    wf = tiny_workflow_file(tmp_path)
    bad = _client_cli(server, wf, "--set", "1.ckpt_name=missing.safetensors", "--out", str(tmp_path))
    assert bad.returncode == 1
    assert "node 1 (CheckpointLoaderSimple)" in bad.stderr and "missing.safetensors" in bad.stderr
    typo = _client_cli(server, wf, "--set", "3.stepz=3")
    assert typo.returncode == 1 and "has no input 'stepz'" in typo.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_start_log_holds_no_errors_and_no_tracebacks(server):
    """The database lives in the server's own base folder; a missing torchaudio is one plain line."""
    log = server.log()
    start = log[: log.index("Starting server")]
    for worry in ("Traceback", "Failed to initialize database", "unable to open database", "IMPORT FAILED",
                  "pip install", "ERROR"):
        assert worry not in start, worry
    assert start.count("torchaudio is not installed") == 1
    assert (server.base / "user" / "comfyui.db").is_file()
