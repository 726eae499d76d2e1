"""Stage 3 of the toy model's training: the text encoder learns to read the captions' attributes.

Linear heads on the encoder's end-of-text and padding outputs (the tokens the UNet's cross-attention mostly
looks at) classify every attribute a caption can name, each with a "not said" class. Trained jointly from
scratch without them, the first toy model's encoder barely told "left" from "right" (a 0.7 difference on
7.8-norm token vectors, against 4-12 for a colour word), so the UNet had nothing to place objects by and,
having no use for the words, sent no gradient that would separate them. The heads are not in the model file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .train_io import load_st, log, save_atomic


class CaptionTokens:
    """Caches token ids of captions: the Python BPE tokenizer is slow and captions repeat a lot."""

    def __init__(self, clip):
        self.clip = clip
        self.cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            pairs = self.clip.tokenize(text)["l"][0]
            self.cache[text] = [int(t) for t, _ in pairs]
        return self.cache[text]


# The attributes a caption can name and their classes; class 0 of each head is "the caption doesn't say".
def attribute_classes() -> dict[str, tuple[str, ...]]:
    from dci.toyworld import render as r

    return {
        "shape": r.SHAPES,
        "colour": r.COLOURS,
        "size": r.SIZES,
        "pattern": r.PATTERNS[1:],
        "pattern_colour": r.COLOURS,
        "emblem": r.EMBLEM_SHAPES,
        "emblem_colour": r.COLOURS,
        "position": r.POSITIONS,
        "background": r.COLOURS,
        "texture": ("gradient", "grid"),
    }


def caption_labels(text: str) -> list[int]:
    """One class index per attribute (``attribute_classes`` order), 0 where the caption says nothing."""
    from dci.toyworld.render import parse_caption

    asked = parse_caption(text)
    return [0 if asked[k] is None else 1 + names.index(asked[k]) for k, names in attribute_classes().items()]


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of every attribute from the text encoder's output tokens (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = [len(v) + 1 for v in attribute_classes().values()]
        self.proj = torch.nn.Linear(hidden, sum(self.sizes))

    def loss(self, ctx: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over attributes, on the end-of-text token and the padding after it."""
        eos = (ids == 49407).int().argmax(dim=1)  # the SD1 tokenizer pads with end-of-text
        keep = torch.arange(ids.shape[1], device=ids.device)[None, :] >= eos[:, None]  # [B, T]
        logits = self.proj(ctx[keep])  # [N, C]
        target = labels[:, None, :].expand(-1, ids.shape[1], -1)[keep]  # [N, A]
        parts = torch.split(logits, self.sizes, dim=1)
        return torch.stack(
            [torch.nn.functional.cross_entropy(part, target[:, i]) for i, part in enumerate(parts)]
        ).mean()

    def accuracy(self, ctx: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """Per-attribute accuracy read at the end-of-text token."""
        eos = (ids == 49407).int().argmax(dim=1)
        logits = self.proj(ctx[torch.arange(len(ids), device=ids.device), eos])
        parts = torch.split(logits, self.sizes, dim=1)
        return [(part.argmax(1) == labels[:, i]).float().mean().item() for i, part in enumerate(parts)]


def caption_batch(specs, rng, tokens: CaptionTokens, batch: int, dropout: float):
    """Token ids [B,77] and attribute labels [B,A] of ``batch`` random captions (empty ones at ``dropout``)."""
    from dci.toyworld.render import caption

    idx = rng.integers(0, len(specs), batch)
    texts = ["" if rng.random() < dropout else caption(specs[i], rng) for i in idx]
    ids = torch.tensor([tokens(t) for t in texts])
    labels = torch.tensor([caption_labels(t) for t in texts])
    return idx, ids, labels


def encode(encoder, ids: torch.Tensor) -> torch.Tensor:
    """Token ids [B,77] → the text encoder's output [B,77,H], with gradients (the trainer's CLIP forward)."""
    from dci.comfyui.training.text_encoder import text_forward

    return text_forward(encoder, encoder.transformer.get_input_embeddings()(ids))


def pretrain_text(specs, encoder, heads: AttributeHeads, tokens: CaptionTokens, args, work: Path) -> None:
    """Stage 3: the text encoder (``clip.cond_stage_model.clip_l``) and the heads alone, on captions only."""
    te = encoder.transformer
    path = work / "text.safetensors"
    if path.exists():
        sd, _ = load_st(path)
        te.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("text.")})
        heads.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("heads.")})
        log(f"text encoder: resumed from {path}")
        return
    if args.text_steps <= 0:
        return
    params = list(te.parameters()) + list(heads.parameters())
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=args.text_lr, weight_decay=0.01)
    t0 = time.time()
    for step in range(args.text_steps):
        rng = np.random.default_rng([args.seed, 3, step])
        _, ids, labels = caption_batch(specs, rng, tokens, 256, args.caption_dropout)
        ids, labels = ids.to(device), labels.to(device)
        for grp in opt.param_groups:
            grp["lr"] = args.text_lr * min(1.0, (step + 1) / 20)
        ctx = encode(encoder, ids)
        loss = heads.loss(ctx, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.text_steps:
            with torch.no_grad():
                acc = heads.accuracy(ctx, ids, labels)
            names = list(attribute_classes())
            log(
                f"text step {step + 1}/{args.text_steps} loss {loss.item():.4f} "
                f"{(time.time() - t0) / (step + 1):.3f}s/step accuracy "
                + " ".join(f"{n} {a:.2f}" for n, a in zip(names, acc, strict=True))
            )
    tensors = {"text." + k: v for k, v in te.state_dict().items()}
    tensors.update({"heads." + k: v for k, v in heads.state_dict().items()})
    save_atomic(tensors, path, {"steps": str(args.text_steps)})
