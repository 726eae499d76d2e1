"""The concept-encoder file: the weights of ``dci.method.concept_encoder.ConceptEncoder`` as one fp16
``.safetensors`` file, with what it was trained for in its metadata.

Metadata (strings): ``format`` ("dci-concept-encoder"), ``format_version``, ``family`` (the model family whose
text encoder it writes for, e.g. "sd1"), ``text_encoder`` (e.g. "clip_l"), ``config`` (JSON of
``EncoderConfig``: width, number of tokens, image size, ...), optionally ``base_fingerprint`` (the K/V
fingerprint of the model it was trained against), ``base_name``, ``recipe`` (JSON) and ``train_seconds``.

Plain torch + safetensors: no ComfyUI import.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import write_safetensors
from .concept import ENCODERS, FAMILIES, ConceptFileError, read_safetensors_header

FORMAT_NAME = "dci-concept-encoder"
FORMAT_VERSION = 1


class EncoderFileError(ConceptFileError):
    """A concept-encoder file is missing, unreadable or inconsistent; the message says which and why."""


@dataclass
class EncoderFile:
    """A loaded encoder file: its architecture settings, fp32 weights and what it was trained for."""

    config: dict
    tensors: dict[str, torch.Tensor]
    family: str
    text_encoder: str
    base_fingerprint: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def save_encoder(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict, family: str,
                 text_encoder: str,
                 base_fingerprint: str = "", extra: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write the weights (fp16) atomically; an existing file is replaced only with ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    if family not in FAMILIES or text_encoder not in ENCODERS:
        raise EncoderFileError(f"unknown family/text encoder {family!r}/{text_encoder!r}")
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "family": family,
            "text_encoder": text_encoder, "config": json.dumps(config, sort_keys=True),
            "base_fingerprint": base_fingerprint}
    meta.update(extra or {})
    tensors = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in tensors.items()}
    return write_safetensors(path, tensors, meta)


def load_encoder(path: str | os.PathLike) -> EncoderFile:
    """Read and check the file (weights as fp32); every problem is an EncoderFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise EncoderFileError(f"{path.name}: concept encoders are .safetensors files")
    if not path.is_file():
        raise EncoderFileError(f"concept encoder file {path} does not exist")
    try:
        header = read_safetensors_header(path)
    except ConceptFileError as e:
        raise EncoderFileError(str(e)) from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        raise EncoderFileError(f"{path.name} is not a concept encoder (metadata 'format' is {meta.get('format')!r}, "
                               f"expected {FORMAT_NAME!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise EncoderFileError(f"{path.name}: format_version {meta.get('format_version')!r} is not a number") from None
    if version > FORMAT_VERSION:
        raise EncoderFileError(f"{path.name} uses encoder format {version}; this pack reads up to {FORMAT_VERSION}: "
                               "update the pack")
    family, text_encoder = meta.get("family", ""), meta.get("text_encoder", "")
    if family not in FAMILIES or text_encoder not in ENCODERS:
        raise EncoderFileError(f"{path.name}: unknown family/text encoder {family!r}/{text_encoder!r}")
    try:
        config = json.loads(meta.get("config") or "")
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict):
        raise EncoderFileError(f"{path.name}: its 'config' metadata is not a JSON object")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EncoderFileError(f"{path.name} could not be read: {e}") from None
    for k, v in tensors.items():
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise EncoderFileError(f"{path.name}: {k} is not a finite floating-point tensor")
    return EncoderFile(config, {k: v.float() for k, v in tensors.items()}, family, text_encoder,
                       meta.get("base_fingerprint", ""), dict(meta))
