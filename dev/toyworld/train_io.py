"""Shared pieces of the toy model's training stages: logging, checkpoint files and optimizer state as tensors.

Checkpoints are safetensors written through the pack's one atomic writer (``dci.files.atomic``); optimizer
moments are flattened into named tensors, so no pickle is ever written or read.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dci.files.atomic import write_safetensors


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def fmt_eta(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """A checkpoint or model file, written atomically (a killed run never leaves a torn file)."""
    write_safetensors(path, {k: v.detach().contiguous() for k, v in tensors.items()}, meta)


def load_st(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """Flattens AdamW state into named tensors (no pickles in checkpoints)."""
    out = {}
    for pid, st in opt.state_dict()["state"].items():  # keyed by parameter index, not insertion order
        for k, v in st.items():
            out[f"{prefix}{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Inverse of ``optimizer_tensors``."""
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix):
            i, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def cell_weights(scene, object_weight: float, decoration_weight: float) -> torch.Tensor:
    """[16, 16] loss weights: 1 + object_weight × object share + decoration_weight × decoration share."""
    from dci.toyworld.render import CELL, decoration_pixels, object_pixels

    def share(mask):
        s = mask.shape[0] // CELL
        return torch.from_numpy(mask.reshape(s, CELL, s, CELL).mean(axis=(1, 3)).astype(np.float32))

    return 1.0 + object_weight * share(object_pixels(scene)) + decoration_weight * share(decoration_pixels(scene))
