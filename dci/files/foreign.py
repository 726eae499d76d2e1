"""Custom Diffusion files of other tools, read: what a diffusers or adobe result holds, before it meets a model.

Sources that are read (content decides, not the file name):

* **diffusers** (``examples/custom_diffusion``): ``pytorch_custom_diffusion_weights.safetensors`` or ``.bin``
  with the *fine-tuned* K/V matrices under ``<block>.attn2.processor.to_k_custom_diffusion.weight`` (and
  ``to_v_…``), placeholder entries (empty) for attention layers without weights, plus one token file per
  modifier token, ``<new1>.safetensors`` / ``.bin`` = ``{"<new1>": vector}``.
* **adobe** (``adobe-research/custom-diffusion``) ``delta.bin``: ``{"unet": {diffusers parameter name: fine-tuned
  weight}, "modifier_token": {"<new1>": vector}}``; for SDXL a token holds ``[clip_l vector, clip_g vector]``
  (a list) or one vector of both widths concatenated. Its compressed variant (``src/compress.py`` there) stores
  per K/V weight ``{"u": U·diag(S) [out, r], "v": Vᵀ [r, in]}``: the *change* of the weight is ``u @ v``. Its
  CompVis variant is ``{"state_dict": {"model.diffusion_model.<…>.attn2.to_k.weight": weight or {u, v},
  "embed": [k, width]}}``, whose tokens are ``<new1>…<newk>`` in row order.

* **infusion** (``zwl666666/infusion``): its ``target_output`` vectors (``{"<ldm block>.attn2.to_v.target_output":
  [inner], …}``, ``to_k`` too), alone or under a checkpoint's ``"target_output"``; a full official checkpoint
  pickles an ``nn.ParameterDict`` that ``weights_only`` refuses, and is reported with how to extract the vectors.

``.bin``/``.pt``/``.ckpt`` files are opened with ``torch.load(weights_only=True)`` only: a file that needs any
other object to unpickle is refused, its code never runs. A ``.bin`` that is really a safetensors file (what
diffusers writes for token files) is read as safetensors.

What the files hold becomes a concept in ``convert``; the model's key names come from
``dci.comfyui.import_export``. Plain torch + safetensors: no ComfyUI import.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .concept import ENCODERS, ConceptFileError, read_safetensors_header

FORMATS = ("auto", "diffusers", "adobe", "infusion")  # new formats at the end: saved workflows store the choice
DIFFUSERS_WEIGHTS_STEM = "pytorch_custom_diffusion_weights"
TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NO_TOKENS = ("the source has no modifier tokens, so there is no trigger word to learn; a Custom Diffusion concept "
             "needs its <new1> token file(s) beside the weights")
MAX_SOURCE_BYTES = 4 * 1024**3  # SDXL K/V in float32 is ~0.5 GB; a bigger file is a whole checkpoint

_PROCESSOR_KV = re.compile(r"(.+\.attn2)\.processor\.to_([kv])_custom_diffusion\.weight")
_PROCESSOR_OTHER = re.compile(r".+\.processor\.to_(q|out)_custom_diffusion\..+")
_KV = re.compile(r".+\.attn2\.to_[kv]\.weight")
_LDM_PREFIX = "model.diffusion_model."
_INFUSION = re.compile(r"(?:model\.)?(?:diffusion_model\.)?(.+\.attn2\.to_[kv])\.target_output")
INFUSION_EXTRACT = ("in the official code's environment (where the file is trusted), keep only the vectors: "
                    "ckpt = torch.load(path, weights_only=False); "
                    "safetensors.torch.save_file(ckpt['target_output'], 'infusion_vectors.safetensors')")


class ForeignFormatError(ConceptFileError):
    """A file of another tool is unreadable, unsafe, or not something this pack can import."""


@dataclass
class ForeignConcept:
    """What a source holds, before it is matched to a model."""

    format: str  # "diffusers" | "adobe" | "adobe-compvis", "+compressed" when the weights are factored deltas
    naming: str  # "diffusers" (down_blocks.…) or "ldm" (input_blocks.…): how the K/V keys below are named
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # K/V key → fine-tuned weight
    delta: dict[str, torch.Tensor] = field(default_factory=dict)  # K/V key → weight change
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # token → 1-D vector (clip_l then clip_g)
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)  # infusion: "<ldm block>.attn2.to_v" → [inner]
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def token_names(self) -> list[str]:
        """Tokens in natural order (<new2> before <new10>), or the order the source itself records."""
        recorded = _json_list(self.metadata.get("dci_tokens"))
        if recorded and sorted(recorded) == sorted(self.tokens):
            return recorded
        return sorted(self.tokens, key=_natural_key)


# -- reading ----------------------------------------------------------------------------------------------
def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _json_list(text: str | None) -> list[str]:
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _looks_like_safetensors(path: Path, size: int) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def read_tensor_file(path: Path) -> tuple[object, dict[str, str]]:
    """The content of a safetensors or PyTorch file and its string metadata; never runs code from the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix.lower() not in TENSOR_SUFFIXES:
        raise ForeignFormatError(f"{path.name}: not a tensor file (expected {', '.join(TENSOR_SUFFIXES)})")
    if (size := path.stat().st_size) == 0:
        raise ForeignFormatError(f"{path.name} is empty (0 bytes)")
    if size > MAX_SOURCE_BYTES:
        raise ForeignFormatError(f"{path.name} is {size / 1024**3:.1f} GB: far too big for Custom Diffusion weights "
                                 "(this looks like a whole checkpoint)")
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path, size):
        header = read_safetensors_header(path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ForeignFormatError(f"{path.name} could not be read as safetensors: {e}") from None
        return tensors, dict(header.get("__metadata__") or {})
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(str(e))
        if "GLOBAL" not in detail:  # not a forbidden object, just bytes that are no pickle
            raise ForeignFormatError(f"{path.name} could not be read as a PyTorch file (truncated or corrupted?): "
                                     f"{detail}") from None
        raise ForeignFormatError(
            f"{path.name} was refused: unpickling it needs Python objects other than tensors and plain containers "
            f"(it could run code), and this pack only reads such files with torch.load(weights_only=True). "
            f"Convert it to .safetensors where you trust it. ({detail})"
        ) from None
    except Exception as e:  # an untrusted file: every failure becomes one clear message
        raise ForeignFormatError(f"{path.name} could not be read as a PyTorch file (truncated or corrupted?): "
                                 f"{type(e).__name__}: {e}") from None


def _unpickling_detail(text: str) -> str:
    """The one informative line of torch's long weights-only error (the object refused, or the parse error)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln:
            return ln
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation",
                                                       "Please file an issue"))]
    return useful[-1] if useful else (lines[0] if lines else "unreadable pickle")


def _check_tensor(where: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ForeignFormatError(f"{where}: expected a tensor, found {type(t).__name__}")
    if not t.is_floating_point():
        raise ForeignFormatError(f"{where}: expected floating-point values, found {t.dtype}")
    if t.numel() and not torch.isfinite(t).all():
        raise ForeignFormatError(f"{where}: contains NaN or infinite values (the file is corrupted or the "
                                 "training diverged)")
    return t


def _token_vector(where: str, value) -> torch.Tensor:
    """One modifier token's vector; SDXL's [clip_l, clip_g] pair (list or dict) becomes one concatenated vector."""
    if isinstance(value, (list, tuple)):
        if not 1 <= len(value) <= len(ENCODERS):
            raise ForeignFormatError(f"{where}: expected 1-{len(ENCODERS)} vectors (one per text encoder), "
                                     f"found {len(value)}")
        return torch.cat([_token_vector(f"{where}[{i}]", v) for i, v in enumerate(value)])
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(ENCODERS))
        if unknown or not value:
            raise ForeignFormatError(f"{where}: expected vectors keyed by {', '.join(ENCODERS)}, found "
                                     f"{', '.join(map(str, value)) or 'nothing'}")
        return torch.cat([_token_vector(f"{where}.{enc}", value[enc]) for enc in ENCODERS if enc in value])
    t = _check_tensor(where, value)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise ForeignFormatError(f"{where}: expected one embedding vector, found shape {tuple(t.shape)}")
    return t.float() if t.dtype != torch.float64 else t


def _kv_entry(where: str, value) -> tuple[str, torch.Tensor]:
    """('full', weight) or ('delta', u @ v) for one K/V entry."""
    if isinstance(value, dict):
        if set(value) != {"u", "v"}:
            raise ForeignFormatError(f"{where}: expected a weight or compressed factors {{u, v}}, found keys "
                                     f"{', '.join(map(str, value))}")
        u, v = _check_tensor(f"{where}.u", value["u"]), _check_tensor(f"{where}.v", value["v"])
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise ForeignFormatError(f"{where}: compressed factors u {tuple(u.shape)} and v {tuple(v.shape)} do "
                                     "not multiply (expected u [out, r], v [r, in])")
        dtype = torch.float64 if torch.float64 in (u.dtype, v.dtype) else torch.float32
        return "delta", u.to(dtype) @ v.to(dtype)
    t = _check_tensor(where, value)
    if t.dim() != 2:
        raise ForeignFormatError(f"{where}: expected a 2-D weight, found shape {tuple(t.shape)}")
    return "full", t


def _is_placeholder(value) -> bool:
    return (isinstance(value, dict) and not value) or (isinstance(value, torch.Tensor) and value.numel() == 0)


def _refuse_partial_training(name: str, keys: list[str], how: str) -> None:
    if keys:
        raise ForeignFormatError(
            f"{name} also holds fine-tuned {how} weights ({keys[0]}{' …' if len(keys) > 1 else ''}): it was trained "
            "with more than key/value layers, and a concept holds key/value changes only; importing it would "
            "silently drop part of the fine-tuning"
        )


def parse_diffusers_weights(sd: dict, name: str) -> ForeignConcept:
    out = ForeignConcept(format="diffusers", naming="diffusers")
    others, unknown = [], []
    for key, value in sd.items():
        m = _PROCESSOR_KV.fullmatch(str(key))
        if m:
            kind, t = _kv_entry(f"{name}: {key}", value)
            getattr(out, kind)[f"{m.group(1)}.to_{m.group(2)}.weight"] = t
        elif _PROCESSOR_OTHER.fullmatch(str(key)):
            others.append(key)
        elif str(key).endswith(".processor") and _is_placeholder(value):
            continue
        else:
            unknown.append(key)
    _refuse_partial_training(name, others, "query/output (train_q_out)")
    if unknown:
        raise ForeignFormatError(f"{name}: unexpected entries for a diffusers Custom Diffusion file: "
                                 f"{', '.join(map(str, unknown[:3]))}")
    if not out.full and not out.delta:
        raise ForeignFormatError(f"{name} holds no key/value weights")
    return out


def parse_adobe(obj: dict, name: str) -> ForeignConcept:
    if "text_encoder" in obj or "text_encoder_2" in obj:
        raise ForeignFormatError(f"{name} holds a fine-tuned text encoder (saved with save_text_encoder): a "
                                 "concept holds modifier tokens only, so it cannot be imported without losing it")
    if "unet" in obj:
        sd, naming, fmt = obj["unet"], "diffusers", "adobe"
        raw_tokens = obj.get("modifier_token") or {}
        if not isinstance(raw_tokens, dict):
            raise ForeignFormatError(f"{name}: 'modifier_token' must map token names to vectors")
    else:
        sd, naming, fmt = obj["state_dict"], "ldm", "adobe-compvis"
        raw_tokens = {}
        if isinstance(sd, dict) and "embed" in sd:
            embed = _check_tensor(f"{name}: embed", sd["embed"])
            embed = embed[None] if embed.dim() == 1 else embed
            if embed.dim() != 2:
                raise ForeignFormatError(f"{name}: embed must be [tokens, width], found {tuple(embed.shape)}")
            raw_tokens = {f"<new{i + 1}>": row for i, row in enumerate(embed)}
    if not isinstance(sd, dict):
        raise ForeignFormatError(f"{name}: expected a dictionary of weights, found {type(sd).__name__}")
    out = ForeignConcept(format=fmt, naming=naming)
    others, unknown = [], []
    for key, value in sd.items():
        key = str(key)
        if key == "embed" and naming == "ldm":
            continue
        local = key[len(_LDM_PREFIX):] if naming == "ldm" and key.startswith(_LDM_PREFIX) else key
        if _KV.fullmatch(local) and (naming == "diffusers" or key.startswith(_LDM_PREFIX)):
            kind, t = _kv_entry(f"{name}: {key}", value)
            getattr(out, kind)[local] = t
        elif ".attn2." in key:
            others.append(key)
        else:
            unknown.append(key)
    _refuse_partial_training(name, others, "cross-attention query/output (freeze_model=crossattn)")
    if unknown:
        raise ForeignFormatError(f"{name}: unexpected entries for an adobe Custom Diffusion delta: "
                                 f"{', '.join(unknown[:3])}")
    if not out.full and not out.delta:
        raise ForeignFormatError(f"{name} holds no key/value weights")
    if out.delta:
        out.format += "+compressed"
    out.tokens = {str(tok): _token_vector(f"{name}: token {tok}", v) for tok, v in raw_tokens.items()}
    return out


def parse_token_file(obj, metadata: dict[str, str], path: Path) -> dict[str, torch.Tensor]:
    """``{"<new1>": vector}`` (diffusers), or ``{"clip_l": …, "clip_g": …}`` with the token in the metadata."""
    if not isinstance(obj, dict) or not obj:
        raise ForeignFormatError(f"{path.name} is not a token file (expected {{token: vector}})")
    if set(obj) <= set(ENCODERS):
        token = metadata.get("token") or f"<{path.stem}>"
        return {token: _token_vector(f"{path.name}: {token}", dict(obj))}
    if len(obj) != 1:
        raise ForeignFormatError(f"{path.name} is not a token file: it holds {len(obj)} entries "
                                 f"({', '.join(map(str, list(obj)[:3]))}), a token file holds one")
    ((token, value),) = obj.items()
    return {str(token): _token_vector(f"{path.name}: {token}", value)}


def _infusion_vectors(obj) -> dict | None:
    """The ``target_output`` dictionary of an Infusion file, or None."""
    if not isinstance(obj, dict):
        return None
    inner = obj.get("target_output")
    sd = inner if isinstance(inner, dict) else obj
    if sd and any(_INFUSION.fullmatch(str(k)) for k in sd):
        return sd
    return None


def parse_infusion(obj: dict, name: str) -> ForeignConcept:
    """Infusion's residual vectors, by ldm block key (``input_blocks.1.1.transformer_blocks.0.attn2.to_v``)."""
    sd = _infusion_vectors(obj)
    out = ForeignConcept(format="infusion", naming="ldm")
    for key, value in (sd or {}).items():
        m = _INFUSION.fullmatch(str(key))
        if not m:
            if str(key).endswith("target_input") or ".target_outputs." in str(key):
                raise ForeignFormatError(f"{name}: {key} belongs to a multi-concept or rank-one-editing file; "
                                         "only single-concept Infusion vectors can be imported")
            continue
        t = _check_tensor(f"{name}: {key}", value)
        if t.dim() != 1:
            raise ForeignFormatError(f"{name}: {key} should be one vector, got shape {tuple(t.shape)}")
        out.residuals[m.group(1)] = t.float()
    if not any(k.endswith(".to_v") for k in out.residuals):
        raise ForeignFormatError(f"{name} holds no Infusion value vectors (…attn2.to_v.target_output)")
    n_v = sum(k.endswith(".to_v") for k in out.residuals)
    n_k = f", {len(out.residuals) - n_v} key vectors" if len(out.residuals) > n_v else ""
    out.notes.append(f"{name}: {n_v} value vectors{n_k}; the trigger stands for the class noun's own token "
                     "(the official training never changes it)")
    return out


def _content_kind(obj) -> str:
    if not isinstance(obj, dict) or not obj:
        return "unknown"
    if _infusion_vectors(obj) is not None:
        return "infusion"
    if isinstance(obj.get("unet"), dict) or isinstance(obj.get("state_dict"), dict):
        return "adobe"
    if any(_PROCESSOR_KV.fullmatch(str(k)) or _PROCESSOR_OTHER.fullmatch(str(k)) for k in obj):
        return "diffusers"
    return "unknown"


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(map(str, list(obj)[:4]))
        return f"top-level keys {keys}{' …' if len(obj) > 4 else ''}" if obj else "an empty dictionary"
    return f"a {type(obj).__name__}"


def _token_candidates(folder: Path, exclude: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p != exclude and p.suffix.lower() in (".safetensors", ".bin", ".pt"))


def _add_token_files(out: ForeignConcept, weights_path: Path, metadata: dict[str, str]) -> None:
    """Token files beside the weights: ones named ``<…>`` or listed by our own export must be valid."""
    required = set(_json_list(metadata.get("dci_token_files")))
    for p in _token_candidates(weights_path.parent, weights_path):
        strict = p.name in required or p.name.startswith("<")
        try:
            obj, meta = read_tensor_file(p)
            tokens = parse_token_file(obj, meta, p)
        except ForeignFormatError as e:
            if strict:
                raise
            out.notes.append(f"ignored {p.name}: {e}")
            continue
        for token, vec in tokens.items():
            if token in out.tokens:
                raise ForeignFormatError(f"token {token} is defined twice (in {p.name} and another file)")
            out.tokens[token] = vec
        out.files.append(p)
    missing = sorted(required - {p.name for p in out.files})
    if missing:
        raise ForeignFormatError(f"{weights_path.name} lists token files that are missing: {', '.join(missing)}")


def _pick_in_folder(folder: Path) -> Path:
    for suffix in (".safetensors", ".bin"):
        p = folder / (DIFFUSERS_WEIGHTS_STEM + suffix)
        if p.is_file():
            return p
    candidates = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
                  and not p.name.startswith("<")]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ForeignFormatError(f"folder {folder.name} holds no Custom Diffusion weights (expected "
                                 f"{DIFFUSERS_WEIGHTS_STEM}.safetensors/.bin or an adobe delta.bin)")
    raise ForeignFormatError(f"folder {folder.name} holds several candidate files ({', '.join(p.name for p in candidates)}); "
                             "choose the file itself as the source")


