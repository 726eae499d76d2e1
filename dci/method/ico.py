"""ICO captions and training randomness, in plain torch (no ComfyUI import).

ICO (Image-specific Context Optimization) captions concept image i as
``[SOS] P_i V* <class noun> S_i [EOS, pad...]``: ``P_i`` and ``S_i`` are learnable vectors in the text
encoder's *input-embedding* space, ``V*`` are the k learnable modifier-token rows, everything else is a
token id of the frozen vocabulary. Custom Diffusion, the baseline, is the same caption with fixed words as
prefix (by default "photo of a"; the trainer's ``prefix_context``, as the official code's instance prompt) and
no suffix.

The caption is assembled here, in token-embedding space, as a list of *entries* (a token id or one learned
row per position). Position embeddings are added only afterwards, by the text encoder, to the assembled
sequence, so every slot gets the position embedding of the slot it ends up in, whatever the context lengths.
Context lengths are counted in BPE tokens of the words they start from.

Training randomness (which images, flips, timesteps, noise) is drawn from a generator seeded by
``(seed, step)``, so a run resumed at step s draws exactly what an uninterrupted run draws at step s.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_spans import SpecialTokens

MODES = ("ico", "custom_diffusion", "infusion")  # new modes go at the end: saved workflows store the choice
CUSTOM_DIFFUSION_PREFIX = "photo of a"
RARE_TOKEN_WORDS = ("pll", "ucd", "olis")  # single, rarely used CLIP BPE tokens: starting rows for V*
CONTEXT_INIT_STD = 0.02
MAX_MODIFIER_TOKENS = 3


class CaptionError(ValueError):
    """A caption can't be built (too long, empty class noun, bad context specification)."""


# -- contexts ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContextSpec:
    """How one context (prefix or suffix) starts: from the embeddings of ``words``, or ``length`` random rows."""

    words: str = ""
    length: int = 0

    @property
    def from_words(self) -> bool:
        return bool(self.words)


def parse_context_spec(text: str) -> ContextSpec:
    """``"photo of a"`` → start from those words; ``"4"`` → 4 random rows; ``""`` → no context."""
    text = (text or "").strip()
    if not text:
        return ContextSpec()
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n > 60:
            raise CaptionError(f"a context of {n} tokens does not fit a 77-token caption")
        return ContextSpec(length=n)
    return ContextSpec(words=text)


