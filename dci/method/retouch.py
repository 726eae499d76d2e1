"""Layout-and-Retouch's maths: trajectories, the subject mask, the two-source self-attention, the switch step.

Layout-and-Retouch (arXiv 2407.09779) makes a *context* image whose layout comes from the vanilla model
(step-blended sampling), then regenerates it with the personalised model while self-attention takes its keys
and values from two sources: the reference image's inversion trajectory inside the subject's mask, the context
image's trajectory outside it. Everything here is plain torch, so the rules are checked without a model.

Latents live in the sampler's space (ComfyUI's ``x`` at noise level sigma: the clean latent plus sigma times
the noise, for the SD families); a trajectory holds one latent per sigma of a schedule, highest sigma first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class RetouchError(ValueError):
    """A Layout-and-Retouch input is out of range or inconsistent; the message says what to change."""


@dataclass(frozen=True)
class Trajectory:
    """Latents of one sampling (or inversion) run, one per sigma; ``sigmas`` strictly decreasing.

    ``latents`` is [len(sigmas), B, C, H, W] in the sampler's space; ``family`` names the model family that
    made it (a trajectory only makes sense to a model of that family); ``source`` says how it was made.
    """

    sigmas: torch.Tensor  # [S] float64, decreasing
    latents: torch.Tensor  # [S, B, C, H, W] float32
    family: str
    source: str

    def __post_init__(self) -> None:
        if self.sigmas.dim() != 1 or self.latents.dim() != 5 or self.latents.shape[0] != self.sigmas.shape[0]:
            raise RetouchError(f"a trajectory needs one latent per sigma: sigmas {tuple(self.sigmas.shape)}, "
                               f"latents {tuple(self.latents.shape)}")
        if len(self.sigmas) > 1 and not bool((self.sigmas[1:] < self.sigmas[:-1]).all()):
            raise RetouchError("a trajectory's sigmas must decrease strictly")

    @property
    def batch(self) -> int:
        return self.latents.shape[1]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of its latents."""
        return tuple(self.latents.shape[2:])

    def at(self, sigma: float) -> torch.Tensor | None:
        """The latent at noise level ``sigma``: the stored one, or the linear interpolation between the two
        stored neighbours (exact on the path of an Euler step); None outside the stored range."""
        s = self.sigmas
        hi, lo = float(s[0]), float(s[-1])
        tol = 1e-4 * max(abs(hi), 1.0)
        if sigma > hi + tol or sigma < lo - tol:
            return None
        sigma = min(max(sigma, lo), hi)
        i = int((s >= sigma).sum()) - 1  # s[i] >= sigma > s[i + 1]
        if i >= len(s) - 1 or abs(float(s[i]) - sigma) <= tol:
            return self.latents[max(i, 0)]
        if abs(float(s[i + 1]) - sigma) <= tol:
            return self.latents[i + 1]
        w = (float(s[i]) - sigma) / (float(s[i]) - float(s[i + 1]))
        return torch.lerp(self.latents[i], self.latents[i + 1], w)


def switch_step(switch: float, steps: int) -> int:
    """How many of ``steps`` the vanilla model runs in step-blended sampling: the nearest whole step."""
    if not isinstance(switch, (int, float)) or switch != switch or not 0.0 <= switch <= 1.0:
        raise RetouchError(f"switch must be between 0 and 1 (the share of the steps the vanilla model runs); "
                           f"got {switch!r}")
    return int(round(float(switch) * steps))


@dataclass(frozen=True)
class RetouchSettings:
    """How the retouch pass swaps self-attention (defaults: this project's choices, see docs/retouch.md).

    ``threshold``: a pixel belongs to the subject when its cross-attention to the subject tokens is at least
    this share of the image's maximum. ``start``/``end``: the retouch pass begins at ``start`` (a share of the
    schedule, ComfyUI's start/end percents) from the context's latent there, so the steps before it are the
    context's own (its layout), and swaps self-attention until ``end``. ``decoder_levels``: self-attention is swapped
    in that many of the decoder's finest resolution levels (counted from the model).
    """

    threshold: float = 0.7
    start: float = 0.3
    end: float = 0.8
    decoder_levels: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise RetouchError(f"mask_threshold must be in (0, 1] (a share of each map's maximum); got {self.threshold}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise RetouchError(f"the step window needs 0 <= start < end <= 1 (shares of the schedule); got "
                               f"start {self.start}, end {self.end}")
        if self.decoder_levels < 1:
            raise RetouchError(f"decoder_levels must be at least 1; got {self.decoder_levels}")


