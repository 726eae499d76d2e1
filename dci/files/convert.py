"""A foreign Custom Diffusion result ↔ a concept: token vectors per encoder, exact deltas, export tensors.

Full weights W become deltas against the loaded base b. To keep import → export → import exact, the
difference is taken in float64 (exact for any two float32/float16/bfloat16 numbers less than 2**29 apart in
magnitude, i.e. always in practice) and stored as float32 when float32 holds it exactly, else as float64;
``(b + d)`` computed in float64 and cast back then reproduces W bit for bit, which is verified. Exports that
write full weights pick the narrowest dtype that reproduces the delta exactly (``precision="exact"``).

Plain torch: the model's key names and base weights are passed in by ``dci.comfyui.import_export``.
"""

from __future__ import annotations

import json
import re

import torch

from .concept import ENCODERS, Concept, check_trigger
from .foreign import DIFFUSERS_WEIGHTS_STEM, NO_TOKENS, ForeignConcept, ForeignFormatError

EXPORT_PRECISIONS = ("exact", "float32", "float16")


def split_token_vectors(vectors: list[torch.Tensor], widths: dict[str, int], names: list[str]) -> dict[str, torch.Tensor]:
    """[k, width] per text encoder from k concatenated vectors (clip_l first, then clip_g, as SDXL stores them)."""
    order = [enc for enc in ENCODERS if enc in widths]
    total = sum(widths[enc] for enc in order)
    for name, vec in zip(names, vectors, strict=True):
        if vec.numel() != total:
            expected = " + ".join(f"{enc} {widths[enc]}" for enc in order)
            raise ForeignFormatError(
                f"token {name} is {vec.numel()} wide, but this CLIP expects {expected}"
                f"{' = ' + str(total) if len(order) > 1 else ''}: the source was made for another model family"
            )
    stacked = torch.stack(vectors)
    out, start = {}, 0
    for enc in order:
        out[enc] = stacked[:, start:start + widths[enc]].contiguous()
        start += widths[enc]
    return out


