"""The DCI workflow through a real server: it runs, reports progress every step, and /interrupt stops it."""

from __future__ import annotations

import io

import pytest

from dci.files.concept import save_concept
from dev import templates
from dev.fixtures import random_concept

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def concept_on_server(server, comfy, tiny_checkpoint):
    model, clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    save_concept(random_concept(model, clip), server.base / "models" / "concepts", "my_concept", overwrite=True)
    return server


def test_dci_vs_plain_runs_with_progress_every_step(concept_on_server):
    server = concept_on_server
    graph = templates.for_tiny(templates.load("dci_vs_plain"))
    for node in ("6", "7"):
        graph[node]["inputs"]["steps"] = 6
    client = server.client()
    result = client.run(graph, timeout=300)
    assert result.status == "success", result.error
    assert [v for v, _ in result.progress(node="7")] == [1, 2, 3, 4, 5, 6]
    assert {m for _, m in result.progress(node="7")} == {6}
    from PIL import Image

    (image,) = result.images()
    picture = Image.open(io.BytesIO(client.view(image)))
    assert picture.size == (64 + 2 + 64, 64)  # plain | DCI, side by side


def test_interrupt_stops_dci_sampling(concept_on_server):
    server = concept_on_server
    graph = templates.for_tiny(templates.load("dci_vs_plain"))
    graph["7"]["inputs"]["steps"] = 2000
    graph["6"]["inputs"]["steps"] = 1
    client = server.client()

    def interrupt_once_running(event, data):
        if event == "progress" and str(data.get("node")) == "7" and data["value"] == 3:
            client.interrupt()

    result = client.run(graph, timeout=300, on_message=interrupt_once_running)
    assert result.status == "interrupted"
    values = [v for v, _ in result.progress(node="7")]
    assert 3 <= max(values) < 50
    assert server.alive()
