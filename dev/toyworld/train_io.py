"""Shared pieces of the toy model's training stages: logging, checkpoint files and optimizer state as tensors.

Checkpoints are safetensors written through the pack's one atomic writer (``dci.files.atomic``); optimizer
moments are flattened into named tensors, so no pickle is ever written or read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)


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


class Ema:
    """The exponential moving average of named parameters that the toy model's stages write out.

    Decay ``min(decay, (step + 1) / (step + 10))`` (short memory while the weights move fast); parameters
    that don't train (``requires_grad`` off, e.g. a frozen text encoder) keep their average unchanged.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.named, self.decay = named, decay
        self.shadow = {k: p.detach().clone() for k, p in named}

    def update(self, step: int) -> None:
        decay = min(self.decay, (step + 1) / (step + 10))
        with torch.no_grad():
            for k, p in self.named:
                if p.requires_grad:
                    self.shadow[k].lerp_(p.detach(), 1 - decay)

    def reset_to_weights(self) -> None:
        """The average restarts at the current weights (after loading weights from elsewhere)."""
        with torch.no_grad():
            for k, p in self.named:
                self.shadow[k].copy_(p.detach())

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the average inside the block and their own values again after it."""
        backup = {k: p.detach().clone() for k, p in self.named}
        with torch.no_grad():
            for k, p in self.named:
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.named:
                    p.copy_(backup[k])

    def checkpoint_tensors(self, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """Weights (``w.``), average (``ema.``) and AdamW state (``opt.``) for a resumable checkpoint."""
        tensors = {"w." + k: p for k, p in self.named}
        tensors.update({"ema." + k: v for k, v in self.shadow.items()})
        tensors.update(optimizer_tensors(opt, "opt."))
        return tensors

    def load_checkpoint(self, sd: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> None:
        """Inverse of ``checkpoint_tensors``."""
        with torch.no_grad():
            for k, p in self.named:
                p.copy_(sd["w." + k])
                self.shadow[k].copy_(sd["ema." + k])
        load_optimizer_tensors(opt, sd, "opt.")


def cell_weights(scene, object_weight: float, decoration_weight: float) -> torch.Tensor:
    """[16, 16] loss weights: 1 + object_weight × object share + decoration_weight × decoration share."""
    from dci.toyworld.render import CELL, decoration_pixels, object_pixels

    def share(mask):
        s = mask.shape[0] // CELL
        return torch.from_numpy(mask.reshape(s, CELL, s, CELL).mean(axis=(1, 3)).astype(np.float32))

    return 1.0 + object_weight * share(object_pixels(scene)) + decoration_weight * share(decoration_pixels(scene))
