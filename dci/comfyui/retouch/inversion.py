"""Reference inversion (Layout-and-Retouch's reference trajectory) through ComfyUI's own sampling path.

The inversion runs as a ``KSAMPLER`` function inside a conditional-only ``CFGGuider`` (as ComfyUI's trainer
runs its loop as a sampler), so ComfyUI loads the model, applies its patches and wrappers and scales the
latent exactly as for sampling. The function inverts the clean latent along the schedule
(``method.retouch.invert``), keeps the latent at every sigma, then samples back down from the inverted
noise with Euler steps: the round trip whose error the node reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch

from ...method.retouch import Trajectory, invert, sample_euler
from ..model import model_family
from .layout import schedule


class ConditionalGuider(comfy.samplers.CFGGuider):
    """The positive only (CFG 1): inversion follows the conditional probability-flow ODE."""

    def set_conds(self, positive):
        self.inner_set_conds({"positive": positive})


@dataclass(frozen=True)
class Inversion:
    trajectory: Trajectory
    round_trip: torch.Tensor  # LATENT-space samples regenerated from the inverted noise
    latent_rms_error: float  # RMS of (round trip − input latent)
    relative_error: float  # that RMS over the input latent's RMS


def invert_latent(model, positive, samples: torch.Tensor, steps: int, scheduler: str, refine: int) -> Inversion:
    """Invert LATENT-space ``samples`` [B, C, H, W] with ``model`` along the ``scheduler``'s schedule."""
    sigmas = schedule(model, steps, "euler", scheduler, 1.0)
    guider = ConditionalGuider(model)
    guider.set_conds(positive)
    guider.set_cfg(1.0)
    evaluations = steps * (refine + 2)
    pbar = comfy.utils.ProgressBar(evaluations)
    done = [0]
    kept: dict[str, torch.Tensor] = {}

    def inversion_sampler(model_k, x, sigmas_k, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])

        def denoise(xt, sigma):
            comfy.model_management.throw_exception_if_processing_interrupted()
            out = model_k(xt, sigma * s_in, **extra_args)
            done[0] += 1
            pbar.update_absolute(done[0], evaluations)
            return out

        path = invert(x, sigmas, denoise, refine=refine)
        kept["path"] = path.detach().float().cpu()
        return sample_euler(path[0], sigmas, denoise)

    noise = torch.zeros_like(samples)
    out = guider.sample(noise, samples, comfy.samplers.KSAMPLER(inversion_sampler), sigmas.float(), seed=0,
                        disable_pbar=True)
    out = out.to(samples.device, samples.dtype)
    rms = float((out.float() - samples.float()).pow(2).mean().sqrt())
    scale = float(samples.float().pow(2).mean().sqrt())
    trajectory = Trajectory(sigmas.clone(), kept["path"], model_family(model), f"inversion ({steps} steps, {scheduler})")
    return Inversion(trajectory, out, rms, rms / scale if scale > 0 else float("nan"))
