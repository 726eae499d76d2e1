"""The shipped workflows: every UI-format graph converts (through the running server's /object_info) to its
API-format twin, the server lists them as templates, and the UI files parse as the front end expects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dev.workflow_ui import VIRTUAL_NODES, api_to_ui, layout_for, ui_to_api

pytestmark = pytest.mark.e2e

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def test_every_api_graph_has_a_ui_twin_and_back():
    assert {p.name for p in UI_FILES} == {p.name for p in (WORKFLOWS / "api").glob("*.json")}


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_ui_graph_converts_to_its_api_twin(server, ui_path):
    info = server.client().object_info()
    ui = json.loads(ui_path.read_text())
    api = json.loads((WORKFLOWS / "api" / ui_path.name).read_text())
    assert ui_to_api(ui, info) == api
    assert api_to_ui(api, info, layout_for(WORKFLOWS / "api" / ui_path.name)) == ui  # the UI file is current
    for node in ui["nodes"]:
        assert node["type"] in info or node["type"] in VIRTUAL_NODES, f"{node['type']} is not a stock node or ours"
    for group in ui["groups"]:  # every group holds the nodes it is drawn around
        x, y, w, h = group["bounding"]
        inside = [n for n in ui["nodes"] if x <= n["pos"][0] and n["pos"][0] + n["size"][0] <= x + w]
        assert inside, group["title"]
    for link in ui["links"]:
        src = next(n for n in ui["nodes"] if n["id"] == link[1])
        dst = next(n for n in ui["nodes"] if n["id"] == link[3])
        assert link[0] in src["outputs"][link[2]]["links"] and dst["inputs"][link[4]]["link"] == link[0]


def test_the_server_lists_the_workflows_as_templates(server):
    templates = server.client().get_json("/workflow_templates")
    assert sorted(templates["comfyui_dci"]) == sorted(p.stem for p in UI_FILES)
    for name in templates["comfyui_dci"]:
        status, raw = server.client().request("GET", f"/api/workflow_templates/comfyui_dci/{name}.json")
        assert status == 200 and json.loads(raw)["nodes"]


def test_every_template_has_a_thumbnail_the_server_serves(server):
    for path in UI_FILES:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{thumb.name} is missing: run dev/thumbnails.py (see its docstring)"
        status, raw = server.client().request("GET", f"/api/workflow_templates/comfyui_dci/{thumb.name}")
        assert status == 200 and raw[:3] == b"\xff\xd8\xff", thumb.name  # a JPEG, as the template browser asks
