"""DCI Fisher Divergence in a real ComfyUI server: its report reaches the client as the node's text, progress
arrives on the websocket, and Cancel (``POST /interrupt``) stops it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

FISHER = "5"


def graph(ckpt: str, seeds: int, levels: int) -> dict:
    """The checkpoint's MODEL against itself (the divergence is 0)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        FISHER: {"class_type": "DCIFisherDivergence", "inputs": {
            "base_model": ["1", 0], "custom_model": ["1", 0], "clip": ["1", 1],
            "prompts": "a photo of a cat\na red house", "seeds_per_prompt": seeds, "seed": 0,
            "noise_levels": levels, "sample_steps": 2, "cfg": 5.0, "width": 64, "height": 64,
            "sampler_name": "euler", "scheduler": "normal"}},
    }


def test_fisher_report_and_progress_over_http(server, tiny_checkpoint):
    result = server.client().run(graph(tiny_checkpoint.name, 2, 2), timeout=300)
    assert result.status == "success", result.error
    text = result.outputs()[FISHER]["text"][0]
    assert "ε space:     0 ± 0" in text and "4 latents × 2 noise levels" in text
    assert result.progress(node=FISHER)[-1] == (10, 10)  # 2 prompts × (1 sampling + 2 × 2 predictions)


def test_fisher_stops_on_interrupt(server, tiny_checkpoint):
    client = server.client()
    sent = []

    def cancel(event, data):
        if event == "progress" and str(data.get("node")) == FISHER and data["max"] > 20 and not sent:
            sent.append(data["value"])
            client.interrupt()

    result = client.run(graph(tiny_checkpoint.name, 4, 100), timeout=300, on_message=cancel)
    assert sent and result.status == "interrupted", result.messages[-3:]
