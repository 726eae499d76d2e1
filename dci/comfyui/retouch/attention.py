"""The retouch pass's attention patches: two-source self-attention (attn1) and the subject map (attn2).

``RetouchSelfAttention`` replaces attn1 on the decoder's finest levels (found from the model): on a UNet call
that carries the reference and context branches (``wrapper.py`` adds them and puts a ``RetouchCall`` into
``transformer_options``), the generated rows' queries attend to the reference branch's keys/values inside the
subject mask and to the context branch's outside it (``method.retouch.two_source_attention``). The branch rows
themselves get plain self-attention. ``SubjectMapPatch`` sits on every cross-attention layer and adds the
generated positive rows' attention to the subject tokens to this step's map; the mask the next step uses is
that map, thresholded. Without a ``RetouchCall`` both patches are plain attention. An attn1/attn2 replace patch
another extension set before ours is called for the attention itself, not dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import optimized_attention

from ...method.retouch import (
    RetouchSettings,
    Trajectory,
    mask_tokens,
    subject_attention,
    subject_mask,
    two_source_attention,
)
from ...method.token_spans import tile_mask

log = logging.getLogger(__name__)

PLAN_KEY = "dci_retouch"  # transformer_options of the patched MODEL: the RetouchPlan
RUN_KEY = "dci_retouch_run"  # transformer_options of one sampling run: its RetouchRun (OUTER_SAMPLE wrapper)
CALL_KEY = "dci_retouch_call"  # transformer_options of one UNet call: its RetouchCall (APPLY_MODEL wrapper)


@dataclass(frozen=True)
class RetouchPlan:
    """What the patched MODEL knows: both trajectories, the settings, the sigma window, where the subject is."""

    reference: Trajectory
    context: Trajectory
    settings: RetouchSettings
    window: tuple[float, float]  # (high, low): the swap runs while low < sigma <= high
    subject_tokens: torch.Tensor | None  # [L] bool: the concept phrase's tokens in the positive
    mask: torch.Tensor | None  # [Bm, H, W] a fixed subject mask (MASK input) instead of the maps

    def swaps_at(self, sigma: float) -> bool:
        return self.window[1] < sigma <= self.window[0]

    def first_step(self, sigmas: torch.Tensor) -> int:
        """Index of the first sigma of a schedule inside the window's start (the retouch pass begins there)."""
        inside = (sigmas[:-1] <= self.window[0] * (1 + 1e-6)).nonzero()
        return int(inside[0]) if len(inside) else max(len(sigmas) - 1, 0)


@dataclass
class RetouchRun:
    """The state of one sampling run: the running subject map and the mask from the previous step."""

    plan: RetouchPlan
    sigma: float | None = None
    mask: torch.Tensor | None = None  # [B, H, W] 0/1 at the latent's resolution
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    swapped_calls: int = 0
    warned: set = field(default_factory=set)
    _tokens_cache: dict = field(default_factory=dict)

    def begin(self, sigma: float) -> None:
        """A UNet call at ``sigma``: a new noise level turns the maps gathered so far into the mask."""
        if self.sigma is not None and sigma != self.sigma and self.sums is not None:
            seen = self.counts > 0
            maps = self.sums / self.counts.clamp_min(1)[:, None, None]
            mask = subject_mask(maps, self.plan.settings.threshold)
            if self.mask is not None and self.mask.shape == mask.shape:
                mask[~seen] = self.mask[~seen].to(mask)
            self.mask = mask
            self._tokens_cache.clear()
            self.sums = self.counts = None
        self.sigma = sigma

    def add_maps(self, images: torch.Tensor, maps: torch.Tensor, layer_hw: tuple[int, int], size: tuple[int, int],
                 batch: int) -> None:
        n = maps.shape[0]
        m = maps.reshape(n, 1, *layer_hw)
        if tuple(layer_hw) != tuple(size):
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        if self.sums is None or self.sums.shape[0] != batch or tuple(self.sums.shape[1:]) != tuple(size):
            self.sums = torch.zeros((batch, *size), device=maps.device)
            self.counts = torch.zeros(batch, device=maps.device)
        idx = images.to(maps.device)
        self.sums.index_add_(0, idx, m[:, 0].to(self.sums))
        self.counts.index_add_(0, idx, torch.ones(n, device=maps.device))

    def mask_rows(self, images: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
        """[N, height * width] subject weights of the generated rows at a layer's resolution; None: no mask yet."""
        source = self.plan.mask if self.plan.mask is not None else self.mask
        if source is None:
            return None
        key = (height, width, tuple(images.tolist()))
        if key not in self._tokens_cache:
            per_image = mask_tokens(source.float(), height, width)
            self._tokens_cache[key] = per_image[images.cpu() % per_image.shape[0]]
        return self._tokens_cache[key]

    def summary(self) -> str:
        if self.plan.mask is not None:
            where = f"the given mask covers {100 * float(self.plan.mask.mean()):.1f}% of the image"
        elif self.mask is not None:
            where = f"the last subject mask covers {100 * float(self.mask.mean()):.1f}% of the image"
        else:
            where = "no subject mask was found (the context's keys/values everywhere)"
        return f"{self.swapped_calls} UNet calls ran with the reference and context branches; {where}"

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message)


