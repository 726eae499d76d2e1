"""The Dual-Branch Integration Module (DBIM): the math that blends the two DCI branches.

During the early phase of DCI sampling, every cross-attention layer replaces the concept branch's attention
output with a per-pixel, per-head blend of its own output and the auxiliary branch's output. The blend
weight comes from where the concept branch attends to the concept and where the auxiliary branch attends to
the rest of its prompt (the method's DCI section, steps 1-6):

1. P: cross-attention probabilities of the two conditional rows (``attention_probs``).
2. S = softmax over the real prompt tokens of tau * P.
3. m_c = sum of S_c over the concept tokens; m_a = sum of S_a over the auxiliary-map tokens: the context
   words (every real prompt token but the auxiliary noun) in the reference reading, the noun in a variant.
4. M = spatial normalisation of tau * m per layer (``NORMALIZATIONS``).
5. w_c = sigmoid(M_c - lam * M_a)  (``dbim_weights``).
6. O_c <- w_c * O_c + (1 - w_c) * O_a  (``blend_outputs``).

Everything here is plain torch on explicit tensors, so it can be checked against a loop-based
re-computation of the formulas without a model. Shapes use B rows, ``heads`` heads, N pixels of the layer
and T context tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

READINGS = ("reference", "noun", "paper")
"""Which tokens feed the auxiliary map m_a.

"reference": the context words, i.e. the auxiliary prompt's real tokens except the auxiliary noun. The
reference code computes the total mass of S_a minus the noun's mass, which is the same sum; the paper's
figure shows the same map. "noun": the auxiliary noun's own tokens, a variant. "paper": the same map as
"reference" under an older name, so that workflows saved with it load and sample unchanged.
"""

CONTEXT_READINGS = ("reference", "paper")

REFERENCE_PIXELS = 64 * 64
"""Pixel count at which the "pixel_count" normalisation equals the "reference" one (SD1.5's finest
cross-attention layer at 512 px)."""


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, heads: int, chunk_size: int | None = None
) -> torch.Tensor:
    """Explicit cross-attention probabilities softmax(q k^T / sqrt(d)) for the given rows.

    Fused attention kernels never materialise P, but DBIM needs it for the two conditional rows only, so
    the caller slices those rows out of the projected q and k and keeps the fused kernel for the output.

    Args:
        q: projected queries [R, N, heads * d].
        k: projected keys [R, T, heads * d].
        heads: number of attention heads.
        chunk_size: optional number of pixels per step; bounds the float32 copies of q and the logits
            to R * heads * chunk_size * (d + T) values at a time.

    Returns:
        P of shape [R, heads, N, T] in float32 (computed in float32 whatever the input dtype, because
        fp16 logits lose the small differences that the temperature later amplifies). Its size is
        R * heads * N * T * 4 bytes: e.g. 2 rows * 8 heads * 4096 pixels * 77 tokens = 20 MB for
        SD1.5's finest layer at 512 px.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"q and k must be [rows, tokens, heads*dim]; got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    rows, n, inner = q.shape
    if k.shape[0] != rows or k.shape[2] != inner:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on rows or inner dimension")
    if heads < 1 or inner % heads != 0:
        raise ValueError(f"inner dimension {inner} is not divisible by heads={heads}")
    d = inner // heads
    kh = k.float().reshape(rows, k.shape[1], heads, d).transpose(1, 2)  # [R, H, T, d]
    scale = 1.0 / math.sqrt(d)
    step = n if chunk_size is None or chunk_size <= 0 else chunk_size
    out = torch.empty(rows, heads, n, k.shape[1], dtype=torch.float32, device=q.device)
    for s in range(0, n, step):
        qh = q[:, s : s + step].float().reshape(rows, -1, heads, d).transpose(1, 2)  # [R, H, n', d]
        out[:, :, s : s + step] = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)
    return out


def auxiliary_map_tokens(
    aux_noun_tokens: torch.Tensor, prompt_tokens: torch.Tensor, reading: str
) -> torch.Tensor:
    """Token mask that the auxiliary map m_a sums over, for one of the ``READINGS``.

    The context reading may leave no token (a prompt that is only the concept phrase): then m_a is 0
    everywhere, as the reference's "total minus noun" is. The noun reading needs the noun among the prompt's
    tokens, because an empty noun mask means the masks do not belong to this prompt.
    """
    aux = aux_noun_tokens.bool()
    prompt = prompt_tokens.bool()
    if reading in CONTEXT_READINGS:
        return prompt & ~aux
    if reading == "noun":
        noun = aux & prompt
        if not bool(noun.reshape(-1, noun.shape[-1]).any(dim=-1).all()):
            raise ValueError("the auxiliary noun is not among the auxiliary prompt's tokens (reading 'noun')")
        return noun
    raise ValueError(f"reading must be one of {READINGS}; got {reading!r}")


