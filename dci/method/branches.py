"""DCI's two branches in one batch: which rows of a UNet call are which, and the shared guidance.

The sampler carries 2B latent rows: B concept latents, then B auxiliary latents; concept row k pairs with
auxiliary row B + k, so rows of different images never mix. ComfyUI stacks one chunk of rows per cond into a
UNet call (``cond_or_uncond`` lists the cond of each chunk), so the rows of a call are found from that list.

With shared guidance the auxiliary rows' unconditional pass is not run: the auxiliary latent takes the concept
latent's unconditional noise prediction, as the reference code does (3 rows per image instead of 4).
Everything here is plain torch, so the bookkeeping and the formula are checked without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GUIDANCE_MODES = ("shared", "separate")


class BranchError(ValueError):
    """A DCI sampling setting is out of range; the message says which and what is allowed."""


@dataclass(frozen=True)
class DCIPlan:
    """How the two branches run: for how much of the noise schedule, with which guidance, from which noise.

    ``split`` is a share of the noise schedule, as the reference code's timestep rule (two branches while
    t / 1000 > 1 - split) and ComfyUI's start/end percents have it: the two-branch phase lasts while the
    noise level is above the sigma that ``model_sampling.percent_to_sigma(split)`` gives, so it ends at the
    same noise level under every scheduler, step count and denoise. The defaults are the nodes' defaults:
    the paper's split of 0.3 (the newest reference example uses 0.2), shared guidance as in the reference
    code, and the seed of the auxiliary branch's own noise.
    """

    split: float = 0.3
    guidance: str = "shared"
    aux_seed: int = 1

    def __post_init__(self) -> None:
        if not (0.0 <= self.split <= 1.0):
            raise BranchError(f"split must be between 0 and 1 (the share of the noise schedule with two branches); "
                              f"got {self.split}")
        if self.guidance not in GUIDANCE_MODES:
            raise BranchError(f"guidance must be one of {GUIDANCE_MODES}; got {self.guidance!r}")


def two_branch_steps(sigmas: torch.Tensor, end_sigma: float) -> int:
    """How many steps of a schedule run both branches: those that start above the phase's end sigma."""
    return int((sigmas[:-1] > end_sigma).sum()) if len(sigmas) > 1 else 0


def repeat_to(context: torch.Tensor, length: int) -> torch.Tensor:
    """A [B, T, D] context repeated along T to ``length`` tokens, as ComfyUI pads conds of other lengths."""
    return context.repeat(1, length // context.shape[1], *([1] * (context.dim() - 2)))


def stack_branches(concept: torch.Tensor, aux: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """The contexts of one mixed cond: ``[concept × batch, aux × batch]`` at their common length."""
    length = math.lcm(concept.shape[1], aux.shape[1])
    stacked = torch.cat([repeat_to(concept, length).repeat(batch, 1, 1),
                         repeat_to(aux.to(concept), length).repeat(batch, 1, 1)])
    return stacked, length


@dataclass(frozen=True)
class CallRows:
    """The rows of one UNet call. ``concept[k]`` pairs with ``aux[k]``; None: that cond is not in the call."""

    concept: torch.Tensor | None
    aux: torch.Tensor | None
    concept_uncond: torch.Tensor | None
    aux_uncond: torch.Tensor | None


def call_rows(cond_or_uncond: list[int], total: int, batch: int, mixed_index: int,
              uncond_index: int | None) -> CallRows | None:
    """Locate the branches in a UNet call of ``total`` rows; None when the call holds no whole branch pairs.

    Every chunk of a call belongs to one cond and has 2 × ``batch`` rows: the concept half, then the auxiliary
    half. A call that ComfyUI split differently (e.g. when memory is short) gives None, so nothing is paired
    with the wrong partner.
    """
    chunks = len(cond_or_uncond)
    if chunks == 0 or total % chunks or total // chunks != 2 * batch:
        return None
    size = total // chunks
    start = {"mixed": None, "uncond": None}
    for j, idx in enumerate(cond_or_uncond):
        if idx == mixed_index:
            start["mixed"] = j * size
        elif uncond_index is not None and idx == uncond_index:
            start["uncond"] = j * size

    def rows(at: int | None, half: int) -> torch.Tensor | None:
        return None if at is None else torch.arange(at + half * batch, at + (half + 1) * batch)

    return CallRows(rows(start["mixed"], 0), rows(start["mixed"], 1), rows(start["uncond"], 0),
                    rows(start["uncond"], 1))


def kept_rows(total: int, dropped: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the rows that run, position of every row in the smaller batch) when ``dropped`` rows are skipped."""
    keep = torch.ones(total, dtype=torch.bool)
    if dropped is not None:
        keep[dropped] = False
    return keep, torch.cumsum(keep.long(), 0) - 1


def shared_uncond(denoised_uncond: torch.Tensor, x_concept: torch.Tensor, x_aux: torch.Tensor) -> torch.Tensor:
    """The auxiliary latent's unconditional prediction under shared guidance.

    The auxiliary branch reuses the concept latent's unconditional noise prediction
    ε_u = (x_c − D_u(x_c)) / σ, so its denoised estimate is D_u(x_a) = x_a − σ·ε_u = D_u(x_c) + (x_a − x_c),
    which needs no σ.
    """
    return denoised_uncond + (x_aux - x_concept).to(denoised_uncond.dtype)
