"""The concept file: what training produces and what sampling uses, as one ``.safetensors`` file.

Tensors (all floating point, finite):

==============================================  ===================  ==========================================
key                                             shape                meaning
==============================================  ===================  ==========================================
``kv_delta.<model key>``                        [inner, context]     fine-tuned minus base weight of an attn2
                                                                     ``to_k``/``to_v`` (``<model key>`` is
                                                                     ComfyUI's, e.g. ``diffusion_model.input_
                                                                     blocks.1.1.transformer_blocks.0.attn2.to_k.
                                                                     weight``)
``token.<encoder>``                             [k, width]           the k modifier-token embeddings the trigger
                                                                     word stands for (``clip_l``; ``clip_g`` too
                                                                     for SDXL)
``token_init.<encoder>``                        [k, width]           optional: the rows training started from
``context.<encoder>.prefix`` / ``.suffix``      [images, n, width]   optional (ICO): learned per-image contexts
``residual.<model key of an attn2>.to_v``       [inner]              Infusion: the vector added to the value
                                                                     projection's output at the trigger's
                                                                     tokens (``.to_k``: the same for keys, when
                                                                     trained with unlocked keys)
``token.<encoder>.<j>``, ``token_init.…``       [k, width]           format 2: the token rows of the file's
                                                                     j-th further trigger (j = 1, 2, …)
==============================================  ===================  ==========================================

Metadata (safetensors string metadata): see ``REQUIRED_METADATA`` and ``Concept.metadata``.

Several concepts trained jointly (one run, shared K/V deltas) make one file with several triggers: the first is
``trigger``/``class_noun`` as always, the others are listed in the ``more_triggers`` metadata (JSON: a list of
``{"trigger", "class_noun"}``) with their rows under ``token.<encoder>.<j>``. Such a file is format 2, so
versions of the pack that can't register every trigger refuse it; single-trigger files stay format 1.

Plain torch + safetensors: no ComfyUI import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import write_safetensors

FORMAT_NAME = "dci-concept"
FORMAT_VERSION = 2  # the newest this version reads and writes (2: several triggers)
SINGLE_TRIGGER_VERSION = 1  # what files with one trigger are written as
SUFFIX = ".safetensors"
TRAIN_STATE_SUFFIX = ".train-state.safetensors"  # resume state written beside a concept by the trainer

KV_PREFIX = "kv_delta."
TOKEN_PREFIX = "token."
TOKEN_INIT_PREFIX = "token_init."
CONTEXT_PREFIX = "context."
RESIDUAL_PREFIX = "residual."

ENCODERS = ("clip_l", "clip_g", "clip_h")  # clip_h: the OpenCLIP ViT-H text encoder of SD2.x
FAMILIES = ("sd1", "sd2", "sdxl")
REQUIRED_METADATA = ("format", "format_version", "family", "architecture", "trigger", "class_noun")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a concept's header is a few KB; refuse absurd ones before parsing


class ConceptFileError(ValueError):
    """A concept file is missing, unreadable or inconsistent; the message says which and why."""


@dataclass
class MoreTrigger:
    """A further trigger of a jointly trained concept file: its word, class noun and token rows."""

    trigger: str
    class_noun: str
    tokens: dict[str, torch.Tensor]
    token_init: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Concept:
    """One learned concept: K/V deltas, trigger-token embeddings, optional ICO contexts, and metadata."""

    family: str
    trigger: str
    class_noun: str
    kv_deltas: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]
    token_init: dict[str, torch.Tensor] = field(default_factory=dict)
    contexts: dict[str, torch.Tensor] = field(default_factory=dict)  # "<encoder>.prefix" / "<encoder>.suffix"
    base_fingerprint: str = ""
    method: str = ""
    steps: int = 0
    training: dict = field(default_factory=dict)
    extra_metadata: dict[str, str] = field(default_factory=dict)
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)  # "<attn2 key>.to_v" / ".to_k" → [inner]
    more: list[MoreTrigger] = field(default_factory=list)  # further triggers (joint training), in order

    @property
    def triggers(self) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
        """(trigger, class noun, token rows) of every trigger, the first one first."""
        return [(self.trigger, self.class_noun, self.tokens)] + [(m.trigger, m.class_noun, m.tokens)
                                                                 for m in self.more]

    @property
    def num_tokens(self) -> int:
        return next(iter(self.tokens.values())).shape[0] if self.tokens else 0

    @property
    def architecture(self) -> str:
        if self.kv_deltas or not self.residuals:
            return architecture_id({k: tuple(v.shape) for k, v in self.kv_deltas.items()})
        return architecture_id({k: tuple(v.shape) for k, v in self.residuals.items()}, prefix="res")

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION if self.more else SINGLE_TRIGGER_VERSION),
            "family": self.family,
            "architecture": self.architecture,
            "base_fingerprint": self.base_fingerprint,
            "trigger": self.trigger,
            "class_noun": self.class_noun,
            "num_tokens": str(self.num_tokens),
            "encoders": ",".join(sorted(self.tokens)),
            "method": self.method,
            "steps": str(self.steps),
            "training": json.dumps(self.training, sort_keys=True),
        }
        if self.more:
            meta["more_triggers"] = json.dumps([{"trigger": m.trigger, "class_noun": m.class_noun} for m in self.more])
        meta.update(self.extra_metadata)
        return meta

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        out.update({KV_PREFIX + k: v for k, v in self.kv_deltas.items()})
        out.update({TOKEN_PREFIX + k: v for k, v in self.tokens.items()})
        out.update({TOKEN_INIT_PREFIX + k: v for k, v in self.token_init.items()})
        out.update({CONTEXT_PREFIX + k: v for k, v in self.contexts.items()})
        out.update({RESIDUAL_PREFIX + k: v for k, v in self.residuals.items()})
        for j, m in enumerate(self.more, start=1):
            out.update({f"{TOKEN_PREFIX}{k}.{j}": v for k, v in m.tokens.items()})
            out.update({f"{TOKEN_INIT_PREFIX}{k}.{j}": v for k, v in m.token_init.items()})
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def validate(self) -> None:
        """Raise ConceptFileError on anything a loader or a sampler could trip over later."""
        if self.family not in FAMILIES:
            raise ConceptFileError(f"unknown model family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        check_trigger(self.trigger)
        if not self.class_noun.strip():
            raise ConceptFileError("the class noun is empty")
        if not self.kv_deltas and not self.tokens and not self.residuals:
            raise ConceptFileError("the concept holds neither key/value deltas, residuals nor token embeddings")
        for key, t in self.residuals.items():
            if not re.fullmatch(r"[\w.]+\.attn2\.to_[kv]", key):
                raise ConceptFileError(f"{RESIDUAL_PREFIX}{key}: not a cross-attention to_k/to_v key")
            if t.dim() != 1:
                raise ConceptFileError(f"{RESIDUAL_PREFIX}{key}: expected one vector [inner], got shape "
                                       f"{tuple(t.shape)}")
        for key, t in self.kv_deltas.items():
            if not re.fullmatch(r"[\w.]+\.attn2\.to_[kv]\.weight", key):
                raise ConceptFileError(f"{KV_PREFIX}{key}: not a cross-attention to_k/to_v weight key")
            if t.dim() != 2:
                raise ConceptFileError(f"{KV_PREFIX}{key}: expected a 2-D weight delta, got shape {tuple(t.shape)}")
        widths = {}
        for enc, t in self.tokens.items():
            if enc not in ENCODERS:
                raise ConceptFileError(f"{TOKEN_PREFIX}{enc}: unknown text encoder (expected {', '.join(ENCODERS)})")
            if t.dim() != 2 or t.shape[0] < 1:
                raise ConceptFileError(f"{TOKEN_PREFIX}{enc}: expected [tokens, width], got shape {tuple(t.shape)}")
            widths[enc] = t.shape[1]
        if len({t.shape[0] for t in self.tokens.values()}) > 1:
            raise ConceptFileError("the text encoders disagree on the number of modifier tokens")
        words = [self.trigger.lower()]
        for m in self.more:
            check_trigger(m.trigger)
            if m.trigger.lower() in words:
                raise ConceptFileError(f"the trigger word {m.trigger!r} appears twice in one concept file")
            words.append(m.trigger.lower())
            if not m.class_noun.strip():
                raise ConceptFileError(f"the class noun of trigger {m.trigger!r} is empty")
            if {k: tuple(v.shape) for k, v in m.tokens.items()} != {k: tuple(v.shape) for k, v in self.tokens.items()}:
                raise ConceptFileError(f"the token rows of trigger {m.trigger!r} do not match the first trigger's "
                                       "encoders and shapes")
            if any(k not in m.tokens or v.shape != m.tokens[k].shape for k, v in m.token_init.items()):
                raise ConceptFileError(f"the starting rows of trigger {m.trigger!r} do not match its token rows")
        for enc, t in self.token_init.items():
            if enc not in self.tokens or t.shape != self.tokens[enc].shape:
                raise ConceptFileError(f"{TOKEN_INIT_PREFIX}{enc}: shape does not match {TOKEN_PREFIX}{enc}")
        for key, t in self.contexts.items():
            enc, _, part = key.partition(".")
            if enc not in widths or part not in ("prefix", "suffix") or t.dim() != 3 or t.shape[2] != widths[enc]:
                raise ConceptFileError(f"{CONTEXT_PREFIX}{key}: expected [images, n, {widths.get(enc, 'width')}] "
                                       f"for a known encoder, got shape {tuple(t.shape)}")
        for key, t in self.tensors().items():
            if not t.is_floating_point():
                raise ConceptFileError(f"{key}: expected a floating-point tensor, got {t.dtype}")
            if not torch.isfinite(t).all():
                raise ConceptFileError(f"{key}: contains NaN or infinite values; the file is corrupted or the "
                                       "training diverged")


def check_trigger(trigger: str) -> None:
    if not re.fullmatch(r"[^\s():,\\]{1,64}", trigger or ""):
        raise ConceptFileError(
            f"trigger word {trigger!r} is not usable: it must be one word of 1-64 characters without spaces, "
            "parentheses, commas, colons or backslashes"
        )


def architecture_id(kv_shapes: dict[str, tuple[int, ...]], prefix: str = "kv") -> str:
    """A short, readable id of the cross-attention layout: '<layers>x<context dims>-<hash of keys+shapes>'
    (``res``: an Infusion concept's layout, by its residual vectors' keys and widths)."""
    contexts = sorted({shape[-1] for shape in kv_shapes.values()})
    h = hashlib.sha256()
    for key in sorted(kv_shapes):
        h.update(f"{key}:{kv_shapes[key]};".encode())
    kind = "ctx" if prefix == "kv" else "inner"
    return f"{prefix}{len(kv_shapes)}-{kind}{'+'.join(map(str, contexts))}-{h.hexdigest()[:12]}"


def sanitize_name(name: str) -> str:
    """A file name that stays inside its folder and is portable to Windows; raises on nothing usable."""
    stem = name.strip()
    if stem.lower().endswith(SUFFIX):
        stem = stem[: -len(SUFFIX)]
    if "/" in stem or "\\" in stem or stem in (".", "..") or stem.startswith(".."):
        raise ConceptFileError(f"concept name {name!r} must be a plain file name, not a path")
    stem = re.sub(r'[<>:"|?*\x00-\x1f]', "_", stem).strip(" .")
    if re.fullmatch(r"(?i)(con|prn|aux|nul|com\d|lpt\d)", stem):
        stem = f"_{stem}"
    if not stem:
        raise ConceptFileError(f"concept name {name!r} has no usable characters")
    return stem[:120] + SUFFIX


def save_concept(concept: Concept, folder: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Write atomically (``atomic.write_safetensors``); never overwrites unless asked."""
    concept.validate()
    path = Path(folder) / sanitize_name(name)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    meta = concept.metadata()
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return write_safetensors(path, concept.tensors(), meta)