def init_contexts(num_images: int, width: int, rows: torch.Tensor | None = None, length: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image contexts ``[images, n, width]``: copies of ``rows`` (word embeddings), or N(0, 0.02²)."""
    if rows is not None:
        if rows.dim() != 2 or rows.shape[1] != width:
            raise CaptionError(f"context rows must be [n, {width}], got {tuple(rows.shape)}")
        return rows.detach().float().cpu().unsqueeze(0).repeat(num_images, 1, 1).contiguous()
    return torch.randn(num_images, length, width, generator=generator) * CONTEXT_INIT_STD


# -- captions ---------------------------------------------------------------------------------------------------
def caption_entries(special: SpecialTokens, prefix: torch.Tensor | Sequence, modifier: torch.Tensor,
                    class_entries: Sequence, suffix: torch.Tensor | Sequence) -> list:
    """``[SOS] prefix V* class suffix [EOS] [pad...]`` as entries (ids or rows), exactly ``special.length`` long.

    ``prefix``/``suffix`` are ``[n, width]`` tensors (learned rows) or sequences of entries (fixed words);
    ``modifier`` is ``[k, width]``.
    """
    if len(class_entries) == 0:
        raise CaptionError("the class noun gives no tokens")
    body = [*_rows(prefix), *_rows(modifier), *class_entries, *_rows(suffix)]
    used = len(body) + 2
    if used > special.length:
        raise CaptionError(f"the caption needs {used} tokens (prefix, trigger, class noun, suffix and the start "
                           f"and end tokens); the text encoder takes {special.length}: shorten the contexts")
    return [special.start, *body, special.end] + [special.pad] * (special.length - used)


def _rows(x) -> list:
    if isinstance(x, torch.Tensor):
        return list(x.unbind(0)) if x.numel() else []
    return list(x)


def embed_entries(entries_batch: Sequence[Sequence], token_embedding: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device | None = None) -> torch.Tensor:
    """Assemble captions in token-embedding space: ``[batch, length, width]`` (no position embeddings yet).

    Ids are looked up in the (frozen) vocabulary with one call; learned rows are placed as they are, so the
    result is differentiable with respect to them and only them.
    """
    ids = [e for entries in entries_batch for e in entries if not isinstance(e, torch.Tensor)]
    table = token_embedding(torch.tensor(ids, dtype=torch.long, device=device)).float() if ids else None
    out, next_id = [], 0
    for entries in entries_batch:
        rows = []
        for e in entries:
            if isinstance(e, torch.Tensor):
                rows.append(e.to(device=device, dtype=torch.float32).reshape(-1))
            else:
                rows.append(table[next_id])
                next_id += 1
        out.append(torch.stack(rows))
    return torch.stack(out)


def add_position_embeddings(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """What CLIP's text model does to its input embeddings: slot j gets position embedding j."""
    return embeds + positions[: embeds.shape[-2]].to(embeds)


def detach_start_rows(x: torch.Tensor, chunk: int = 77) -> torch.Tensor:
    """``x [batch, tokens, features]`` with the start-of-text rows (every ``chunk``-th) cut from the graph.

    Applied to the projected cross-attention keys and values: the start token's K/V rows then give no
    gradient to the K/V weights. Values are unchanged.
    """
    mask = torch.zeros(x.shape[-2], 1, dtype=torch.bool, device=x.device)
    mask[::chunk] = True
    return torch.where(mask, x.detach(), x)


# -- images -----------------------------------------------------------------------------------------------------
def square_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` → ``[B, size, size, 3]``: centre-cropped to a square, then resized."""
    if images.dim() != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}")
    x = images[..., :3].float().movedim(-1, 1)
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top:top + side, left:left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).movedim(1, -1).contiguous()


def collect_images(items: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """A list of IMAGE batches of any sizes (e.g. one image per file of a folder) → one ``[N, size, size, 3]``
    batch, in list order, each image centre-cropped to a square and resized (``square_images``)."""
    if not items:
        raise ValueError("no images")
    return torch.cat([square_images(x, size) for x in items])


def collect_masks(items: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """A list of MASK batches ``[B, H, W]`` (or one ``[H, W]``) → ``[N, size, size]``, each centre-cropped and
    resized exactly as its image is (``square_images``), values clamped to 0..1."""
    if not items:
        raise ValueError("no masks")
    out = []
    for m in items:
        m = m.unsqueeze(0) if m.dim() == 2 else m
        if m.dim() != 3:
            raise ValueError(f"expected a MASK [B, H, W], got shape {tuple(m.shape)}")
        out.append(square_images(m.float().unsqueeze(-1).expand(*m.shape, 3), size)[..., 0])
    return torch.cat(out)


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().float().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# -- randomness -------------------------------------------------------------------------------------------------
def sub_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step; depends only on (seed, step)."""
    return torch.Generator().manual_seed(sub_seed("step", seed, step))


def epoch_indices(seed: int, stream: str, count: int, start: int, n: int) -> list[int]:
    """Items ``start … start+n-1`` of an endless stream that visits all ``count`` items once per epoch in a
    seeded random order (every image is seen equally often, whatever the batch size)."""
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for p in range(start, start + n):
        epoch, pos = divmod(p, count)
        if epoch not in perms:
            g = torch.Generator().manual_seed(sub_seed(stream, seed, epoch))
            perms[epoch] = torch.randperm(count, generator=g).tolist()
        out.append(perms[epoch][pos])
    return out


@dataclass(frozen=True)
class StepDraw:
    concept: list[int]
    concept_flip: list[bool]
    reg: list[int]
    reg_flip: list[bool]
    timesteps: torch.Tensor  # [concept + reg] integer timesteps
    generator: torch.Generator  # continues the step's stream: draw the noise from it


def draw_step(seed: int, step: int, batch_size: int, num_concept: int, num_reg: int, num_timesteps: int,
              flip: bool) -> StepDraw:
    """Everything random about step ``step``: concept and regularisation images, flips, timesteps."""
    g = step_generator(seed, step)
    concept = epoch_indices(seed, "concept", num_concept, step * batch_size, batch_size)
    reg = epoch_indices(seed, "reg", num_reg, step * batch_size, batch_size) if num_reg else []
    n = len(concept) + len(reg)
    flips = (torch.rand(n, generator=g) < 0.5).tolist() if flip else [False] * n
    t = torch.randint(0, num_timesteps, (n,), generator=g)
    return StepDraw(concept, flips[: len(concept)], reg, flips[len(concept):], t, g)


def modifier_positions(num_prefix: int, num_tokens: int) -> list[int]:
    """Where the k modifier tokens sit in a caption built by ``caption_entries`` (after the start token and
    the prefix)."""
    return list(range(1 + num_prefix, 1 + num_prefix + num_tokens))


def effective_learning_rates(learning_rate: float, batch_size: int, context_multiplier: float) -> tuple[float, float]:
    """(K/V and token lr, context lr): the per-image rate scaled by the batch, as the reference does."""
    lr = learning_rate * batch_size
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError("the learning rate must be a positive number")
    return lr, lr * context_multiplier
