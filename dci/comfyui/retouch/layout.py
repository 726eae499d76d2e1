"""Step-blended sampling (Layout-and-Retouch's stage 1) on ComfyUI's stock sampling path.

Two ``comfy.sample.sample`` segments share one sigma schedule, as two KSampler (Advanced) nodes chained by
start/end step would: the vanilla MODEL runs steps [0, k) with the prompt without the identifier, the
personalised MODEL finishes steps [k, steps) from its latent. With k = 0 the call is exactly the stock
KSampler's. A sampler callback records the latent at every sigma (the trajectory stage 2 reads); the
recording only reads, so it changes nothing.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ...method.retouch import Trajectory, switch_step
from ..model import model_family


def schedule(model_patcher, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    """The sigmas ``comfy.sample.sample`` uses for these settings (before start/end steps cut them)."""
    ks = comfy.samplers.KSampler(model_patcher, steps=steps, device=model_patcher.load_device, sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise, model_options=model_patcher.model_options)
    return ks.sigmas.detach().double().cpu()


def to_trajectory(sigmas: torch.Tensor, recorded: dict[int, torch.Tensor], family: str, source: str) -> Trajectory:
    """The recorded latents (schedule index → latent), in schedule order, as a Trajectory."""
    index = sorted(i for i in recorded if i < len(sigmas))
    keep = [i for n, i in enumerate(index) if n == 0 or float(sigmas[i]) < float(sigmas[index[n - 1]])]
    return Trajectory(sigmas[keep].clone(), torch.stack([recorded[i] for i in keep]), family, source)


def step_blended_sample(model, vanilla_model, positive, layout_positive, negative, seed: int, steps: int, cfg: float,
                        sampler_name: str, scheduler: str, latent: dict, denoise: float,
                        switch: float) -> tuple[dict, Trajectory]:
    """The context LATENT and its trajectory: ``vanilla_model`` for the first ``switch`` of the steps."""
    k = switch_step(switch, steps)
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    noise_mask = latent.get("noise_mask")
    sigmas = schedule(model, steps, sampler_name, scheduler, denoise)
    recorded: dict[int, torch.Tensor] = {}
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED

    def segment(m, pos, start, last, x, seg_noise, disable_noise):
        preview = latent_preview.prepare_callback(m, steps)
        offset = start or 0

        def callback(step, x0, xt, total_steps):
            recorded[offset + step] = xt.detach().float().cpu().clone()
            preview(step, x0, xt, total_steps)

        return comfy.sample.sample(m, seg_noise, steps, cfg, sampler_name, scheduler, pos, negative, x,
                                   denoise=denoise, disable_noise=disable_noise, start_step=start, last_step=last,
                                   force_full_denoise=False, noise_mask=noise_mask, callback=callback,
                                   disable_pbar=disable_pbar, seed=seed)

    if k == 0:
        out = segment(model, positive, None, None, samples, noise, False)
    elif k >= steps:
        out = segment(vanilla_model, layout_positive, None, None, samples, noise, False)
    else:
        mid = segment(vanilla_model, layout_positive, 0, k, samples, noise, False)
        out = segment(model, positive, k, steps, mid, torch.zeros_like(noise), True)
    recorded[len(sigmas) - 1] = model.model.process_latent_in(out.float()).cpu()
    result = latent.copy()
    result["samples"] = out
    return result, to_trajectory(sigmas, recorded, model_family(model), f"step-blended (switch {switch:g})")