def same_concept(a: Concept, b: Concept) -> bool:
    """Same metadata (apart from the creation time) and bit-identical tensors of the same dtypes."""
    ta, tb = a.tensors(), b.tensors()
    return (a.metadata() == b.metadata() and ta.keys() == tb.keys()
            and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta))


def save_or_reuse(concept: Concept, folder: str | os.PathLike, name: str, overwrite: bool) -> tuple[Path, bool]:
    """Save as ``name``; an existing identical concept is reused (written=False), a different one is only
    replaced when ``overwrite`` is set."""
    path = Path(folder) / sanitize_name(name)
    if path.exists() and not overwrite:
        try:
            same = same_concept(load_concept(path), concept)
        except ConceptFileError:
            same = False
        if same:
            return path, False
        raise FileExistsError(f"{path} already exists with another concept; choose another save_name or allow "
                              "overwriting")
    return save_concept(concept, folder, name, overwrite=overwrite), True


def _read_header(path: Path) -> dict:
    """Parse the safetensors header ourselves first, to give precise messages for damaged files."""
    size = path.stat().st_size
    if size == 0:
        raise ConceptFileError(f"{path.name} is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ConceptFileError(f"{path.name} is too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ConceptFileError(f"{path.name} is not a valid safetensors file (truncated or not safetensors)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConceptFileError(f"{path.name} has a corrupted safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ConceptFileError(f"{path.name} has a corrupted safetensors header")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ConceptFileError(f"{path.name} is truncated: its header promises {8 + n + end} bytes, it has {size}")
    return header


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The parsed header of any safetensors file, with precise errors for empty, truncated or damaged files."""
    return _read_header(Path(path))


def load_concept(path: str | os.PathLike) -> Concept:
    """Read and validate a concept file; every problem is a ConceptFileError naming the file and the cause."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise ConceptFileError(f"{path.name}: concept files are .safetensors (import other formats with "
                               "the import node)")
    if not path.is_file():
        raise ConceptFileError(f"concept file {path} does not exist")
    header = _read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        raise ConceptFileError(f"{path.name} is a safetensors file but not a concept file (metadata 'format' is "
                               f"{meta.get('format')!r}, expected {FORMAT_NAME!r})")
    missing = [k for k in REQUIRED_METADATA if not meta.get(k)]
    if missing:
        raise ConceptFileError(f"{path.name} lacks required metadata: {', '.join(missing)}")
    try:
        version = int(meta["format_version"])
    except ValueError:
        raise ConceptFileError(f"{path.name}: format_version {meta['format_version']!r} is not a number") from None
    if version > FORMAT_VERSION:
        raise ConceptFileError(f"{path.name} uses concept format {version}; this version of the pack reads up "
                               f"to {FORMAT_VERSION}: update the pack")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConceptFileError(f"{path.name} could not be read: {e}") from None
    try:
        training = json.loads(meta.get("training") or "{}")
        listed = json.loads(meta.get("more_triggers") or "[]")
    except json.JSONDecodeError:
        raise ConceptFileError(f"{path.name}: the 'training' or 'more_triggers' metadata is not valid JSON") from None
    more = _more_triggers(path, listed, tensors)
    known = {"format", "format_version", "family", "architecture", "base_fingerprint", "trigger", "class_noun",
             "num_tokens", "encoders", "method", "steps", "training", "created", "more_triggers"}
    concept = Concept(
        family=meta["family"],
        trigger=meta["trigger"],
        class_noun=meta["class_noun"],
        kv_deltas=_strip(tensors, KV_PREFIX),
        tokens=_strip(tensors, TOKEN_PREFIX),
        token_init=_strip(tensors, TOKEN_INIT_PREFIX),
        contexts=_strip(tensors, CONTEXT_PREFIX),
        residuals=_strip(tensors, RESIDUAL_PREFIX),
        base_fingerprint=meta.get("base_fingerprint", ""),
        method=meta.get("method", ""),
        steps=int(meta.get("steps") or 0),
        training=training,
        extra_metadata={k: v for k, v in meta.items() if k not in known},
        more=more,
    )
    unknown = [k for k in tensors
               if not k.startswith((KV_PREFIX, TOKEN_PREFIX, TOKEN_INIT_PREFIX, CONTEXT_PREFIX, RESIDUAL_PREFIX))]
    if unknown:
        raise ConceptFileError(f"{path.name} holds tensors this format does not define: {', '.join(unknown[:5])}")
    concept.validate()
    if concept.architecture != meta["architecture"]:
        raise ConceptFileError(f"{path.name}: its tensors do not match its own 'architecture' metadata "
                               "(the file was edited or damaged)")
    return concept


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # "token_init." does not start with "token." (underscore, not dot), so the prefixes never overlap;
    # "token.<encoder>.<j>" belong to further triggers (``_more_triggers``)
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if prefix in (TOKEN_PREFIX, TOKEN_INIT_PREFIX):
        out = {k: v for k, v in out.items() if "." not in k}
    return out


def _more_triggers(path: Path, listed, tensors: dict[str, torch.Tensor]) -> list[MoreTrigger]:
    """The further triggers the metadata lists, with their rows; rows no listed trigger owns are an error."""
    if not isinstance(listed, list) or not all(isinstance(x, dict) and isinstance(x.get("trigger"), str)
                                               and isinstance(x.get("class_noun"), str) for x in listed):
        raise ConceptFileError(f"{path.name}: 'more_triggers' must list objects with a trigger and a class noun")
    more = []
    for j, x in enumerate(listed, start=1):
        rows = {p: {k[len(p):].rsplit(".", 1)[0]: v for k, v in tensors.items()
                    if k.startswith(p) and k.endswith(f".{j}") and k.count(".") == 2}
                for p in (TOKEN_PREFIX, TOKEN_INIT_PREFIX)}
        more.append(MoreTrigger(x["trigger"], x["class_noun"], rows[TOKEN_PREFIX], rows[TOKEN_INIT_PREFIX]))
    owned = {f"{p}{k}.{j}" for j, m in enumerate(more, start=1) for p, d in
             ((TOKEN_PREFIX, m.tokens), (TOKEN_INIT_PREFIX, m.token_init)) for k in d}
    stray = [k for k in tensors if k.startswith((TOKEN_PREFIX, TOKEN_INIT_PREFIX)) and k.count(".") == 2
             and k not in owned]
    if stray:
        raise ConceptFileError(f"{path.name} holds token rows of no listed trigger: {', '.join(stray[:5])}")
    return more
