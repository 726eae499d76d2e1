"""Shared test set-up.

Three layers, all against the real ComfyUI 0.3.75 host that ``scripts/host.py`` builds:
``tests/unit`` (``dci.method`` and ``dci.files`` with torch only), ``tests/nodes`` (our nodes executed in-process the way
ComfyUI executes them) and ``tests/e2e`` (a real ``main.py --cpu`` server over HTTP and websocket).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# `dci` is importable on its own; test helpers live beside this file and in scripts/.
for p in (str(REPO), str(TESTS), str(REPO / "scripts")):
    if p not in sys.path:
        sys.path.insert(0, p)

import comfy_host  # noqa: E402
import pytest  # noqa: E402

# ComfyUI reads its CLI arguments when comfy.model_management is first imported, so they are set here,
# before any test module imports comfy.
if comfy_host.comfy_dir() is not None:
    comfy_host.configure_args()


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI, booted in this process with this pack loaded."""
    if comfy_host.comfy_dir() is None:
        pytest.fail("DCI_COMFYUI_DIR is not set: run the tests with `make test`")
    comfy_host.boot()
    return comfy_host


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy, tmp_path_factory):
    """The SD1.5-detected tiny checkpoint, generated once per test run into the in-process models folder."""
    import folder_paths
    from tiny_models import write_tiny_sd15_checkpoint

    ckpt_dir = Path(folder_paths.get_folder_paths("checkpoints")[0])
    return write_tiny_sd15_checkpoint(ckpt_dir / "tiny_sd15.safetensors", seed=0)


@pytest.fixture()
def tiny_sd15(comfy):
    """A fresh fully tiny in-memory SD1.5-family (MODEL, CLIP, VAE)."""
    from tiny_models import tiny_sd15_in_memory

    return tiny_sd15_in_memory(seed=0)


@pytest.fixture()
def tiny_sdxl(comfy):
    """A fresh fully tiny in-memory SDXL-family (MODEL, CLIP, VAE)."""
    from tiny_models import tiny_sdxl_in_memory

    return tiny_sdxl_in_memory(seed=0)
