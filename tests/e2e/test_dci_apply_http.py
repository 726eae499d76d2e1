"""The DCI Apply and two-concept workflows through a real server: the stock KSampler runs DCI, reports every
step and draws what DCI KSampler draws with the same settings; one prompt holds two chained concepts."""

from __future__ import annotations

import json

import pytest

from dci.files.concept import save_concept
from dev import templates
from dev.fixtures import random_concept

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def concept_on_server(server, comfy, tiny_checkpoint):
    model, clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)[0]
    folder = server.base / "models" / "concepts"
    save_concept(random_concept(model, clip), folder, "my_concept", overwrite=True)
    save_concept(random_concept(model, clip, trigger="zwx", class_noun="mug", seed=1), folder, "my_second_concept",
                 overwrite=True)
    return server


def picture(client, graph):
    """The saved image's pixels (the PNG itself also holds the graph), and the run."""
    import io

    import numpy as np
    from PIL import Image

    result = client.run(graph, timeout=300)
    assert result.status == "success", result.error
    (image,) = result.images()
    return np.asarray(Image.open(io.BytesIO(client.view(image)))), result


def test_the_stock_ksampler_with_dci_apply_draws_what_dci_ksampler_draws(concept_on_server):
    client = concept_on_server.client()
    graph = templates.for_tiny(templates.load("dci_apply_stock_ksampler"))
    graph["6"]["inputs"].update(split=0.5, lam=1.0)
    graph["7"]["inputs"]["steps"] = 6
    applied, result = picture(client, graph)
    assert [v for v, _ in result.progress(node="7")] == [1, 2, 3, 4, 5, 6]

    dci_ksampler = json.loads(json.dumps(graph))
    dci_ksampler["7"] = {"class_type": "DCIKSampler",
                         "inputs": {**graph["7"]["inputs"], **graph["6"]["inputs"], "model": ["2", 0]}}
    dci_ksampler["9"]["inputs"]["filename_prefix"] = "dci/apply_reference"
    del dci_ksampler["6"]
    reference, _ = picture(client, dci_ksampler)
    assert (applied == reference).all()

    plain = json.loads(json.dumps(graph))
    plain["7"]["inputs"]["model"] = ["2", 0]
    plain["9"]["inputs"]["filename_prefix"] = "dci/apply_plain"
    stock, _ = picture(client, plain)
    assert (stock != applied).any()


def test_two_concepts_in_one_prompt(concept_on_server):
    client = concept_on_server.client()
    graph = templates.for_tiny(templates.load("two_concepts_one_prompt"))
    graph["7"]["inputs"].update(steps=4, split=0.5, lam=1.0)
    separate, result = picture(client, graph)
    assert [v for v, _ in result.progress(node="7")] == [1, 2, 3, 4]
    graph["4"]["inputs"]["concept_maps"] = "union"
    graph["9"]["inputs"]["filename_prefix"] = "dci/two_concepts_union"
    union, _ = picture(client, graph)
    assert (separate != union).any()