def _reference_normalization(m: torch.Tensor, tau: float, kappa: float) -> torch.Tensor:
    # kappa * softmax over pixels: the mean of M is kappa / N, so coarse layers protect the concept more.
    return kappa * torch.softmax(tau * m, dim=-1)


def _pixel_count_normalization(m: torch.Tensor, tau: float, kappa: float) -> torch.Tensor:
    # kappa * (N / REFERENCE_PIXELS) * softmax: mean kappa / REFERENCE_PIXELS at every layer and image size,
    # identical to the reference at a 64x64 layer.
    n = m.shape[-1]
    return (kappa * n / REFERENCE_PIXELS) * torch.softmax(tau * m, dim=-1)


NORMALIZATIONS: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "reference": _reference_normalization,
    "pixel_count": _pixel_count_normalization,
}
"""Spatial normalisations of a token map m [..., N] into M.

"reference": M = kappa * softmax_N(tau * m), as the method describes; its scale depends on the layer's
pixel count (kappa / N on average), so the same kappa protects the concept mildly at 64x64 and almost
fully at 16x16 and below.
"pixel_count": M = kappa * (N / 4096) * softmax_N(tau * m), i.e. kappa_rel * N * softmax with
kappa_rel = kappa / 4096; the mean of M is kappa / 4096 at every layer and resolution, and it equals the
reference at a 64x64 layer, so the same kappa means the same thing there.
"""


def _as_token_mask(mask: torch.Tensor, batch: int, tokens: int, name: str) -> torch.Tensor:
    """Broadcast a [T] or [B, T] boolean mask to [B, 1, 1, T] and check its size."""
    mask = mask.bool()
    if mask.dim() == 1:
        mask = mask.unsqueeze(0).expand(batch, -1)
    if mask.dim() != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] != tokens:
        raise ValueError(f"{name} must be [T] or [B, T] with B={batch}, T={tokens}; got {tuple(mask.shape)}")
    return mask.expand(batch, tokens)[:, None, None, :]


def _token_map(
    p: torch.Tensor, prompt_tokens: torch.Tensor, map_tokens: torch.Tensor, tau: float, branch: str
) -> torch.Tensor:
    """m = sum over map tokens of softmax over prompt tokens of tau * P; [B, heads, N]."""
    if p.dim() != 4:
        raise ValueError(f"P of the {branch} branch must be [B, heads, N, T]; got {tuple(p.shape)}")
    b, _, _, t = p.shape
    prompt = _as_token_mask(prompt_tokens, b, t, f"prompt_tokens_{branch[0]}")
    tokens = _as_token_mask(map_tokens, b, t, f"{branch} tokens")
    if not bool(prompt.flatten(1).any(dim=1).all()):
        raise ValueError(
            f"the {branch} branch's prompt mask has no real prompt tokens in some row; "
            "pass a mask that marks the prompt's words (not SOS, EOS or padding)"
        )
    # Renormalise over the real prompt tokens only: SOS soaks up most of the attention and would
    # otherwise flatten the maps.
    logits = (tau * p.float()).masked_fill(~prompt, float("-inf"))
    s = torch.softmax(logits, dim=-1)
    return (s * (tokens & prompt)).sum(dim=-1)


