"""The trainer's loss curve as a ComfyUI IMAGE (the DCI Train Concept node's fourth output)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """An IMAGE ``[1, H, W, 3]`` of the loss per step and its running mean."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 8, 8, height - 20
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    values = [v for v in losses if math.isfinite(v)]
    if values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (v - lo) / span

        draw.line([xy(i, v) for i, v in enumerate(losses)] if len(losses) > 1 else [xy(0, losses[0])] * 2,
                  fill=(150, 180, 230), width=1)
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        draw.line([xy(i, v) for i, v in enumerate(smooth)] if len(smooth) > 1 else [xy(0, smooth[0])] * 2,
                  fill=(20, 60, 200), width=2)
        draw.text((4, top), f"{hi:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.3g}", fill="black")
    draw.text((left, bottom + 4), f"loss over {len(losses)} steps", fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
