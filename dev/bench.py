"""The benchmarks' worker protocol: each measurement runs in a process of its own.

A benchmark script calls ``measure(module, args)``; that runs ``python -m <module> --worker ARGS`` from the
repository root, which boots ComfyUI in-process (``start_worker``), measures, and prints its result as the last
line of its output, as JSON (``report``). Own processes keep the measurements apart: the peak memory of a
process is its own, and no model or cache of one configuration helps the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .host import REPO


def measure(module: str, args: list[str]) -> dict:
    """Run one worker and return its result; exits with the worker's output when it fails."""
    cmd = [sys.executable, "-m", module, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"benchmark worker failed ({' '.join(args)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_worker(threads: int) -> None:
    """The worker's set-up: ComfyUI and this pack in-process, torch on ``threads`` threads."""
    import torch

    from . import harness

    harness.boot()
    torch.set_num_threads(threads)


def report(result: dict) -> None:
    """The worker's result, as the last line of its output."""
    print(json.dumps(result), flush=True)