def subject_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, H, W] non-negative attention maps → [B, H, W] float 0/1 masks: each map divided by its own maximum,
    kept where it reaches ``threshold``. A map that is zero everywhere gives an empty mask."""
    if maps.dim() != 3:
        raise RetouchError(f"attention maps must be [B, H, W]; got {tuple(maps.shape)}")
    peak = maps.flatten(1).amax(dim=1).clamp_min(0)
    norm = maps / torch.where(peak > 0, peak, torch.ones_like(peak))[:, None, None]
    return ((norm >= threshold) & (peak > 0)[:, None, None]).to(maps.dtype)


def mask_tokens(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H, W] 0/1 mask → [B, height * width] 0/1 weights at a layer's resolution (area average, then
    rounded: a layer pixel belongs to the subject when at least half of what it covers does)."""
    m = F.interpolate(mask[:, None].float(), size=(height, width), mode="area") if mask.shape[-2:] != (
        height, width) else mask[:, None].float()
    return (m >= 0.5).to(mask.dtype).flatten(1)


def two_source_attention(q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, k_ctx: torch.Tensor | None,
                         v_ctx: torch.Tensor | None, mask: torch.Tensor | None,
                         attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Self-attention of the queries ``q`` [B, T, D] over two sources: query pixels inside ``mask`` [B, T]
    attend to the reference's keys/values, the others to the context's. ``attend(q, k, v)`` is plain
    attention. ``mask`` None means no subject found yet: every pixel takes the context. A missing context
    (``k_ctx`` None) leaves the pixels outside the mask on the reference too."""
    if k_ctx is None or v_ctx is None:
        return attend(q, k_ref, v_ref)
    if mask is None or not bool(mask.any()):
        return attend(q, k_ctx, v_ctx)
    m = mask.to(q.dtype)[..., None]
    if bool((m == 1).all()):
        return attend(q, k_ref, v_ref)
    return m * attend(q, k_ref, v_ref) + (1 - m) * attend(q, k_ctx, v_ctx)


def subject_attention(q: torch.Tensor, k: torch.Tensor, heads: int, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-attention of every query pixel to the subject tokens: [B, T] (softmax over all tokens, summed over
    the subject tokens ``tokens`` [L] bool, averaged over heads)."""
    b, t, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, t, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
    return probs[..., tokens.to(probs.device)].sum(-1).mean(1)


Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # (x, sigma) → the model's denoised estimate


def invert(latent: torch.Tensor, sigmas: torch.Tensor, denoise: Denoiser, refine: int = 0,
           on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Deterministic (DDIM-style) inversion of a clean latent along ``sigmas`` (decreasing, ending at 0):
    the latents at every sigma, [len(sigmas), B, C, H, W], the given latent last.

    Each step runs one Euler step of the probability-flow ODE backwards, x(σ_hi) = x(σ_lo) + (σ_hi − σ_lo)·d,
    with d = (x − denoised)/σ_hi taken at the higher noise level (the model is never asked about sigma 0).
    ``refine`` fixed-point iterations re-evaluate d at the new point, which makes the step the exact inverse
    of an Euler sampling step as the iterations converge.
    """
    if sigmas.dim() != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0.0:
        raise RetouchError("inversion needs a schedule of at least one step that ends at sigma 0")
    if refine < 0:
        raise RetouchError(f"refine must be 0 or more; got {refine}")
    out = [latent]
    x = latent
    steps = len(sigmas) - 1
    for n, i in enumerate(range(steps, 0, -1)):
        lo, hi = float(sigmas[i]), float(sigmas[i - 1])
        guess = x
        for _ in range(refine + 1):
            d = (guess - denoise(guess, hi)) / hi
            guess = x + (hi - lo) * d
        x = guess
        out.append(x)
        if on_step is not None:
            on_step(n + 1, steps)
    return torch.stack(out[::-1])


def sample_euler(x: torch.Tensor, sigmas: torch.Tensor, denoise: Denoiser,
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Plain Euler sampling from ``x`` at sigmas[0] down the schedule (the inversion's round trip)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        hi, lo = float(sigmas[i]), float(sigmas[i + 1])
        x = x + (lo - hi) * (x - denoise(x, hi)) / hi
        if on_step is not None:
            on_step(i + 1, steps)
    return x
