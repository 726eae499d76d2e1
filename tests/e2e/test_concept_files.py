"""Concept files through a real server: a damaged concept or source is a readable ``execution_error`` on the
websocket, nothing is written, and the server goes on serving (an import/export graph runs right after)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dev import templates

pytestmark = pytest.mark.e2e



def load_api(name: str) -> dict:
    """A shipped template, on the tiny checkpoint."""
    return templates.for_tiny(templates.load(name))


def files_under(*roots: Path) -> set[str]:
    return {os.path.join(d, f) for root in roots for d, _, fs in os.walk(root) for f in fs}


def compvis_delta(checkpoint: Path, path: Path, seed: int = 0) -> None:
    """An adobe CompVis-variant delta for the tiny checkpoint, from the checkpoint's own K/V weights."""
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(checkpoint))
    kv = {k: v.float() + torch.randn(v.shape, generator=g) * 0.05 for k, v in sd.items()
          if k.startswith("model.diffusion_model.") and (k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {**kv, "embed": torch.randn(1, 768, generator=g) * 0.02}}, path)


def test_a_damaged_concept_file_is_a_readable_execution_error(server):
    concepts = server.base / "models" / "concepts"
    concepts.mkdir(parents=True, exist_ok=True)
    (concepts / "damaged_concept.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    graph = load_api("load_concept_and_sample.json")
    graph["2"]["inputs"]["concept_name"] = "damaged_concept.safetensors"
    before = files_under(server.base / "models", server.base / "output")
    result = server.client().run(graph, timeout=300)
    assert result.status == "error"
    err = result.error
    assert err["node_type"] == "DCILoadConcept"
    assert "damaged_concept.safetensors is not a valid safetensors file" in err["exception_message"]
    assert files_under(server.base / "models", server.base / "output") == before
    assert server.alive()


def test_an_unsafe_source_is_refused_over_the_websocket_and_nothing_is_written(server):
    source = server.base / "input" / "unsafe_run"
    source.mkdir(parents=True, exist_ok=True)
    (source / "delta.bin").write_bytes(b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    graph = load_api("concept_import_export.json")
    graph["2"]["inputs"]["source"] = "unsafe_run"
    before = files_under(server.base / "models", server.base / "output")
    result = server.client().run(graph, timeout=300)
    assert result.status == "error"
    assert result.error["node_type"] == "DCIImportConcept"
    assert "delta.bin was refused" in result.error["exception_message"]
    assert files_under(server.base / "models", server.base / "output") == before
    assert server.alive()


def test_the_server_keeps_serving_an_import_export_graph(server, tiny_checkpoint):
    compvis_delta(tiny_checkpoint, server.base / "input" / "my_custom_diffusion_run" / "delta.bin")
    graph = load_api("concept_import_export.json")
    graph["7"]["inputs"]["steps"] = 2
    result = server.client().run(graph, timeout=300)
    assert result.status == "success", result.error
    outputs = result.outputs()
    assert (server.base / "models" / "concepts" / "my_imported_concept.safetensors").is_file()
    assert (server.base / "models" / "loras" / "my_imported_concept.safetensors").is_file()
    assert (server.base / "models" / "embeddings" / "my_imported_concept.safetensors").is_file()
    diffusers = server.base / "output" / "custom_diffusion" / "my_imported_concept"
    assert sorted(p.name for p in diffusers.iterdir()) == ["new1.safetensors", "pytorch_custom_diffusion_weights.safetensors"]
    assert any("embedding:my_imported_concept dog" in t for t in outputs["3"]["text"])
    assert result.images()
