"""``make demo``'s fidelity scale, measured through a real ComfyUI server on the bundled toy model: the base
model on the class prompt (floor) and VAE round trips of clean concept renders (ceiling)."""

from __future__ import annotations

import json

import pytest

from dev import demo, demo_yardstick
from dev.toyworld.concepts import CONCEPTS
from dev.toyworld.fidelity import FidelityMeter

pytestmark = pytest.mark.e2e


def demo_graph() -> tuple[dict, list[str]]:
    graph = json.loads(demo.WORKFLOW.read_text())
    prompts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "DCIPromptEncode"]
    return graph, prompts


def test_the_demo_prompts_map_to_scenes_and_class_prompts():
    graph, prompts = demo_graph()
    concept = CONCEPTS[demo.CONCEPT]
    scenes = demo_yardstick.scenes(prompts, concept)
    assert [(s.obj.size, s.obj.position, s.background) for s in scenes] == [
        ("small", "left", "orange"), ("large", "top", "purple"), ("large", "right", "green"),
        ("small", "bottom", "black")]
    assert all(s.obj.emblem_place == concept.obj.emblem_place for s in scenes)  # unnamed parts kept
    assert demo_yardstick.class_prompt(prompts[0], "sks") == "a small circle at the left on an orange background"
    with pytest.raises(ValueError, match="does not use the trigger word"):
        demo_yardstick.class_prompt("a small circle on a red background", "sks")
    with pytest.raises(ValueError, match="names no background"):
        demo_yardstick.scenes(["a small sks circle at the left"], concept)


def test_the_yardstick_runs_on_the_server_and_writes_no_output(server):
    graph, prompts = demo_graph()
    concept = CONCEPTS[demo.CONCEPT]
    output = server.base / "output"
    before = sorted(output.rglob("*")) if output.exists() else []
    floor, ceiling = demo_yardstick.measure(server.client(), graph, prompts, "sks", concept,
                                            server.base / "input", FidelityMeter(concept))
    # the bundled VAE keeps the concept (≥ 0.85 through one round trip), the class prompt draws a plain circle
    assert 0.85 <= ceiling <= 1.0
    assert floor <= 0.55 and ceiling - floor >= 0.3
    after = sorted(output.rglob("*")) if output.exists() else []
    assert after == before
    renders = sorted((server.base / "input" / demo_yardstick.CEILING_FOLDER).iterdir())
    assert [p.name for p in renders] == [f"scene_{i:02d}.png" for i in range(len(prompts))]
