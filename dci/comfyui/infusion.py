"""Infusion concepts in ComfyUI: the attn2 patch that adds the residual vectors, and the CLIP side that marks
where the trigger word's tokens are.

* **MODEL**: a clone gets one ``InfusionPatch`` per cross-attention layer (an attn2 replace patch, chaining to
  a replace patch the input MODEL may carry) and the context stash (``seams.stash_attn2_context``) that lets
  the patch see the raw cross-attention context. Rows of the context that are the trigger's get
  ``strength · r`` added to their projected values (and keys, for a concept trained with unlocked keys).
* **CLIP**: a clone's text model is wrapped by ``MarkingTextModel``, which records the text encoder's output
  rows at the trigger's token positions (found by the storage of the trigger's vectors in the token lists,
  ``seams.storage_key``) into the ``Marks`` the MODEL patches read. ``CLIP.clone`` shares the text model
  object, so later clones (e.g. CLIP Set Last Layer) keep recording.

A prompt without the trigger records nothing and matches nothing, so the MODEL computes it exactly as the base
model (tested bit for bit). See ``method.infusion`` for the maths and the matching rule.
"""

from __future__ import annotations

import threading

import torch
from comfy.ldm.modules.attention import optimized_attention

from ..method import infusion
from . import seams
from .model import cross_attention_layers

MAX_MARKS = 4096  # recorded rows kept per concept (oldest dropped first): one per trigger token per prompt


class Marks:
    """The text encoder's output rows at a trigger's positions, as recorded while prompts were encoded."""

    def __init__(self):
        self._rows: dict[bytes, torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo) -> Marks:
        # ModelPatcher.clone deep-copies model_options: every clone must keep reading the one registry the CLIP
        # writes to, whenever the prompts are encoded
        return self

    def add(self, rows: torch.Tensor) -> None:
        with self._lock:
            for row in rows.detach().float().cpu():
                key = row.numpy().tobytes()
                if key not in self._rows:
                    self._rows[key] = row.clone()
            while len(self._rows) > MAX_MARKS:
                self._rows.pop(next(iter(self._rows)))
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, dtype: torch.dtype, device) -> torch.Tensor:
        """All recorded rows cast like a context (so a cast context row matches its cast record bit for bit)."""
        with self._lock:
            key = (dtype, str(device), len(self._rows))
            if key not in self._cache:
                stacked = torch.stack(list(self._rows.values())) if self._rows else torch.zeros(0, 0)
                self._cache[key] = stacked.to(device=device, dtype=dtype)
            return self._cache[key]

    def mask(self, context: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return torch.zeros(context.shape[:2], dtype=torch.bool, device=context.device)
        return infusion.mark_rows(context, self.rows(context.dtype, context.device))


class InfusionPatch:
    """attn2 replace patch of one layer: residual vectors at the marked rows, then attention as usual."""

    def __init__(self, marks: Marks, value: torch.Tensor, key: torch.Tensor | None, strength: float,
                 previous=None):
        self.marks, self.value, self.key, self.strength, self.previous = marks, value, key, strength, previous

    def __call__(self, q, k, v, extra_options):
        stashed = seams.stashed_attn2_context(extra_options)
        if stashed is not None and len(self.marks):
            context = stashed[0]
            mask = self.marks.mask(context)
            if mask.shape[0] == v.shape[0] and bool(mask.any()):
                v = infusion.add_at(v, mask, self.value, self.strength)
                if self.key is not None:
                    k = infusion.add_at(k, mask, self.key, self.strength)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                   transformer_options=extra_options)


def residual_layers(model_patcher, residuals: dict[str, torch.Tensor]) -> list[tuple]:
    """(layer, value vector, key vector or None) per cross-attention layer; raises ValueError with what does
    not fit this MODEL."""
    layers = cross_attention_layers(model_patcher)
    by_key = {layer.weight_prefix.removeprefix("diffusion_model.").rstrip("."): layer for layer in layers}
    by_key.update({layer.weight_prefix.rstrip("."): layer for layer in layers})
    out, used = [], set()
    for layer in layers:
        base = layer.weight_prefix.rstrip(".")
        value, key = residuals.get(f"{base}.to_v"), residuals.get(f"{base}.to_k")
        for name, vec in (("to_v", value), ("to_k", key)):
            if vec is not None and vec.shape != (layer.inner_dim,):
                raise ValueError(f"the residual of {base}.{name} has {vec.shape[0]} values; this MODEL's layer "
                                 f"has {layer.inner_dim} (a different architecture)")
        if value is not None or key is not None:
            used.update(k for k in (f"{base}.to_v", f"{base}.to_k") if k in residuals)
            out.append((layer, value, key))
    unknown = sorted(set(residuals) - used)
    if unknown:
        raise ValueError(f"{len(unknown)} residual vectors match no cross-attention layer of this MODEL, e.g. "
                         f"{unknown[0]} (a different architecture)")
    return out


def patch_model(model_patcher, residuals: dict[str, torch.Tensor], marks: Marks, strength: float):
    """A clone of ``model_patcher`` whose attn2 layers add the residuals at the rows ``marks`` recognises."""
    plan = residual_layers(model_patcher, residuals)
    out = model_patcher.clone()
    replaced = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    out.set_model_attn2_patch(seams.stash_attn2_context)
    for layer, value, key in plan:
        previous = replaced.get(layer.patch_key) or replaced.get(layer.patch_key[:2])
        value = value if value is not None else torch.zeros(layer.inner_dim)
        out.set_model_attn2_replace(InfusionPatch(marks, value.float(), None if key is None else key.float(),
                                                  float(strength), previous), *layer.patch_key)
    return out


class MarkingTextModel:
    """Stands in for a CLIP's text model and records the output rows at one trigger's token positions."""

    def __init__(self, inner, marks: Marks, vectors: dict[str, torch.Tensor]):
        self._inner = inner
        self._marks = marks
        self._storages = {seams.storage_key(v) for v in vectors.values()}

    def _positions(self, token_weight_pairs) -> list[tuple[int, int]]:
        """(batch row, output row) of every token that is one of the trigger's vectors."""
        found = []
        for chunks in (token_weight_pairs.values() if isinstance(token_weight_pairs, dict) else [token_weight_pairs]):
            offset = 0
            for chunk in chunks:
                for j, tok in enumerate(chunk):
                    if isinstance(tok[0], torch.Tensor) and seams.storage_key(tok[0]) in self._storages:
                        found.append((0, offset + j))
                offset += len(chunk)
            if found:
                return found  # every encoder puts the trigger at the same positions
        return found

    def encode_token_weights(self, token_weight_pairs):
        out = self._inner.encode_token_weights(token_weight_pairs)
        positions = self._positions(token_weight_pairs)
        cond = out[0]
        if positions and isinstance(cond, torch.Tensor) and cond.dim() == 3:
            rows = [cond[b, r] for b, r in positions if r < cond.shape[1]]
            if rows:
                self._marks.add(torch.stack(rows))
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


def mark_clip(clip, marks: Marks, vectors: dict[str, torch.Tensor]):
    """``clip`` (a clone made by the caller) with a text model that records the trigger's rows into ``marks``."""
    clip.cond_stage_model = MarkingTextModel(clip.cond_stage_model, marks, vectors)
    return clip
