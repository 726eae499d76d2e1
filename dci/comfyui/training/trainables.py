"""The tensors a training run trains, named as the optimizer, the training state and the concept file name them.

Token rows are keyed ``<encoder>`` for the first concept and ``<encoder>.<j>`` for the j-th further concept of
a joint run (the concept file's ``token.`` keys without the prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def token_key(encoder: str, concept: int) -> str:
    return encoder if concept == 0 else f"{encoder}.{concept}"


@dataclass
class Trainables:
    """The trained tensors, in the order the optimizer and the training state name them."""

    deltas: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]  # token_key(encoder, concept) → [k, width]
    token_init: dict[str, torch.Tensor]
    contexts: dict[str, torch.Tensor]  # "<encoder>.prefix" / "<encoder>.suffix" → [images, n, width]
    residuals: dict[str, torch.Tensor]  # infusion: one vector per attn2 to_v (and to_k when unlocked)
    train_tokens: bool = True

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """Runs of one encoder and one concept keep the names of their training states without the encoder
        ("token", "context.prefix"), so states saved before SDXL and joint training existed still resume."""
        single = len(self.tokens) == 1
        named = [(f"kv_delta.{k}", v) for k, v in self.deltas.items()]
        if self.train_tokens:
            named += [("token" if single else f"token.{k}", v) for k, v in sorted(self.tokens.items())]
        named += [(f"residual.{k}", v) for k, v in sorted(self.residuals.items())]
        return named + [(f"context.{k.partition('.')[2] if single else k}", v) for k, v in sorted(self.contexts.items())]

    def names(self) -> list[str]:
        return [n for n, _ in self.named()]

    def token_rows(self, concept: int, initial: bool = False) -> dict[str, torch.Tensor]:
        """One concept's token rows (or the rows they started from) per encoder, detached fp32 CPU copies."""
        source = self.token_init if initial else self.tokens
        return {k.partition(".")[0]: v.detach().float().cpu().clone() for k, v in source.items()
                if k == token_key(k.partition(".")[0], concept)}

    def load_tokens(self, concept, device) -> None:
        """Token rows (and their starting rows) from a saved concept file, for resuming."""
        for key in self.tokens:
            enc, _, j = key.partition(".")
            saved = concept if not j else concept.more[int(j) - 1]
            self.tokens[key] = saved.tokens[enc].float().to(device)
            self.token_init[key] = saved.token_init.get(enc, self.token_init[key])
