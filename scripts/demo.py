"""``make demo``: the project's main job, headless through a real ComfyUI server.

Starts ComfyUI with this pack on a free loopback port (project-local folders under ``.comfy/``), queues the
example graph in API format, follows its progress on the websocket, and prints where the outputs are.

Until the bundled toy-world model exists, the graph runs on the tiny SD1.5-architecture checkpoint with
random weights (generated here on first use), so the pictures are noise: the demo proves the chain
(checkpoint loading, our node, sampling, decoding, saving) end to end.
"""

from __future__ import annotations

import json
import sys
import time

import host
from comfy_client import format_execution_error
from comfy_server import ComfyServer

WORKFLOW = host.REPO / "workflows" / "api" / "model_info_and_sample.json"
TINY_CHECKPOINT = host.LOCAL / "models" / "checkpoints" / "tiny_sd15.safetensors"


def ensure_tiny_checkpoint() -> None:
    if TINY_CHECKPOINT.exists():
        return
    print(f"generating the tiny SD1.5-architecture checkpoint (random weights) at {TINY_CHECKPOINT}")
    sys.path.insert(0, str(host.comfy_dir()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from tiny_models import write_tiny_sd15_checkpoint

    write_tiny_sd15_checkpoint(TINY_CHECKPOINT)


def main() -> int:
    t0 = time.time()
    host.ensure_local()
    ensure_tiny_checkpoint()
    graph = json.loads(WORKFLOW.read_text())
    log_path = host.LOCAL / "temp" / "demo-server.log"
    print(f"starting ComfyUI {host.COMFYUI_VERSION} with this pack (log: {log_path})")
    with ComfyServer(host.LOCAL, log_path) as server:
        print(f"server up at {server.url} after {time.time() - t0:.1f}s; queueing {WORKFLOW.relative_to(host.REPO)}")

        def show(event: str, data: dict) -> None:
            if event == "progress":
                print(f"  node {data['node']}: step {data['value']}/{data['max']}", flush=True)
            elif event == "executing" and data.get("node"):
                print(f"  running node {data['node']} ({graph[data['node']]['class_type']})", flush=True)

        result = server.client().run(graph, timeout=600, on_message=show)
    if result.status != "success":
        print(f"the demo graph failed: {format_execution_error(result.error or {})}", file=sys.stderr)
        return 1
    outputs = result.outputs()
    info = json.loads(outputs["8"]["text"][0])
    print(f"model: {info['config']} ({info['family']}), {info['cross_attention_layers']} cross-attention layers, "
          f"{info['kv_parameters']:,} key/value parameters")
    out_dir = host.LOCAL / "output"
    for image in result.images():
        print(f"wrote {out_dir / image.get('subfolder', '') / image['filename']}")
    print(f"demo finished in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
