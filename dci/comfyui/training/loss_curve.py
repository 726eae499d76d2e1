"""The trainer's loss curve as a ComfyUI IMAGE (the DCI Train Concept node's fourth output), with labelled
axes: the training step along x, the loss (mean squared error of the UNet's prediction) along y."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

X_LABEL = "training step"
Y_LABEL = "loss (MSE)"
LIGHT, DARK = (150, 180, 230), (20, 60, 200)


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256, first_step: int = 1) -> torch.Tensor:
    """An IMAGE ``[1, H, W, 3]`` of the loss per step and its running mean."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 8, 22, height - 34
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    draw.text((4, 4), Y_LABEL, fill="black")
    draw.text(((left + right) // 2 - 6 * len(X_LABEL) // 2, height - 14), X_LABEL, fill="black")
    values = [v for v in losses if math.isfinite(v)]
    if values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (v - lo) / span

        draw.line([xy(i, v) for i, v in enumerate(losses)] if len(losses) > 1 else [xy(0, losses[0])] * 2,
                  fill=LIGHT, width=1)
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        draw.line([xy(i, v) for i, v in enumerate(smooth)] if len(smooth) > 1 else [xy(0, smooth[0])] * 2,
                  fill=DARK, width=2)
        for v in (hi, (hi + lo) / 2, lo):  # y ticks
            y = xy(0, v)[1]
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((4, y - 5), f"{v:.3g}", fill="black")
        for i in sorted({0, (len(losses) - 1) // 2, len(losses) - 1}):  # x ticks
            x = xy(i, lo)[0]
            draw.line([x, bottom, x, bottom + 4], fill="black")
            label = str(first_step + i)
            draw.text((min(x - 3 * len(label), right - 6 * len(label)), bottom + 6), label, fill="black")
        draw.line([right - 150, 11, right - 138, 11], fill=LIGHT, width=2)
        draw.text((right - 134, 5), "per step", fill="black")
        draw.line([right - 80, 11, right - 68, 11], fill=DARK, width=2)
        draw.text((right - 64, 5), f"mean/{window}", fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
