"""The real ComfyUI, in-process: start-up the way ``main.py`` does it, and node execution the way
``execution.py`` does it (``torch.inference_mode``, list mapping, V1/V3 dispatch, interrupt checks).

No part of ComfyUI is replaced: the only stand-in is ``RecordingServer``, the object PromptExecutor sends its
messages to (in a real server that is the websocket fan-out).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # scripts/ → the repository

_BOOTED = False
BASE_DIR: Path | None = None


def comfy_dir() -> Path | None:
    d = os.environ.get("DCI_COMFYUI_DIR")
    return Path(d) if d and Path(d, "main.py").exists() else None


def configure_args() -> None:
    """Put ComfyUI on sys.path and set the CLI arguments before anything imports model_management."""
    global BASE_DIR
    d = comfy_dir()
    if d is None:
        raise RuntimeError("DCI_COMFYUI_DIR is not set: run the tests with `make test`")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    if BASE_DIR is not None:
        return
    import comfy.cli_args

    BASE_DIR = Path(tempfile.mkdtemp(prefix="dci-comfy-base-"))
    atexit.register(shutil.rmtree, BASE_DIR, True)
    args = comfy.cli_args.args
    args.cpu = True
    args.use_pytorch_cross_attention = True
    args.base_directory = str(BASE_DIR)
    args.disable_api_nodes = True
    args.database_url = "sqlite:///:memory:"
    # main.py imports ComfyUI's `utils` package first; nodes.py later puts comfy/ first on sys.path, after
    # which `utils` would resolve to comfy/utils.py and the server's modules would fail to import.
    import utils.install_util  # noqa: F401


def boot() -> None:
    """Load the built-in node modules and this pack the way ComfyUI's start-up does."""
    global _BOOTED
    if _BOOTED:
        return
    configure_args()
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    pack_dir = BASE_DIR / "custom_nodes" / "comfyui_dci"
    pack_dir.parent.mkdir(parents=True, exist_ok=True)
    if not pack_dir.exists():
        pack_dir.symlink_to(REPO, target_is_directory=True)
    base_names = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(str(pack_dir), base_names)):
        raise RuntimeError("ComfyUI could not load this pack (see the log above)")
    _BOOTED = True


def node_class(node_id: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[node_id]


def add_model_file(path: Path, folder: str = "checkpoints", name: str | None = None) -> str:
    """Links a model file into this run's ComfyUI models folder; returns the name its loaders list it under.

    ``name`` may contain a sub-folder ("toyworld/bench.safetensors"); default: the file's own name.
    """
    import folder_paths

    rel = Path(name or Path(path).name)
    dst = Path(folder_paths.get_folder_paths(folder)[0]) / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(Path(path).resolve())
    return rel.as_posix()


def run_node(node_id: str, **inputs):
    """Execute one node as ComfyUI's executor does; returns (outputs tuple, ui dict)."""
    import execution
    import torch

    cls = node_class(node_id)
    from comfy_api.internal import _ComfyNodeInternal

    obj = cls if isinstance(cls, type) and issubclass(cls, _ComfyNodeInternal) else cls()
    input_data_all = {k: [v] for k, v in inputs.items()}
    with torch.inference_mode():
        out, ui, _, pending = asyncio.run(
            execution.get_output_data(uuid.uuid4().hex, "1", obj, input_data_all, hidden_inputs={})
        )
    assert not pending, "async nodes are not expected here"
    return tuple(o[0] for o in out), ui


class RecordingServer:
    """Receives what PromptExecutor would send to websocket clients."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []
        self.sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


def run_graph(graph: dict, executor=None):
    """Validate and execute an API-format graph in-process; returns (executor, history entry)."""
    import execution

    prompt_id = uuid.uuid4().hex
    valid = asyncio.run(execution.validate_prompt(prompt_id, graph, None))
    if not valid[0]:
        raise ValueError(f"graph failed validation: {valid[1]} {valid[3]}")
    executor = executor or execution.PromptExecutor(RecordingServer(), cache_args={"lru": 0, "ram": 0})
    executor.execute(graph, prompt_id, {}, valid[2])
    return executor, executor.history_result


def pack_module(relative: str):
    """A module of this pack as ComfyUI loaded it (e.g. ``dci.comfyui.sampling.guider``), for instrumentation."""
    node_module = sys.modules[node_class("DCIModelInfo").__module__]
    package = node_module.__name__.rsplit(".dci.nodes.", 1)[0]
    return sys.modules[f"{package}.{relative}"]