# -- delta arithmetic -------------------------------------------------------------------------------------
def exact_delta(weight: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(W − b, number of elements where b + delta does not give W back). float32 when that is exact, else float64."""
    w64, b64 = weight.detach().cpu().double(), base.detach().cpu().double()
    d = w64 - b64
    d32 = d.float()
    delta = d32 if torch.equal(d32.double(), d) else d
    inexact = int(((b64 + delta.double()).to(weight.dtype) != weight.cpu()).sum())
    return delta, inexact


def full_weight(base: torch.Tensor, delta: torch.Tensor, precision: str = "exact") -> torch.Tensor:
    """b + delta as a weight; 'exact' gives float32 if ``exact_delta`` of it returns ``delta`` exactly, else float64."""
    b64, d64 = base.detach().cpu().double(), delta.detach().cpu().double()
    w = b64 + d64
    if precision == "float16":
        return w.half()
    w32 = w.float()
    if precision == "float32" or torch.equal(w32.double() - b64, d64):
        return w32
    return w


def cast(t: torch.Tensor, precision: str) -> torch.Tensor:
    t = t.detach().cpu()
    return {"float32": t.float(), "float16": t.half()}.get(precision, t).contiguous()


def build_concept(foreign: ForeignConcept, key_map: dict[str, str], base: dict[str, torch.Tensor],
                  widths: dict[str, int], family: str, trigger: str, class_noun: str, tokens: list[str],
                  base_fingerprint: str, source_name: str) -> tuple[Concept, list[str]]:
    """The concept for a model whose K/V weights are ``base`` (ComfyUI keys) and whose encoders have ``widths``."""
    notes = list(foreign.notes)
    entries = [(key, "full", t) for key, t in foreign.full.items()] + [(key, "delta", t) for key, t in foreign.delta.items()]
    unknown = [key for key, _, _ in entries if key not in key_map]
    if unknown:
        raise ForeignFormatError(
            f"{len(unknown)} of the source's {len(entries)} key/value layers do not exist in this MODEL (e.g. "
            f"{unknown[0]}): the source was made for another model family or architecture"
        )
    deltas: dict[str, torch.Tensor] = {}
    inexact_total = 0
    for key, kind, t in entries:
        target = key_map[key]
        b = base[target]
        if tuple(t.shape) != tuple(b.shape):
            raise ForeignFormatError(
                f"layer {key} is {list(t.shape)} in the source but {list(b.shape)} in this MODEL: the source was "
                "made for another model family or architecture"
            )
        if kind == "full":
            deltas[target], inexact = exact_delta(t, b)
            inexact_total += inexact
        else:
            deltas[target] = t.detach().cpu().contiguous()
    if inexact_total:
        notes.append(f"{inexact_total} weight elements are not reproduced bit-exactly by base + delta "
                     "(values more than 2**29 apart in magnitude)")
    missing = sorted(set(base) - set(deltas))
    for key in missing:
        deltas[key] = torch.zeros(base[key].shape, dtype=torch.float32)
    if missing:
        notes.append(f"{len(missing)} key/value layers of this MODEL are not in the source: left unchanged")
    if not tokens:
        raise ForeignFormatError(NO_TOKENS)
    token_vectors = split_token_vectors([foreign.tokens[t] for t in tokens], widths, tokens)
    check_trigger(trigger)
    if not class_noun.strip():
        raise ForeignFormatError("the class noun is empty: enter the noun the concept is an instance of (e.g. dog)")
    concept = Concept(
        family=family, trigger=trigger, class_noun=class_noun.strip(), kv_deltas=deltas, tokens=token_vectors,
        base_fingerprint=base_fingerprint, method="custom-diffusion", steps=0,
        training={"imported_from": foreign.format, "source": source_name},
        extra_metadata={"source_format": foreign.format, "source_tokens": ",".join(tokens)},
    )
    concept.validate()
    return concept, notes


# -- export tensors ---------------------------------------------------------------------------------------
def export_token_names(concept: Concept) -> list[str]:
    """Token strings for tools that name every vector: the imported names when known, else <trigger>, <trigger1>…"""
    recorded = [t for t in concept.extra_metadata.get("source_tokens", "").split(",") if t]
    if len(recorded) == concept.num_tokens and len(set(recorded)) == len(recorded):
        return recorded
    if concept.num_tokens == 1:
        return [f"<{concept.trigger}>"]
    return [f"<{concept.trigger}{i + 1}>" for i in range(concept.num_tokens)]


def token_file_name(token: str) -> str:
    """A portable file name for a token (``<`` and ``>`` are not allowed on Windows)."""
    stem = re.sub(r"[^\w.-]+", "_", token.strip("<>")).strip("._") or "token"
    return f"{stem}.safetensors"


def lora_tensors(concept: Concept, precision: str) -> dict[str, torch.Tensor]:
    """Per-key ``.diff`` entries under ComfyUI's own model keys, which the stock LoRA loader applies."""
    return {key[: -len(".weight")] + ".diff": cast(d, precision) for key, d in concept.kv_deltas.items()}


def embedding_tensors(concept: Concept, precision: str) -> dict[str, torch.Tensor]:
    return {enc: cast(v, precision) for enc, v in concept.tokens.items()}


def diffusers_files(concept: Concept, base: dict[str, torch.Tensor], to_diffusers: dict[str, str],
                    processors: list[str], precision: str) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """File name → (tensors, metadata) of a diffusers Custom Diffusion folder for this concept.

    ``to_diffusers`` maps ComfyUI K/V keys to diffusers names; ``processors`` lists every attention processor
    of the UNet: those without weights get an empty placeholder, as diffusers lists them, so that diffusers'
    ``load_attn_procs`` sets a processor for every attention layer.
    """
    weights: dict[str, torch.Tensor] = {}
    with_weights = set()
    for key, delta in concept.kv_deltas.items():
        name = to_diffusers[key]
        attn, _, proj = name.rpartition(".to_")
        weights[f"{attn}.processor.to_{proj[0]}_custom_diffusion.weight"] = full_weight(base[key], delta, precision)
        with_weights.add(f"{attn}.processor")
    for proc in processors:
        if proc not in with_weights:
            weights[proc] = torch.zeros(0)
    tokens = export_token_names(concept)
    token_files = [token_file_name(t) for t in tokens]
    if len(set(token_files)) != len(token_files):
        token_files = [f"token{i + 1}_{f}" for i, f in enumerate(token_files)]
    prompt = f"{' '.join(tokens)} {concept.class_noun}"
    meta = {
        "format": "pt", "dci_trigger": concept.trigger, "dci_class_noun": concept.class_noun,
        "dci_family": concept.family, "dci_base_fingerprint": concept.base_fingerprint,
        "dci_tokens": json.dumps(tokens), "dci_token_files": json.dumps(token_files), "dci_prompt": prompt,
    }
    files = {f"{DIFFUSERS_WEIGHTS_STEM}.safetensors": (weights, meta)}
    for i, (token, fname) in enumerate(zip(tokens, token_files, strict=True)):
        if len(concept.tokens) == 1:
            (vec,) = concept.tokens.values()
            files[fname] = ({token: cast(vec[i], precision)}, {"format": "pt"})
        else:
            files[fname] = ({enc: cast(v[i], precision) for enc, v in concept.tokens.items()},
                            {"format": "pt", "token": token})
    return files
