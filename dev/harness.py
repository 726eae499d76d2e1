"""The real ComfyUI in this process: start-up the way ``main.py`` does it, node execution the way
``execution.py`` does it (``torch.inference_mode``, list mapping, V1/V3 dispatch, interrupt checks).

No part of ComfyUI is replaced: the only stand-in is ``RecordingServer``, the object PromptExecutor sends its
messages to (in a real server that is the websocket fan-out). Tests, benchmarks and the node reference boot
ComfyUI only through this module.

The pack is imported once. ComfyUI loads it from ``custom_nodes/comfyui_dci`` under a module name made from
that path; ``load_pack`` has ComfyUI do exactly that, and from then on ``import dci.<module>`` in this process
gives the module ComfyUI loaded (``PackModules``). So tests, benchmarks and the server run the same module
objects, and an ``isinstance`` check means what it says. Importing ``dci`` before the pack is loaded would make
a second copy of every class, so ``load_pack`` refuses to run after it.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import importlib.abc
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from . import comfy_main
from .host import PACK_LINK_NAME, REPO

PACKAGE = "dci"

_BASE: Path | None = None
_PACK: str | None = None
_EXTRAS = False


def comfy_dir() -> Path | None:
    d = os.environ.get("DCI_COMFYUI_DIR")
    return Path(d) if d and Path(d, "main.py").exists() else None


def configure() -> Path:
    """Put ComfyUI on sys.path and set its CLI arguments before anything imports model_management; returns
    this process's ComfyUI base directory (temporary, removed at exit)."""
    global _BASE
    d = comfy_dir()
    if d is None:
        raise RuntimeError("DCI_COMFYUI_DIR is not set: run through `python3 dev/host.py python ...` or `make`")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    if _BASE is not None:
        return _BASE
    import comfy.cli_args

    _BASE = Path(tempfile.mkdtemp(prefix="dci-comfy-base-"))
    atexit.register(shutil.rmtree, _BASE, True)
    args = comfy.cli_args.args
    # DCI_HARNESS_DEVICE=cuda runs the in-process host (the benches, the probes) on ComfyUI's GPU, kept in fp32
    # so that its figures compare with the CPU's; the default and the tests stay on the CPU.
    device = os.environ.get("DCI_HARNESS_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        raise RuntimeError(f"DCI_HARNESS_DEVICE must be 'cpu' or 'cuda', not {device!r}")
    args.cpu = device == "cpu"
    args.force_fp32 = device == "cuda"
    args.use_pytorch_cross_attention = True
    args.base_directory = str(_BASE)
    args.disable_api_nodes = True
    args.database_url = "sqlite:///:memory:"
    comfy_main.quiet_missing_torchaudio(logging.getLogger())
    # main.py imports ComfyUI's `utils` package first; nodes.py later puts comfy/ first on sys.path, after
    # which `utils` would resolve to comfy/utils.py and the server's modules would fail to import.
    import utils.install_util  # noqa: F401

    return _BASE


class PackModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``dci`` and ``dci.*`` resolve to the modules ComfyUI loaded from this pack (under ComfyUI's names)."""

    def __init__(self, package: str):
        self.package = package
        self.specs: dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        module = importlib.import_module(f"{self.package}.{fullname}")
        self.specs[module.__name__] = module.__spec__
        return importlib.util.spec_from_loader(fullname, self, is_package=hasattr(module, "__path__"))

    def create_module(self, spec):
        return sys.modules[f"{self.package}.{spec.name}"]

    def exec_module(self, module):
        module.__spec__ = self.specs[module.__name__]  # the import system set the alias spec; keep ComfyUI's


def load_pack() -> str:
    """Have ComfyUI load this pack, as its start-up does, and map ``dci.*`` to the loaded modules; returns
    the module name ComfyUI gave the pack."""
    global _PACK
    if _PACK is not None:
        return _PACK
    stray = sorted(m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + "."))
    if stray:
        raise RuntimeError(f"{', '.join(stray)} imported before ComfyUI loaded the pack: that would be a second "
                           "copy of the pack's classes; call dev.harness.load_pack() first")
    base = configure()
    import nodes

    link = base / "custom_nodes" / PACK_LINK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    if not asyncio.run(nodes.load_custom_node(str(link), set(nodes.NODE_CLASS_MAPPINGS))):
        raise RuntimeError("ComfyUI could not load this pack (see the log above)")
    init = str(link / "__init__.py")
    _PACK = next(name for name, m in list(sys.modules.items()) if getattr(m, "__file__", None) == init)
    sys.meta_path.insert(0, PackModules(_PACK))
    return _PACK


def boot() -> None:
    """ComfyUI's built-in node modules and this pack, loaded the way its start-up loads them."""
    global _EXTRAS
    load_pack()
    if not _EXTRAS:
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        _EXTRAS = True


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


def run_node_lists(node_id: str, **inputs: list) -> tuple[list, dict]:
    """Execute one node with list inputs as ComfyUI's executor does; every output comes back as its full list."""
    import execution
    import torch
    from comfy_api.internal import _ComfyNodeInternal

    cls = node_class(node_id)
    obj = cls if isinstance(cls, type) and issubclass(cls, _ComfyNodeInternal) else cls()
    with torch.inference_mode():
        out, ui, _, pending = asyncio.run(
            execution.get_output_data(uuid.uuid4().hex, "1", obj, inputs, hidden_inputs={}))
    assert not pending, "async nodes are not expected here"
    return out, ui


def run_node(node_id: str, **inputs):
    """Execute one node as ComfyUI's executor does; returns (outputs tuple, ui dict)."""
    out, ui = run_node_lists(node_id, **{k: [v] for k, v in inputs.items()})
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
