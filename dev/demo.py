"""``make demo``: the project's main job, headless through a real ComfyUI server, on the bundled toy world.

Starts ComfyUI with this pack on a free loopback port (project-local folders under ``.comfy/``), copies the
bundled training renders of the "badge" concept into a folder of ComfyUI's input folder, and queues
``workflows/api/toyworld_demo.json``: Load Image Dataset from Folder reads the five renders (all on a white
background, centred), the ICO trainer learns the concept from them, then each of four new prompts (other
backgrounds, positions, sizes) is sampled with the stock KSampler and with the DCI KSampler. The demo follows the progress on the websocket, writes a
labelled comparison grid, and prints the fidelity/editability metrics of every picture, the two ends of the
fidelity scale measured in the same run (``demo_yardstick``: the base model on the class prompt, VAE round trips
of clean renders) with each sampler's normalised fidelity, and where the files are.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import host
from .comfy_client import format_execution_error
from .comfy_server import ComfyServer
from .demo_yardstick import measure as measure_yardstick
from .grid import labelled_grid
from .toyworld import concepts, fidelity

WORKFLOW = host.REPO / "workflows" / "api" / "toyworld_demo.json"
RENDERS = host.REPO / "assets" / "toyworld" / "concepts" / "badge"
CONCEPT = "badge"
FOLDER = "dci_badge"  # the input sub-folder Load Image Dataset from Folder reads
CELL, GAP = 128, 2


def copy_renders() -> None:
    """The training renders, into a folder of ComfyUI's input folder (as a user would put their photos)."""
    target = host.LOCAL / "input" / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    renders = sorted(RENDERS.glob("*.png"))
    if len(renders) < 5:
        sys.exit(f"the toy-world renders are missing from {RENDERS}; is the checkout complete?")
    for src in renders[:5]:
        dst = target / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
    stray = sorted(p.name for p in target.iterdir() if p.name not in {r.name for r in renders[:5]})
    if stray:
        sys.exit(f"{target} holds other files too ({', '.join(stray)}): the trainer would learn from them; "
                 "move them away and run again")


def cells(grid, rows: int):
    """(plain, dci) crops of each row of the stitched grid, as uint8 arrays."""
    a = np.asarray(grid.convert("RGB"))
    out = []
    for r in range(rows):
        y = r * (CELL + GAP)
        out.append((a[y:y + CELL, 0:CELL], a[y:y + CELL, CELL + GAP:2 * CELL + GAP]))
    return out


def labelled(grid, prompts: list[str]):
    """The stitched grid enlarged, with a header per sampler and the prompt beside each row."""
    a = np.asarray(grid.convert("RGB"))
    rows = [(p, a[r * (CELL + GAP):(r + 1) * (CELL + GAP)]) for r, p in enumerate(prompts)]
    return labelled_grid(rows, label_width=330, scale=2, headers=[(0, "plain KSampler"), (CELL + GAP, "DCI KSampler")],
                         margin=10)


def unique_path(folder: Path, stem: str) -> Path:
    n = 1
    while (folder / f"{stem}_{n:05d}.png").exists():
        n += 1
    return folder / f"{stem}_{n:05d}.png"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-name", default=None, help="another toy-world model file (DCI Toy World Loader list)")
    ap.add_argument("--train-steps", type=int, default=None, help="override the workflow's training steps")
    args = ap.parse_args(argv)
    # a SIGTERM (a job runner's stop, kill) unwinds like Ctrl-C does, so the server below is stopped with us
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.time()
    host.ensure_local()
    copy_renders()
    graph = json.loads(WORKFLOW.read_text())
    if args.model_name:
        graph["1"]["inputs"]["model_name"] = args.model_name
    if args.train_steps:
        graph["11"]["inputs"]["steps"] = args.train_steps
    prompts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "DCIPromptEncode"]
    log_path = host.LOCAL / "logs" / "demo-server.log"  # not temp/: ComfyUI empties it at start-up
    print(f"starting ComfyUI {host.COMFYUI_VERSION} with this pack (log: {log_path})")
    with ComfyServer(host.LOCAL, log_path) as server:
        print(f"server up at {server.url} after {time.time() - t0:.1f}s; queueing {WORKFLOW.relative_to(host.REPO)}")
        last = {}

        def show(event: str, data: dict) -> None:
            if event == "progress":
                node = data["node"]
                kind = graph.get(str(node), {}).get("class_type", "")
                every = 50 if kind == "DCITrainConcept" else 10
                if data["value"] == data["max"] or data["value"] % every == 0 or last.get(node) is None:
                    print(f"  {kind} (node {node}): step {data['value']}/{data['max']}", flush=True)
                last[node] = data["value"]
            elif event == "executing" and data.get("node"):
                kind = graph.get(str(data["node"]), {}).get("class_type", "")
                if kind in ("DCITrainConcept", "DCIToyWorldLoader"):
                    print(f"  running {kind} (node {data['node']})", flush=True)

        client = server.client()
        result = client.run(graph, timeout=1800, on_message=show)
        if result.status != "success":
            print(f"the demo graph failed: {format_execution_error(result.error or {})}", file=sys.stderr)
            return 1
        images = {img["filename"]: img for img in result.images()}
        grid_ref = next(img for name, img in images.items() if name.startswith("toyworld_demo_grid"))
        from PIL import Image

        grid = Image.open(io.BytesIO(client.view(grid_ref)))
        concept = concepts.CONCEPTS[CONCEPT]
        meter = fidelity.FidelityMeter(concept)
        trigger = graph["11"]["inputs"]["trigger_word"]
        print("measuring the fidelity scale: the base model on the class prompt, VAE round trips of clean renders")
        floor, ceiling = measure_yardstick(client, graph, prompts, trigger, concept, host.LOCAL / "input", meter)
    out_dir = host.LOCAL / "output" / "dci"
    labelled_image = labelled(grid, prompts)
    path = unique_path(out_dir, "toyworld_demo_labelled")
    tmp = path.with_name(f".{path.name}.tmp")
    labelled_image.save(tmp, format="PNG")
    tmp.replace(path)

    print("\nmetrics (from pixels; fidelity = looks like the badge, editability = background/position/size as asked)")
    print(f"{'prompt':52} {'sampler':8} {'fidelity':>8} {'editability':>11}")
    totals = {"plain": [], "DCI": []}
    for prompt, (plain, dci) in zip(prompts, cells(grid, len(prompts)), strict=True):
        for name, img in (("plain", plain), ("DCI", dci)):
            fid = meter(img)
            edit = fidelity.mean_score(fidelity.editability_scores(img, prompt, concept))
            totals[name].append((fid, edit))
            print(f"{prompt:52} {name:8} {fid:8.2f} {edit:11.2f}")
    print("fid_norm: 0 = the base model asked for a plain circle, 1 = clean renders of the badge through the VAE")
    print(f"fidelity_floor={floor:.3f} fidelity_ceiling={ceiling:.3f}")
    for name, vals in totals.items():
        f = sum(v[0] for v in vals) / len(vals)
        e = sum(v[1] for v in vals) / len(vals)
        norm = (f - floor) / (ceiling - floor) if ceiling > floor else float("nan")
        print(f"sampler={name} fidelity={f:.3f} editability={e:.3f} fid_norm={norm:.3f}")
    for name in images:
        print(f"wrote {out_dir / name}")
    print(f"wrote {path}")
    print(f"demo finished in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
