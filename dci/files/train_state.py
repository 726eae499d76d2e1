"""The trainer's resume state: ``<concept>.train-state.safetensors`` beside the concept file.

The concept file holds the trained tensors (fp32); this file holds what a resumed run needs besides: the AdamW
moments of every trained tensor (``adam.<i>.step|exp_avg|exp_avg_sq``, i = the tensor's position in
``parameters``), the loss history, the loss-scaler state and, in the metadata, the step, the settings that
decide what the run computes and a fingerprint of its images. Written atomically like every file of the pack.

Plain torch + safetensors: no ComfyUI import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_safetensors
from .concept import SUFFIX, TRAIN_STATE_SUFFIX

STATE_FORMAT = "dci-train-state"
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


class TrainStateError(ValueError):
    """The training state is missing, foreign or belongs to another run."""


@dataclass
class TrainState:
    step: int
    losses: list[float]
    optimizer: dict  # a torch optimizer's state_dict()["state"]: parameter index → {step, exp_avg, exp_avg_sq}
    scaler: dict
    settings: dict
    images: str  # fingerprint of the concept and regularisation images


def state_path(concept_path: Path) -> Path:
    """Where the training state of a concept file lives."""
    return concept_path.with_name(concept_path.name[: -len(SUFFIX)] + TRAIN_STATE_SUFFIX)


def load_state(path: Path, parameters: list[str]) -> TrainState:
    """Read a training state whose trained tensors are ``parameters`` (names, in optimizer order)."""
    from safetensors import safe_open

    if not path.is_file():
        raise TrainStateError(f"nothing to resume: {path.name} (the training state written beside the concept) "
                              "is missing; train from the start instead")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != STATE_FORMAT:
        raise TrainStateError(f"{path.name} is not a training state file")
    if json.loads(meta["parameters"]) != parameters:
        raise TrainStateError(f"{path.name} belongs to a run with other trained tensors; it can't be resumed here")
    optimizer = {}
    for i in range(len(parameters)):
        if f"adam.{i}.step" in tensors:
            optimizer[i] = {k: tensors[f"adam.{i}.{k}"] for k in ADAM_KEYS}
    return TrainState(int(meta["step"]), tensors["losses"].tolist(), optimizer, json.loads(meta.get("scaler", "{}")),
                      json.loads(meta["settings"]), meta["images"])


def save_state(path: Path, state: TrainState, parameters: list[str]) -> Path:
    tensors = {"losses": torch.tensor(state.losses, dtype=torch.float32)}
    for i, s in state.optimizer.items():
        for k in ADAM_KEYS:
            tensors[f"adam.{i}.{k}"] = torch.as_tensor(s[k])
    meta = {"format": STATE_FORMAT, "step": str(state.step), "parameters": json.dumps(parameters),
            "scaler": json.dumps(state.scaler), "settings": json.dumps(state.settings, sort_keys=True),
            "images": state.images}
    return write_safetensors(path, tensors, meta)
