"""Start and stop a real ComfyUI server with this pack, the way ``make serve`` does, for scripts and tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from . import host
from .comfy_client import ComfyClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``main.py`` as a child process on a free loopback port; its output goes to ``log_path``.

    Use as a context manager: the server is always stopped (its whole process group), even on errors.
    """

    def __init__(self, base: Path, log_path: Path, extra_args: list[str] = ()):
        self.base = Path(base)
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 180.0) -> ComfyServer:
        host.link_pack(self.base)
        args = ["--cpu", "--use-pytorch-cross-attention", *self.extra_args]
        cmd = host.server_command(self.port, self.base, args)
        cmd[0] = sys.executable  # already the host's Python when run through dev/host.py
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=str(host.comfy_dir()), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self.client().wait_until_up(timeout_s, is_alive=self.alive)
        except Exception:
            self.stop()
            raise RuntimeError(f"ComfyUI did not start; the end of its log:\n{self.log()[-4000:]}") from None
        return self

    def client(self) -> ComfyClient:
        return ComfyClient(self.url)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()
        self.proc = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