def read_source(path: Path, fmt: str = "auto") -> ForeignConcept:
    """Parse a Custom Diffusion source (file or folder) of the given format ('auto' detects it from the content)."""
    if fmt not in FORMATS:
        raise ForeignFormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    weights_path = _pick_in_folder(path) if path.is_dir() else path
    try:
        obj, metadata = read_tensor_file(weights_path)
    except ForeignFormatError as e:
        if fmt in ("infusion", "auto") and "was refused" in str(e):
            raise ForeignFormatError(f"{e} If it is an official Infusion checkpoint: it pickles its embedding "
                                     f"manager (an nn.ParameterDict), so {INFUSION_EXTRACT}") from None
        raise
    kind = _content_kind(obj)
    if kind == "unknown":
        raise ForeignFormatError(f"{weights_path.name} is not a Custom Diffusion file of diffusers or adobe format "
                                 f"nor Infusion vectors (found {_describe(obj)})")
    if fmt != "auto" and fmt != kind:
        raise ForeignFormatError(f"{weights_path.name} is in {kind} format, not {fmt}: choose format '{kind}' or 'auto'")
    parse = {"infusion": parse_infusion, "diffusers": parse_diffusers_weights, "adobe": parse_adobe}[kind]
    out = parse(obj, weights_path.name)
    out.files.append(weights_path)
    if kind == "diffusers":
        _add_token_files(out, weights_path, metadata)
    out.metadata = metadata
    return out


def select_tokens(foreign: ForeignConcept, wanted: str) -> list[str]:
    """The tokens that form the concept: all of them (empty ``wanted``) or a comma/space separated list."""
    available = foreign.token_names
    if not wanted.strip():
        return available
    chosen = []
    for item in re.split(r"[,\s]+", wanted.strip()):
        token = item if item in available else f"<{item.strip('<>')}>"
        if token not in available:
            raise ForeignFormatError(f"token {item!r} is not in the source; it has "
                                     f"{', '.join(available) or 'no modifier tokens'}")
        if token not in chosen:
            chosen.append(token)
    return chosen


def default_trigger(tokens: list[str]) -> str:
    """A trigger word derived from the token names: ``<new1>`` → ``new1``, ``<new1>,<new2>`` → ``new1_new2``."""
    parts = [re.sub(r"\W+", "", t) for t in tokens]
    trigger = "_".join(p for p in parts if p)[:64]
    if not trigger:
        raise ForeignFormatError("no trigger word can be derived from the token names; enter a trigger word")
    return trigger