def dbim_weights(
    p_c: torch.Tensor,
    p_a: torch.Tensor | None,
    *,
    concept_tokens: torch.Tensor | Sequence[torch.Tensor],
    aux_tokens: torch.Tensor | None,
    prompt_tokens_c: torch.Tensor,
    prompt_tokens_a: torch.Tensor | None,
    tau: float = 10.0,
    kappa: float = 500.0,
    lam: float = 0.0,
    normalization: str = "reference",
) -> torch.Tensor:
    """Per-head, per-pixel weight w_c of the concept branch's own attention output.

    Where the concept branch looks at its concept tokens, w_c is close to 1 and keeps its output
    (fidelity); elsewhere it falls towards sigmoid(0) = 0.5 or below and lets the auxiliary branch's
    layout and context in (editability). lam pushes w_c down where the auxiliary map is strong.

    Args:
        p_c, p_a: attention probabilities [B, heads, N, T] of the concept and auxiliary conditional rows;
            ``p_a`` may be None when ``lam == 0``, because then the auxiliary map has no effect.
        concept_tokens: [T] or [B, T] mask of the concept phrase's tokens (V* and the class noun); or a
            sequence of such masks, one per concept of the prompt: each concept's map m_c is then normalised on
            its own and M_c is their maximum at each pixel, so every concept is protected as strongly as a lone
            concept would be (pass one mask of all their tokens for the union instead).
        aux_tokens: [T] or [B, T] mask of the tokens the auxiliary map sums over; build it with
            ``auxiliary_map_tokens`` for the chosen reading. Ignored when ``lam == 0``. A row without any
            token gives m_a = 0 there (a uniform M_a).
        prompt_tokens_c, prompt_tokens_a: [T] or [B, T] masks of the real prompt tokens of each branch
            (SOS, EOS and padding excluded).
        tau: temperature of both softmaxes; kappa: scale of the spatial normalisation.
        lam: weight of the auxiliary map, typically in [-2, 2].
        normalization: a key of ``NORMALIZATIONS``.

    Returns:
        w_c [B, heads, N] in float32.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {tuple(NORMALIZATIONS)}; got {normalization!r}")
    normalize = NORMALIZATIONS[normalization]
    if p_c.dim() != 4:
        raise ValueError(f"P of the concept branch must be [B, heads, N, T]; got {tuple(p_c.shape)}")
    b, _, _, t = p_c.shape
    concepts = [concept_tokens] if isinstance(concept_tokens, torch.Tensor) else list(concept_tokens)
    if not concepts:
        raise ValueError("no concept mask given")
    prompt_c = _as_token_mask(prompt_tokens_c, b, t, "prompt_tokens_c")
    logit = None
    for tokens in concepts:
        concept = _as_token_mask(tokens, b, t, "concept_tokens")
        if not bool((concept & prompt_c).flatten(1).any(1).all()):
            raise ValueError(
                "the concept mask is empty (or lies outside the prompt tokens) in some row: the concept phrase "
                "was not found in the concept branch's tokens, so DBIM has nothing to protect"
            )
        m_c = normalize(_token_map(p_c, prompt_tokens_c, tokens, tau, "concept"), tau, kappa)
        logit = m_c if logit is None else torch.maximum(logit, m_c)
    if lam != 0.0:
        if p_a is None or aux_tokens is None or prompt_tokens_a is None:
            raise ValueError("lam != 0 needs p_a, aux_tokens and prompt_tokens_a of the auxiliary branch")
        if p_a.shape[:3] != p_c.shape[:3]:
            raise ValueError(
                f"P of the two branches differ in [B, heads, N]: {tuple(p_c.shape)} vs {tuple(p_a.shape)}"
            )
        m_a = _token_map(p_a, prompt_tokens_a, aux_tokens, tau, "auxiliary")
        logit = logit - lam * normalize(m_a, tau, kappa)
    return torch.sigmoid(logit)


def blend_outputs(o_c: torch.Tensor, o_a: torch.Tensor, w_c: torch.Tensor, heads: int) -> torch.Tensor:
    """O_c <- w_c * O_c + (1 - w_c) * O_a per head and per pixel, before the output projection.

    Written as two products rather than ``lerp`` so that w_c = 1 returns O_c bit for bit and w_c = 0
    returns O_a.

    Args:
        o_c, o_a: attention outputs [B, N, heads * d] of the concept and auxiliary conditional rows.
        w_c: weights [B, heads, N] from ``dbim_weights``.
        heads: number of attention heads.

    Returns:
        The blended concept output [B, N, heads * d] in o_c's dtype.
    """
    if o_c.shape != o_a.shape or o_c.dim() != 3:
        raise ValueError(
            f"o_c and o_a must both be [B, N, heads*d]; got {tuple(o_c.shape)} and {tuple(o_a.shape)}"
        )
    b, n, inner = o_c.shape
    if heads < 1 or inner % heads != 0:
        raise ValueError(f"inner dimension {inner} is not divisible by heads={heads}")
    if w_c.shape != (b, heads, n):
        raise ValueError(f"w_c must be [B, heads, N] = {(b, heads, n)}; got {tuple(w_c.shape)}")
    w = w_c.transpose(1, 2).unsqueeze(-1).to(o_c.dtype)  # [B, N, H, 1]
    oc = o_c.reshape(b, n, heads, inner // heads)
    oa = o_a.reshape(b, n, heads, inner // heads)
    return (w * oc + (1 - w) * oa).reshape(b, n, inner)


PIXEL_CHUNK_VALUES = 1 << 20
"""Float32 values of logits per pixel chunk in ``token_maps`` (4 MB): rows * heads * chunk * T stays under it."""


@dataclass(frozen=True)
class TokenPlan:
    """A run's token masks as index tensors, checked once (``DBIMSettings.plan``), for ``weights_qk``.

    ``prompt_c`` / ``prompt_a``: the indices of the real prompt tokens of each branch in the context;
    ``concepts`` / ``aux``: positions *within those indices* of the tokens each map sums over (``aux`` may be
    empty: m_a = 0; None when lam == 0).
    """

    prompt_c: torch.Tensor
    concepts: tuple[torch.Tensor, ...]
    prompt_a: torch.Tensor | None = None
    aux: torch.Tensor | None = None


def _positions(prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Positions within ``prompt``'s indices of the tokens in ``tokens & prompt`` (both [T] bool)."""
    return (torch.cumsum(prompt.long(), 0) - 1)[tokens & prompt]


