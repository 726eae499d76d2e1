"""What a training run is asked to do: the settings, their defaults and their limits, in one place.

``DEFAULTS`` and ``LIMITS`` are what DCI Train Concept shows as widget defaults and ranges, and what ``check``
enforces for any caller, so the node and the trainer can't disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ...files.concept import ConceptFileError, check_trigger
from ...method import ico

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # training precision → autocast dtype
TRAINABLE_FAMILIES = ("sd1", "sd2", "sdxl")
WEIGHT_DECAY = 1e-2  # AdamW's default, applied to the trained tensors only (the deltas: a pull towards the base)
# infusion: the residual vectors learn at learning_rate × batch × this, so the default 1e-5 gives 0.01, the rate
# of the official Infusion code's vectors (this project's reconstruction of a comparable setting)
RESIDUAL_LR_SCALE = 1000.0

# Inclusive ranges; WHOLE_NUMBERS are integers, the rest are rates.
LIMITS: dict[str, tuple[float, float]] = {
    "num_tokens": (1, ico.MAX_MODIFIER_TOKENS),
    "steps": (1, 100_000),
    "batch_size": (1, 64),
    "resolution": (64, 2048),
    "checkpoint_every": (0, 100_000),
    "learning_rate": (1e-8, 1e-2),
    "context_lr_multiplier": (0.01, 1000.0),
}
WHOLE_NUMBERS = ("num_tokens", "steps", "batch_size", "resolution", "checkpoint_every")
RESOLUTION_STEP = 64


class TrainingError(ValueError):
    """Training can't start or can't go on; the message says why and what to change."""


@dataclass
class TrainSettings:
    """Everything that decides what a run computes (``resume_key``) plus how it reports and saves."""

    class_noun: str
    trigger: str
    num_tokens: int = 2
    mode: str = "ico"
    prefix: str = "photo of a"
    suffix: str = "."
    steps: int = 500
    batch_size: int = 1
    learning_rate: float = 1e-5
    context_lr_multiplier: float = 10.0
    resolution: int = 512
    seed: int = 0
    precision: str = "fp32"
    random_flip: bool = True
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    reg_captions: list[str] = field(default_factory=list)
    unlock_keys: bool = False  # infusion: also a residual vector on the key projection (the official fast path)
    # joint training: the further concepts, {"trigger", "class_noun", "images"} each, whose images follow the first
    # concept's in the image batch, in this order
    more_concepts: list[dict] = field(default_factory=list)

    def resume_key(self) -> dict:
        """Settings a resumed run must share with the run it continues (steps may grow)."""
        d = asdict(self)
        for k in ("steps", "gradient_checkpointing", "checkpoint_every"):
            d.pop(k)
        if self.mode != "infusion":
            d.pop("unlock_keys")  # only infusion reads it (and states saved before it existed lack it)
        if not self.more_concepts:
            d.pop("more_concepts")  # states saved before joint training existed lack it
        return d

    def check(self) -> None:
        for name, (lo, hi) in LIMITS.items():
            value = getattr(self, name)
            if name in WHOLE_NUMBERS:
                if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                    raise TrainingError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
            elif not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
                raise TrainingError(f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}")
        if self.resolution % RESOLUTION_STEP:
            raise TrainingError(f"resolution must be a multiple of {RESOLUTION_STEP}, got {self.resolution}")
        if self.mode not in ico.MODES:
            raise TrainingError(f"mode must be one of {', '.join(ico.MODES)}, got {self.mode!r}")
        if not isinstance(self.unlock_keys, bool):
            raise TrainingError(f"unlock_keys must be true or false, got {self.unlock_keys!r}")
        if self.precision not in AUTOCAST:
            raise TrainingError(f"precision must be one of {', '.join(AUTOCAST)}, got {self.precision!r}")
        if not self.class_noun.strip():
            raise TrainingError("the class noun is empty: name what the concept is, e.g. 'dog' or 'mug'")
        try:
            check_trigger(self.trigger)
            for c in self.more_concepts:
                check_trigger(c["trigger"])
        except ConceptFileError as e:
            raise TrainingError(str(e)) from None
        words = [self.trigger.lower()] + [c["trigger"].lower() for c in self.more_concepts]
        if len(set(words)) != len(words):
            raise TrainingError("every concept of a joint training run needs its own trigger word")
        if self.more_concepts and self.mode == "infusion":
            raise TrainingError("joint training of several concepts supports the ico and custom_diffusion modes")
        for c in self.more_concepts:
            if not c["class_noun"].strip():
                raise TrainingError(f"the class noun of the concept {c['trigger']!r} is empty")
            if not isinstance(c["images"], int) or c["images"] < 1:
                raise TrainingError(f"the concept {c['trigger']!r} has no images")


DEFAULTS = TrainSettings(class_noun="dog", trigger="qxz")
"""The node's defaults (the class noun and trigger word are examples; every other value is the trainer's)."""
