"""Concept files for tests, made for a given MODEL/CLIP from random tensors (no training needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from dci.comfyui.concept import base_fingerprint, base_kv_weights
from dci.comfyui.tokenizer import text_encoder_widths
from dci.files.concept import Concept, save_concept


def random_concept(model, clip, trigger: str = "sks", class_noun: str = "dog", k: int = 2, scale: float = 0.05,
                   seed: int = 0, family: str = "sd1") -> Concept:
    g = torch.Generator().manual_seed(seed)
    deltas = {key: torch.randn(w.shape, generator=g) * scale for key, w in base_kv_weights(model).items()}
    widths = text_encoder_widths(clip)
    tokens = {enc: torch.randn(k, width, generator=g) * 0.02 for enc, width in widths.items()}
    return Concept(
        family=family, trigger=trigger, class_noun=class_noun, kv_deltas=deltas, tokens=tokens,
        base_fingerprint=base_fingerprint(model), method="test", steps=0,
        training={"note": "random tensors"},
    )


def concepts_folder() -> Path:
    import folder_paths

    folder_paths.get_folder_paths("concepts")  # registered by the pack
    path = Path(folder_paths.get_folder_paths("concepts")[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_concept(concept: Concept, name: str) -> str:
    """Save into the in-process concepts folder; returns the name the loader node takes."""
    return save_concept(concept, concepts_folder(), name, overwrite=True).name
