"""A real ComfyUI server (``main.py --cpu``) with this pack, on a free loopback port, per test module.

Started with the same command line as ``make serve`` (``dev/host.py``) but a temporary base directory;
always stopped, even when a test fails. Its log is kept in ``test-artifacts/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dev.comfy_server import ComfyServer

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    """A running server whose models/checkpoints holds the tiny SD1.5 checkpoint."""
    base = tmp_path_factory.mktemp("server-base")
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(tiny_checkpoint, base / "models" / "checkpoints" / tiny_checkpoint.name)
    srv = ComfyServer(base, base / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(srv.log_path, ARTIFACTS / f"server-{base.name}.log")