@dataclass(frozen=True)
class RetouchCall:
    """One UNet call of the retouch pass: N generated rows, then (with ``branches``) N reference and N context
    rows; ``images`` maps each generated row to its image, ``cond_rows`` are the generated positive rows."""

    run: RetouchRun
    rows: int
    batch: int
    images: torch.Tensor  # [N] long
    cond_rows: torch.Tensor  # long indices < N
    branches: bool
    latent_size: tuple[int, int]


def _attend(inner, heads: int, extra_options):
    def attend(q, k, v):
        if inner is not None:
            return inner(q, k, v, extra_options)
        return optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))

    return attend


class RetouchSelfAttention:
    """attn1 replace patch of one decoder layer."""

    def __init__(self, name: str, inner=None):
        self.name = name
        self.inner = inner  # an attn1 replace patch that was there before ours (another extension's)

    def __call__(self, q, k, v, extra_options):
        attend = _attend(self.inner, extra_options["n_heads"], extra_options)
        call: RetouchCall | None = extra_options.get(CALL_KEY)
        n = call.rows if call is not None else 0
        if call is None or not call.branches or q.shape[0] != 3 * n or q.shape[1] != k.shape[1]:
            return attend(q, k, v)
        h, w = extra_options["activations_shape"][-2:]
        mask = call.run.mask_rows(call.images, h, w) if h * w == q.shape[1] else None
        if mask is not None:
            mask = mask.to(q.device)
        generated = two_source_attention(q[:n], k[n:2 * n], v[n:2 * n], k[2 * n:], v[2 * n:], mask, attend)
        return torch.cat([generated, attend(q[n:], k[n:], v[n:])])


class SubjectMapPatch:
    """attn2 replace patch of one layer: gathers the subject tokens' attention of the generated positive rows."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        out = _attend(self.inner, heads, extra_options)(q, k, v)
        call: RetouchCall | None = extra_options.get(CALL_KEY)
        tokens = call.run.plan.subject_tokens if call is not None else None
        if call is None or tokens is None or len(call.cond_rows) == 0:
            return out
        h, w = extra_options["activations_shape"][-2:]
        if h * w != q.shape[1] or k.shape[1] % tokens.shape[0]:
            call.run.warn_once("map", "DCI Retouch: a cross-attention layer's shape does not match the positive's "
                                      "tokens; it adds nothing to the subject map")
            return out
        rows = call.cond_rows.to(q.device)
        maps = subject_attention(q[rows], k[rows], heads, tile_mask(tokens, k.shape[1]))
        call.run.add_maps(call.images[call.cond_rows], maps, (h, w), call.latent_size, call.batch)
        return out


def patch_attention(model_patcher, attn1_layers, attn2_layers, maps: bool) -> None:
    """Our attn1 patch on ``attn1_layers`` and, when the mask comes from the maps, our attn2 patch on every
    cross-attention layer of ``model_patcher`` (a clone: the setters mutate it)."""
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
    before1, before2 = replace.get("attn1", {}), replace.get("attn2", {})
    for layer in attn1_layers:
        inner = before1.get(layer.patch_key) or before1.get(layer.block)
        model_patcher.set_model_attn1_replace(RetouchSelfAttention(layer.name, inner), layer.block[0],
                                              layer.block[1], layer.depth)
    if maps:
        for layer in attn2_layers:
            inner = before2.get(layer.patch_key) or before2.get(layer.block)
            model_patcher.set_model_attn2_replace(SubjectMapPatch(inner), layer.block[0], layer.block[1], layer.depth)
