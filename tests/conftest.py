"""Shared test set-up.

Three layers, all against the real ComfyUI 0.3.75 host that ``dev/host.py`` builds:
``tests/unit`` (``dci.method`` and ``dci.files``, torch only), ``tests/nodes`` (our nodes executed in-process
the way ComfyUI executes them) and ``tests/e2e`` (a real ``main.py --cpu`` server over HTTP and websocket).

ComfyUI loads the pack before any test module is imported (``dev.harness.load_pack``), so ``import dci.…``
in a test gives the very module objects ComfyUI runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (``make test`` runs two workers) each worker, and every server it starts, gets an equal
# share of the cores: torch's default, a thread per core in every process, oversubscribes them and its
# threads spin against each other. Set before torch is first imported; servers inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dev import harness  # noqa: E402

# ComfyUI reads its CLI arguments when comfy.model_management is first imported, so they are set here, and
# the pack is loaded before any test module imports it.
if harness.comfy_dir() is not None:
    harness.load_pack()


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI, booted in this process with this pack loaded."""
    if harness.comfy_dir() is None:
        pytest.fail("DCI_COMFYUI_DIR is not set: run the tests with `make test`")
    harness.boot()
    return harness


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy, tmp_path_factory):
    """The SD1.5-detected tiny checkpoint, generated once per test run into the in-process models folder."""
    import folder_paths

    from dev.fixtures import write_tiny_sd15_checkpoint

    ckpt_dir = Path(folder_paths.get_folder_paths("checkpoints")[0])
    return write_tiny_sd15_checkpoint(ckpt_dir / "tiny_sd15.safetensors", seed=0)


@pytest.fixture()
def tiny_sd15(comfy):
    """A fresh fully tiny in-memory SD1.5-family (MODEL, CLIP, VAE)."""
    from dev.fixtures import tiny_sd15_in_memory

    return tiny_sd15_in_memory(seed=0)


@pytest.fixture()
def tiny_sd15_loaded(comfy):
    """``tiny_sd15`` built under inference mode, as a loader node builds its outputs (what the trainer gets)."""
    import torch

    from dev.fixtures import tiny_sd15_in_memory

    with torch.inference_mode():
        return tiny_sd15_in_memory(seed=0)


@pytest.fixture()
def tiny_sdxl(comfy):
    """A fresh fully tiny in-memory SDXL-family (MODEL, CLIP, VAE)."""
    from dev.fixtures import tiny_sdxl_in_memory

    return tiny_sdxl_in_memory(seed=0)