def token_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    prompt: torch.Tensor,
    groups: Sequence[torch.Tensor],
    tau: float,
    chunk_size: int | None = None,
) -> list[torch.Tensor]:
    """m = sum over a group of softmax over the prompt tokens of tau * P, without materialising P.

    The same maps as ``attention_probs`` followed by ``_token_map``, computed one pixel chunk at a time: the
    logits of a chunk, their softmax over all T tokens (P), P's prompt columns, their tau-softmax (S) and
    S's sum over each group. Memory is bounded by the chunk (``PIXEL_CHUNK_VALUES`` by default), and the
    sharpening softmax runs over the L prompt tokens instead of all T. Results agree with the two-step
    computation to float32 rounding (sums over L instead of T values with zeros).

    Args:
        q: projected queries [R, N, heads * d]; k: projected keys [R, T, heads * d].
        prompt: [L] long indices of the real prompt tokens; groups: [G_i] long positions within ``prompt``.

    Returns:
        One float32 map [R, heads, N] per group.
    """
    rows, n, inner = q.shape
    t = k.shape[1]
    d = inner // heads
    kt = k.float().reshape(rows, t, heads, d).permute(0, 2, 3, 1)  # [R, H, d, T]
    if chunk_size is None or chunk_size <= 0:
        chunk_size = max(1, PIXEL_CHUNK_VALUES // max(1, rows * heads * t))
    maps = [torch.empty(rows, heads, n, dtype=torch.float32, device=q.device) for _ in groups]
    scale = 1.0 / math.sqrt(d)
    for s in range(0, n, chunk_size):
        qh = q[:, s : s + chunk_size].float().reshape(rows, -1, heads, d).transpose(1, 2)  # [R, H, n', d]
        p = torch.softmax(torch.matmul(qh, kt).mul_(scale), dim=-1)
        sharp = torch.softmax(p.index_select(-1, prompt).mul_(tau), dim=-1)  # [R, H, n', L]
        for m, group in zip(maps, groups, strict=True):
            m[:, :, s : s + chunk_size] = sharp.index_select(-1, group).sum(dim=-1)
    return maps


@dataclass(frozen=True)
class DBIMSettings:
    """The DBIM hyper-parameters, validated once so that a bad value fails before sampling starts."""

    tau: float = 10.0
    kappa: float = 500.0
    lam: float = 0.0
    reading: str = "reference"
    normalization: str = "reference"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a finite number > 0 (reference 10); got {self.tau}")
        if not (math.isfinite(self.kappa) and self.kappa > 0):
            raise ValueError(f"kappa must be a finite number > 0 (reference 500); got {self.kappa}")
        if not math.isfinite(self.lam):
            raise ValueError(f"lam must be a finite number (typically -2 to 2, reference 0); got {self.lam}")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}; got {self.reading!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {tuple(NORMALIZATIONS)}; got {self.normalization!r}"
            )

    def weights(
        self,
        p_c: torch.Tensor,
        p_a: torch.Tensor | None,
        *,
        concept_tokens: torch.Tensor | Sequence[torch.Tensor],
        aux_noun_tokens: torch.Tensor | None,
        prompt_tokens_c: torch.Tensor,
        prompt_tokens_a: torch.Tensor | None,
    ) -> torch.Tensor:
        """``dbim_weights`` with these settings; builds the auxiliary-map mask for ``reading``."""
        aux = None
        if self.lam != 0.0 and aux_noun_tokens is not None and prompt_tokens_a is not None:
            aux = auxiliary_map_tokens(aux_noun_tokens, prompt_tokens_a, self.reading)
        return dbim_weights(
            p_c,
            p_a,
            concept_tokens=concept_tokens,
            aux_tokens=aux,
            prompt_tokens_c=prompt_tokens_c,
            prompt_tokens_a=prompt_tokens_a,
            tau=self.tau,
            kappa=self.kappa,
            lam=self.lam,
            normalization=self.normalization,
        )

    def plan(
        self,
        *,
        concept_tokens: torch.Tensor | Sequence[torch.Tensor],
        aux_noun_tokens: torch.Tensor | None,
        prompt_tokens_c: torch.Tensor,
        prompt_tokens_a: torch.Tensor | None,
    ) -> TokenPlan:
        """The [T] masks of a run as a ``TokenPlan`` for ``weights_qk``, with ``dbim_weights``'s checks."""
        concepts = [concept_tokens] if isinstance(concept_tokens, torch.Tensor) else list(concept_tokens)
        masks = [*concepts, prompt_tokens_c] + ([] if prompt_tokens_a is None else [prompt_tokens_a])
        if not concepts or any(m.dim() != 1 or m.shape != prompt_tokens_c.shape for m in masks):
            raise ValueError("a token plan needs [T] masks of one context length, and at least one concept mask")
        prompt_c = prompt_tokens_c.bool()
        if not bool(prompt_c.any()):
            raise ValueError("the concept branch's prompt mask has no real prompt tokens; pass a mask that marks "
                             "the prompt's words (not SOS, EOS or padding)")
        positions = tuple(_positions(prompt_c, c.bool()) for c in concepts)
        if any(p.numel() == 0 for p in positions):
            raise ValueError(
                "the concept mask is empty (or lies outside the prompt tokens) in some row: the concept phrase "
                "was not found in the concept branch's tokens, so DBIM has nothing to protect"
            )
        prompt_a = aux = None
        if self.lam != 0.0:
            if aux_noun_tokens is None or prompt_tokens_a is None:
                raise ValueError("lam != 0 needs aux_tokens and prompt_tokens_a of the auxiliary branch")
            pa = prompt_tokens_a.bool()
            if not bool(pa.any()):
                raise ValueError("the auxiliary branch's prompt mask has no real prompt tokens; pass a mask "
                                 "that marks the prompt's words (not SOS, EOS or padding)")
            aux = _positions(pa, auxiliary_map_tokens(aux_noun_tokens, pa, self.reading))
            prompt_a = pa.nonzero().flatten()
        return TokenPlan(prompt_c.nonzero().flatten(), positions, prompt_a, aux)

    def weights_qk(
        self,
        q_c: torch.Tensor,
        k_c: torch.Tensor,
        q_a: torch.Tensor | None,
        k_a: torch.Tensor | None,
        heads: int,
        plan: TokenPlan,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """``weights`` from the projected q [B, N, heads*d] and k [B, T, heads*d] of the two conditional rows,
        chunk-wise (``token_maps``), so that P is never held whole; q_a and k_a are only read when lam != 0."""
        normalize = NORMALIZATIONS[self.normalization]
        logit = None
        for m in token_maps(q_c, k_c, heads, plan.prompt_c, plan.concepts, self.tau, chunk_size):
            m_c = normalize(m, self.tau, self.kappa)
            logit = m_c if logit is None else torch.maximum(logit, m_c)
        if self.lam != 0.0:
            if q_a is None or k_a is None or plan.aux is None:
                raise ValueError("lam != 0 needs the auxiliary rows' q and k and a plan made with lam != 0")
            (m_a,) = token_maps(q_a, k_a, heads, plan.prompt_a, [plan.aux], self.tau, chunk_size)
            logit = logit - self.lam * normalize(m_a, self.tau, self.kappa)
        return torch.sigmoid(logit)
