"""Infusion's value residuals, in plain torch: where they go and what they add.

Infusion (arXiv 2404.14007) customises a model with one vector per cross-attention layer, added to the output of
the value projection only at the concept's token positions: ``v'_j = W_v c_j + r`` for the concept's tokens j,
``v'_i = W_v c_i`` elsewhere. Attention outputs then change by ``A[:, j] · r`` (the attention each query pays to
token j times the vector), and a prompt without the concept is computed exactly as by the base model. The
official code also adds a vector to the key projection in its default attention path; here that is the
``unlock_keys`` option (keys stay locked by default, as the paper describes).

Marking which rows of a cross-attention context are the concept's (``mark_rows``): the text encoder's output
rows at the trigger word's positions are recorded when a prompt is encoded; during sampling a row is the
concept's exactly when it equals a recorded row bit for bit (after the same dtype cast). A prompt that does not
contain the trigger has no such row unless it repeats a recorded prompt's tokens up to that position with the
trigger's own (non-vocabulary) vectors in its place, which ordinary text can't.
"""

from __future__ import annotations

import torch

PROBE = 8  # leading features compared first, before whole rows


def add_at(x: torch.Tensor, mask: torch.Tensor, vector: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x [B, T, D]`` with ``scale · vector [D]`` added at the rows where ``mask [B, T]`` is true; the other rows
    are the very values of ``x`` (``torch.where``, not an addition of zeros)."""
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the rows of {tuple(x.shape)}")
    if not bool(mask.any()):
        return x
    add = (vector.to(device=x.device, dtype=torch.float32) * scale)
    return torch.where(mask.unsqueeze(-1), (x.float() + add).to(x.dtype), x)


def mark_rows(context: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: which rows of ``context [B, T, D]`` equal one of the ``marks [M, D]`` exactly."""
    b, t, d = context.shape
    if marks.numel() == 0 or marks.shape[1] != d:
        return torch.zeros(b, t, dtype=torch.bool, device=context.device)
    marks = marks.to(device=context.device, dtype=context.dtype)
    k = min(PROBE, d)
    candidate = (context[:, :, None, :k] == marks[None, None, :, :k]).all(-1)  # [B, T, M]
    if not bool(candidate.any()):
        return candidate.any(-1)
    hit = torch.zeros(b, t, dtype=torch.bool, device=context.device)
    for bi, ti, mi in candidate.nonzero().tolist():
        if not hit[bi, ti] and torch.equal(context[bi, ti], marks[mi]):
            hit[bi, ti] = True
    return hit


def token_mask(batch: int, length: int, positions: list[list[int]], device=None) -> torch.Tensor:
    """``[batch, length]`` true at each row's listed token positions (rows without positions stay false)."""
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for row, cols in enumerate(positions):
        for c in cols:
            if not 0 <= c < length:
                raise ValueError(f"token position {c} is outside a context of {length} tokens")
            mask[row, c] = True
    return mask


def trainable_values(inner_dims: list[int], unlock_keys: bool = False) -> int:
    """How many values Infusion trains: one vector per layer (value; and key when unlocked)."""
    return sum(inner_dims) * (2 if unlock_keys else 1)
