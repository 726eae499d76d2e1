"""The shipped workflows in the real ComfyUI front end (comfyui-frontend-package 1.32.9), in headless Chromium.

For every UI-format graph in ``workflows/*.json``: the page served by a real server loads it with
``app.loadGraphData``; no node type is missing (what the front end collects for its "missing nodes" dialog,
caught through an extension's ``afterConfigureGraph`` hook, and every type in ``LiteGraph``'s registry), no
node is flagged with errors, the widget values the front end holds equal the file, and the front end's
own UI→API conversion (``app.graphToPrompt()``) equals the API twin in ``workflows/api/`` that we ship.
A screenshot of each graph goes to ``test-artifacts/browser/<workflow>.png``.

The browser is Debian's Chromium, driven over the DevTools protocol (``dev/browser.py``); ``make test``
installs it where it can. Without it, these tests skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dev.browser import Chromium, find_chromium

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
SHOTS = REPO / "test-artifacts" / "browser"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (`make test` installs "
                       "Debian's chromium when it runs as root with apt; or set CHROMIUM=/path/to/chrome)"),
]

READY = "!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph" \
        " && Object.keys(window.LiteGraph.registered_node_types).length > 0)"

# An extension that records what the front end reports after each load: the node types it could not find
# (the list its "missing nodes" dialog shows).
RECORDER = """
window.__dciLoads = [];
window.app.registerExtension({
  name: "comfyui_dci.test.recorder",
  async afterConfigureGraph(missingNodeTypes) {
    window.__dciLoads.push((missingNodeTypes || []).map(t => typeof t === "string" ? t : t.type));
  },
});
true
"""

# Load one UI graph and report what the front end made of it.
LOAD = """
(async (graph) => {
  const app = window.app;
  window.__dciLoads = [];
  await app.loadGraphData(graph, true, false, null, {});
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  // Fit the graph into the part of the canvas that the side bar and the top bars leave free.
  const xs = app.graph.nodes.map(n => n.pos[0]), ys = app.graph.nodes.map(n => n.pos[1] - 30);
  const x1 = Math.max(...app.graph.nodes.map(n => n.pos[0] + n.size[0]));
  const y1 = Math.max(...app.graph.nodes.map(n => n.pos[1] + n.size[1]));
  const [x0, y0] = [Math.min(...xs), Math.min(...ys)];
  const rect = app.canvas.canvas.getBoundingClientRect();
  const [left, top, margin] = [80, 130, 20];
  const scale = Math.min(1, (rect.width - left - margin) / (x1 - x0), (rect.height - top - margin) / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [left / scale - x0, top / scale - y0];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const registered = window.LiteGraph.registered_node_types;
  const prompt = await app.graphToPrompt();
  const serialized = app.graph.serialize();
  return {
    loads: window.__dciLoads,
    unregistered: graph.nodes.map(n => n.type).filter(t => !(t in registered)),
    nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type, has_errors: !!n.has_errors,
                                      mode: n.mode, title: n.title})),
    // [name, value, whether it belongs to another widget (a seed's "control after generate")]
    widgets: Object.fromEntries(app.graph.nodes.map(n => {
      const linked = new Set((n.widgets ?? []).flatMap(w => w.linkedWidgets ?? []));
      return [String(n.id), (n.widgets ?? []).map(w => [w.name, w.value, linked.has(w)])];
    })),
    serialized: Object.fromEntries(serialized.nodes.map(n => [String(n.id), n.widgets_values ?? []])),
    output: prompt.output,
    dialogs: Array.from(document.querySelectorAll(".p-dialog")).map(d => d.innerText.slice(0, 300)),
  };
})
"""


@pytest.fixture(scope="module")
def page(server):
    """The ComfyUI web app of the ``server`` in a headless Chromium page, ready to load graphs."""
    # No "new UI" banner over the graph in the screenshots.
    # A known user (no templates browser), no minimap, and node text drawn at any zoom level.
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
    status, raw = server.client().request("POST", "/settings", settings)
    assert status == 200, raw
    with Chromium(width=1920, height=1080) as browser:
        browser.call("Page.addScriptToEvaluateOnNewDocument",
                     {"source": "localStorage.setItem('vueNodesBannerDismissed', 'true');"})
        browser.navigate(server.url + "/")
        browser.wait_for(READY, timeout_s=90)
        browser.evaluate(RECORDER)
        yield browser


def test_the_app_knows_our_nodes(page, server):
    ours = [name for name, info in server.client().object_info().items()
            if info.get("python_module", "").startswith("custom_nodes.comfyui_dci")]
    assert ours, "the server lists none of this pack's nodes"
    registered = page.evaluate("Object.keys(window.LiteGraph.registered_node_types)")
    assert set(ours) <= set(registered), sorted(set(ours) - set(registered))


@pytest.fixture(scope="module")
def object_info(server):
    return server.client().object_info()


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_loads_in_the_front_end(page, object_info, ui_path):
    ui = json.loads(ui_path.read_text())
    api = json.loads((WORKFLOWS / "api" / ui_path.name).read_text())
    page.console_errors.clear()
    got = page.evaluate(f"({LOAD})({json.dumps(ui)})")
    page.screenshot(SHOTS / f"{ui_path.stem}.png")
    (SHOTS / f"{ui_path.stem}.frontend.json").write_text(
        json.dumps({"widgets_values": got["serialized"], "prompt": got["output"]}, indent=1) + "\n")

    assert got["loads"] == [[]], f"the front end reports missing node types: {got['loads']}"
    assert got["unregistered"] == [], f"node types not registered in LiteGraph: {got['unregistered']}"
    assert got["dialogs"] == [], f"a dialog opened on load: {got['dialogs']}"
    assert sorted(n["id"] for n in got["nodes"]) == sorted(n["id"] for n in ui["nodes"])
    flagged = [n for n in got["nodes"] if n["has_errors"]]
    assert flagged == [], f"nodes flagged with errors: {flagged}"
    assert page.console_errors == [], "errors in the page while loading:\n" + "\n".join(page.console_errors)

    # The widget values as the front end holds and saves them are the file's, value for value (including the
    # extra values it saves for seed controls and upload buttons).
    assert got["serialized"] == {str(n["id"]): n["widgets_values"] for n in ui["nodes"]}
    # The front end's own UI→API conversion gives exactly the API twin we ship.
    output = {nid: {k: v for k, v in node.items() if k != "_meta"} for nid, node in got["output"].items()}
    assert output == api

