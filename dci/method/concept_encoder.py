"""The concept encoder: 1-N images of one object → the k token embeddings its trigger word stands for.

A zero-fine-tuning encoder in the manner of Taming Encoder (arXiv 2304.02642), small enough for a CPU: a
convolutional trunk (a patch stem, then stride-2 residual stages) reads each image into a grid of feature vectors (with a learned position embedding per
cell), and k learned queries attend over the cells of *all* the images at once, so any number of images of
the same object pools into one answer. Each query's result is projected into the text encoder's
input-embedding space and added to an anchor row (the mean vocabulary row the encoder was trained against),
so the output sits where word embeddings live. The rows go into a concept exactly like trained modifier
tokens (``token.<encoder>`` of a concept file).

Plain torch: no ComfyUI, no files. ``dci.files.concept_encoder`` reads and writes the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    """The architecture; stored in the weights file so the file alone rebuilds the module."""

    width: int = 64  # the text encoder's input-embedding width
    num_tokens: int = 2  # k: rows the trigger word stands for
    image_size: int = 128  # images are read at this size (square)
    patch: int = 4  # the stem reads patch × patch pixels per cell (stride = patch)
    channels: tuple[int, ...] = (32, 64, 96)  # the stem's width, then one stride-2 stage each
    dim: int = 128  # feature and query width
    heads: int = 4
    layers: int = 2  # query cross-attention blocks

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown concept-encoder settings {unknown}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(int(c) for c in d["channels"])
        return cls(**d)

    @property
    def grid(self) -> int:
        """Cells per side of the feature grid."""
        return self.image_size // self.patch // 2 ** (len(self.channels) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if c % 8 == 0 else 1, c)


class _Stage(nn.Module):
    """conv 3×3 stride 2, then a residual conv 3×3 pair."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.n1, self.c1 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))


class _QueryBlock(nn.Module):
    """Queries attend over the image cells, then an MLP (pre-norm residuals)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.nq, self.nk = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.nm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        k = self.nk(kv)
        q = q + self.attn(self.nq(q), k, k, key_padding_mask=mask, need_weights=False)[0]
        return q + self.mlp(self.nm(q))


class ConceptEncoder(nn.Module):
    """``images [B, N, 3, S, S]`` (0..1; S = ``config.image_size``) → token rows ``[B, k, width]``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        chans = config.channels
        self.stem = nn.Conv2d(3, chans[0], config.patch, stride=config.patch)
        self.stages = nn.ModuleList(_Stage(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.proj = nn.Conv2d(chans[-1], config.dim, 1)
        self.pos = nn.Parameter(torch.randn(1, config.grid * config.grid, config.dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(config.num_tokens, config.dim) * 0.02)
        self.blocks = nn.ModuleList(_QueryBlock(config.dim, config.heads) for _ in range(config.layers))
        self.out_norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.width)
        self.register_buffer("anchor", torch.zeros(config.width))

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """``[M, 3, S, S]`` → ``[M, cells, dim]`` feature vectors with position embeddings."""
        x = self.stem(images * 2.0 - 1.0)
        for stage in self.stages:
            x = stage(x)
        x = self.proj(F.silu(x))
        return x.flatten(2).transpose(1, 2) + self.pos

    def forward(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid [B, N]`` (bool) marks real images when the sets have different sizes (padding = False)."""
        b, n = images.shape[:2]
        size = self.config.image_size
        if images.shape[2:] != (3, size, size):
            raise ValueError(f"the concept encoder reads [B, N, 3, {size}, {size}] images, got {tuple(images.shape)}")
        feats = self.cells(images.reshape(b * n, 3, size, size))
        feats = feats.reshape(b, n * feats.shape[1], -1)
        mask = None
        if valid is not None:
            mask = ~valid.bool().repeat_interleave(self.config.grid * self.config.grid, dim=1)
        q = self.queries.unsqueeze(0).expand(b, -1, -1)
        for block in self.blocks:
            q = block(q, feats, mask)
        return self.anchor + self.out(self.out_norm(q))


def prepare_images(images: torch.Tensor, size: int) -> tuple[torch.Tensor, str]:
    """A ComfyUI IMAGE batch ``[N, H, W, C]`` → ``[1, N, 3, size, size]`` and a note of what was done.

    The rule: a non-square image is centre-cropped to a square (its shorter side), then every image is
    resized to ``size`` × ``size`` (area averaging when shrinking, bilinear when enlarging); alpha is dropped.
    """
    if images.dim() != 4 or images.shape[0] < 1 or images.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE batch [N, H, W, 3] with at least one image, got {tuple(images.shape)}")
    x = images[..., :3].float().movedim(-1, 1)
    h, w = x.shape[-2:]
    notes = []
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top:top + s, left:left + s]
        notes.append(f"centre-cropped {w}×{h} to {s}×{s}")
    s = x.shape[-1]
    if s != size:
        mode = "area" if s > size else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
        notes.append(f"resized {s}×{s} to {size}×{size}")
    return x.clamp(0, 1).unsqueeze(0), "; ".join(notes)
