"""The retouch pass's wrappers (owner key ``dci_retouch``) and the one function that patches a MODEL for it.

* ``OUTER_SAMPLE``: every sampling run gets a fresh ``RetouchRun`` (its own subject map and mask) in a copy
  of the guider's options, as ComfyUI's EasyCache keeps its per-run state. The run begins at the window's
  start, from the context trajectory's latent there: the steps before it are the context's own, which is how
  the result keeps the context's layout, whatever noise or seed the sampler was given.
* ``APPLY_MODEL``: at a noise level inside the step window it appends the reference and context branches to
  the UNet batch: for each of the N rows (every cond chunk, positive and negative alike) the reference
  trajectory's and the context trajectory's latent at this sigma, with that row's conditioning. The attention
  patches read the rows from a ``RetouchCall``; only the N generated rows leave the call. Outside the window
  the call runs as it came, still gathering the subject map, so the mask is ready when the window opens.
"""

from __future__ import annotations

import logging

import comfy.model_patcher
import comfy.patcher_extension
import torch

from ...method.retouch import RetouchSettings, Trajectory
from ..model import cross_attention_layers, finest_decoder_layers
from .attention import CALL_KEY, PLAN_KEY, RUN_KEY, RetouchCall, RetouchPlan, RetouchRun, patch_attention

WRAPPER_KEY = "dci_retouch"
log = logging.getLogger(__name__)


def outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                         disable_pbar=False, seed=None, **kwargs):
    """A fresh ``RetouchRun`` for this run; the run begins at the window's start from the context's latent there
    (the steps before it are the context's own: its layout)."""
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options.setdefault("transformer_options", {})
    plan: RetouchPlan | None = options.get(PLAN_KEY)
    run = None
    if plan is not None:
        run = options[RUN_KEY] = RetouchRun(plan)
        begin = plan.first_step(sigmas)
        start = plan.context.at(float(sigmas[begin]))
        if start is None or tuple(start.shape[1:]) != tuple(latent_image.shape[1:]):
            run.warn_once("start", f"DCI Retouch: the context trajectory {plan.context.latent_shape} does not cover "
                                   f"this run (latent {tuple(latent_image.shape[1:])}, sigma {float(sigmas[begin]):g}); "
                                   "the run starts from its own noise")
        else:
            rows = torch.arange(latent_image.shape[0]) % start.shape[0]
            latent_image = guider.model_patcher.model.process_latent_out(start[rows].clone()).to(latent_image)
            noise = torch.zeros_like(noise)
            sigmas = sigmas[begin:]
    try:
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **kwargs)
    finally:
        guider.model_options = original
        if run is not None:
            log.info("DCI Retouch: %s", run.summary())


def _tripled(value, total: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return torch.cat([value, value, value])
    return value


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    transformer_options = transformer_options if transformer_options is not None else {}
    run: RetouchRun | None = transformer_options.get(RUN_KEY)
    if run is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    sigma = float(t.max())
    run.begin(sigma)
    n = x.shape[0]
    chunks = list(transformer_options.get("cond_or_uncond", [0]))
    if not chunks or n % len(chunks):
        run.warn_once("rows", "DCI Retouch: a UNet call's rows are not whole chunks of the image batch; it runs "
                              "without retouching")
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    batch = n // len(chunks)
    images = torch.arange(n) % batch
    cond_rows = torch.cat([torch.arange(j * batch, (j + 1) * batch) for j, c in enumerate(chunks) if c == 0]
                          or [torch.zeros(0, dtype=torch.long)])
    plan = run.plan
    ref = plan.reference.at(sigma) if plan.swaps_at(sigma) else None
    ctx = plan.context.at(sigma) if ref is not None else None
    branches = ref is not None and ctx is not None
    if branches and control is not None:
        run.warn_once("control", "DCI Retouch: a ControlNet is attached; the retouch pass runs without the "
                                 "reference and context branches")
        branches = False
    if branches and (tuple(ref.shape[1:]) != tuple(x.shape[1:]) or tuple(ctx.shape[1:]) != tuple(x.shape[1:])):
        run.warn_once("shape", f"DCI Retouch: the trajectories' latents {tuple(ref.shape[1:])} do not match the "
                               f"sampled latent {tuple(x.shape[1:])}; this run is not retouched")
        branches = False
    call = RetouchCall(run, n, batch, images, cond_rows, branches, tuple(x.shape[-2:]))
    options = dict(transformer_options)
    options[CALL_KEY] = call
    if not branches:
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
    run.swapped_calls += 1
    xr = ref[images % ref.shape[0]].to(x)
    xc = ctx[images % ctx.shape[0]].to(x)
    options["cond_or_uncond"] = chunks * 3
    if isinstance(options.get("uuids"), list):
        options["uuids"] = options["uuids"] * 3
    t3 = torch.cat([t, t, t])
    if isinstance(options.get("sigmas"), torch.Tensor):
        options["sigmas"] = t3
    out = executor(torch.cat([x, xr, xc]), t3, _tripled(c_concat, n), _tripled(c_crossattn, n), control, options,
                   **{k: _tripled(v, n) for k, v in kwargs.items()})
    return out[:n]


def retouch_model(model_patcher, reference: Trajectory, context: Trajectory, settings: RetouchSettings,
                  subject_tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
    """A clone of MODEL whose sampling runs are retouched; the input MODEL is never patched.

    ``subject_tokens`` (the concept phrase's tokens in the positive) make the mask from cross-attention;
    ``mask`` [B, H, W] (any resolution) is used as it is instead.
    """
    m = model_patcher.clone()
    sampling = m.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(settings.start)), float(sampling.percent_to_sigma(settings.end)))
    plan = RetouchPlan(reference, context, settings, window, subject_tokens,
                       None if mask is None else (mask > 0.5).float())
    m.model_options.setdefault("transformer_options", {})[PLAN_KEY] = plan
    patch_attention(m, finest_decoder_layers(m, settings.decoder_levels), cross_attention_layers(m),
                    maps=mask is None)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return m
