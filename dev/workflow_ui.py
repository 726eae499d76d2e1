"""UI-format workflows (drag-and-drop, served as templates) from the API-format graphs in workflows/api/, and
the reverse conversion that checks them.

Both directions use a server's ``/object_info``: which inputs are widgets, their order (required, then
optional), and which widgets carry an extra "control after generate" value (``control_after_generate`` in
the input options, or the names ``seed``/``noise_seed``, as the front end decides).

A graph may have a layout beside it, ``workflows/layout/<name>.json``: ``{"groups": [{"title", "nodes": [ids],
"color"}], "notes": [{"group": title, "text"}]}``. Its groups are laid out left to right, each around its nodes,
and each note becomes a front-end Note node at the top of its group. Notes are not part of the API graph (the
front end never queues them).

    python3 dev/host.py python -m dev.workflow_ui      # (re)write workflows/*.json from workflows/api/
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE.parent / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_NAMES = ("seed", "noise_seed")
UPLOAD_OPTIONS = {"image_upload": "image", "video_upload": "video", "audio_upload": "audio"}
VIRTUAL_NODES = ("Note", "MarkdownNote")  # front-end only: never queued
NODE_W, COL_W, ROW_GAP, GROUP_GAP, NOTE_H = 320, 360, 30, 60, 140


def _spec(entry) -> tuple[object, dict]:
    kind = entry[0]
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    return kind, opts


def is_widget(entry) -> bool:
    kind, opts = _spec(entry)
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput", False)


def has_control(name: str, entry) -> bool:
    _, opts = _spec(entry)
    return bool(opts.get("control_after_generate")) or name in CONTROL_NAMES


def has_upload(entry) -> bool:
    """Inputs with an upload button: the front end saves one more widget value ("image"/"audio"/...)."""
    _, opts = _spec(entry)
    return any(opts.get(k) for k in UPLOAD_OPTIONS)


def ordered_inputs(info: dict) -> list[tuple[str, object]]:
    spec = info["input"]
    return [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]


def _default(entry):
    kind, opts = _spec(entry)
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind, None)


def _socket_type(entry) -> str:
    kind, _ = _spec(entry)
    return "COMBO" if isinstance(kind, list) else str(kind)


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node: str) -> int:
        if node not in depth:
            links = [v[0] for v in api[node]["inputs"].values() if isinstance(v, list)]
            depth[node] = 1 + max((visit(str(n)) for n in links), default=-1)
        return depth[node]

    for node in api:
        visit(node)
    return depth


def _positions(api: dict, depth: dict[str, int], heights: dict[str, int], layout: dict | None):
    """Node positions: columns by depth; with a layout, each group gets its own band of columns, left to right,
    with room for its note on top. Returns (positions, groups as UI entries, note anchors per group title)."""
    order = sorted(api, key=lambda n: (depth[n], int(n) if n.isdigit() else n))
    groups = (layout or {}).get("groups") or [{"title": "", "nodes": order}]
    placed = {str(n) for g in groups for n in g["nodes"]}
    missing = [n for n in order if n not in placed]
    if missing:
        raise ValueError(f"layout: nodes {missing} are in no group")
    noted = {n["group"] for n in (layout or {}).get("notes", [])}
    pos, ui_groups, anchors, x = {}, [], {}, 40
    for g in groups:
        members = [n for n in order if n in {str(m) for m in g["nodes"]}]
        first = min(depth[n] for n in members)
        top = 40 + (NOTE_H + ROW_GAP if g["title"] in noted else 0) + (40 if layout else 0)
        y_at: dict[int, int] = {}
        for n in members:
            col = depth[n] - first
            pos[n] = [x + COL_W * col, y_at.get(col, top)]
            y_at[col] = pos[n][1] + heights[n] + ROW_GAP
        width = COL_W * (max(depth[n] for n in members) - first) + NODE_W
        if layout:
            ui_groups.append({"title": g["title"], "bounding": [x - 20, 0, width + 40, max(y_at.values()) + 20],
                              "color": g.get("color", "#3f789e"), "font_size": 24, "flags": {}})
            anchors[g["title"]] = (x, 40 + 40, width)
        x += width + GROUP_GAP + 40
    return pos, ui_groups, anchors


def api_to_ui(api: dict, object_info: dict, layout: dict | None = None) -> dict:
    """A UI-format graph with the same nodes (same ids), links and widget values, laid out left to right (in
    the groups of ``layout``, with its notes, when given)."""
    depth = _depths(api)
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    link_id = 0
    for node in sorted(api, key=lambda n: (depth[n], int(n) if n.isdigit() else n)):
        for name, value in api[node]["inputs"].items():
            if isinstance(value, list):
                link_id += 1
                src, slot = str(value[0]), int(value[1])
                src_type = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(node), name, src_type])
                out_links.setdefault((src, slot), []).append(link_id)
    link_of = {(str(link[3]), link[4]): link for link in links}
    for order, node in enumerate(sorted(api, key=lambda n: (depth[n], int(n) if n.isdigit() else n))):
        cls = api[node]["class_type"]
        info = object_info[cls]
        inputs, widgets = [], []
        for name, entry in ordered_inputs(info):
            given = api[node]["inputs"].get(name)
            if is_widget(entry):
                if isinstance(given, list):
                    raise ValueError(f"node {node}: widget input {name} is linked; not supported by this converter")
                widgets.append(given if name in api[node]["inputs"] else _default(entry))
                if has_control(name, entry):
                    widgets.append("fixed")
                if has_upload(entry):
                    _, opts = _spec(entry)
                    widgets.append(next(v for k, v in UPLOAD_OPTIONS.items() if opts.get(k)))
            else:
                link = link_of.get((node, name))
                inputs.append({"name": name, "type": _socket_type(entry), "link": link[0] if link else None})
        outputs = []
        names = info.get("output_name") or info["output"]
        for slot, (oname, otype) in enumerate(zip(names, info["output"], strict=True)):
            outputs.append({"name": oname, "type": otype, "links": out_links.get((node, slot), []),
                            "slot_index": slot})
        height = 80 + 26 * (len(inputs) + len(widgets) + len(outputs))
        nodes.append({
            "id": int(node), "type": cls, "pos": [0, 0],
            "size": [NODE_W, height], "flags": {}, "order": order, "mode": 0,
            "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": cls}, "widgets_values": widgets,
        })
    pos, groups, anchors = _positions(api, depth, {str(n["id"]): n["size"][1] for n in nodes}, layout)
    for n in nodes:
        n["pos"] = pos[str(n["id"])]
    next_id = max(n["id"] for n in nodes)
    for note in (layout or {}).get("notes", []):
        next_id += 1
        x, y, width = anchors[note["group"]]
        nodes.append({"id": next_id, "type": "Note", "pos": [x, y], "size": [width, NOTE_H], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [note["text"]]})
    for link in links:
        dst = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == link[4])
    return {
        "last_node_id": next_id, "last_link_id": link_id,
        "nodes": nodes, "links": links, "groups": groups, "config": {}, "extra": {}, "version": 0.4,
    }


def layout_for(api_path: Path) -> dict | None:
    """The layout beside an API graph (``workflows/layout/<name>.json``), if there is one."""
    path = WORKFLOWS / "layout" / api_path.name
    return json.loads(path.read_text()) if path.exists() else None


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format graph the front end would queue for a UI-format graph (widgets by position)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n.get("mode", 0) != 0 or n["type"] in VIRTUAL_NODES:
            continue
        info = object_info.get(n["type"])
        if info is None:
            raise KeyError(f"node {n['id']}: {n['type']} is not installed on this server")
        values = list(n.get("widgets_values", []))
        inputs = {}
        linked = {i["name"]: i.get("link") for i in n.get("inputs", [])}
        for name, entry in ordered_inputs(info):
            if is_widget(entry):
                if not values:
                    raise ValueError(f"node {n['id']} ({n['type']}): too few widget values")
                inputs[name] = values.pop(0)
                if has_control(name, entry):
                    values.pop(0)
                if has_upload(entry):
                    values.pop(0)
            elif linked.get(name) is not None:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
        if values:
            raise ValueError(f"node {n['id']} ({n['type']}): {len(values)} widget values left over")
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def _write(target: Path, data: dict, indent: int) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(tmp, target)


def write_all(object_info: dict) -> list[Path]:
    """UI twins of every API graph; the API graphs are completed with the optional widgets' defaults, so that
    each equals what the front end queues for its UI twin."""
    written = []
    for api_path in sorted((WORKFLOWS / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api_path.read_text()), object_info, layout_for(api_path))
        _write(api_path, ui_to_api(ui, object_info), 2)
        _write(WORKFLOWS / api_path.name, ui, 1)
        written += [api_path, WORKFLOWS / api_path.name]
    return written


def main() -> int:
    import tempfile

    from . import host
    from .comfy_server import ComfyServer

    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base), Path(base) / "server.log") as server:
        info = server.client().object_info()
    for path in write_all(info):
        print(path.relative_to(host.REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
