"""The DCI guider: a CFGGuider that runs the auxiliary branch beside the concept branch in the early steps.

How the two branches run in one UNet call, with any ComfyUI sampler:

* The sampler gets 2B latent rows: B concept latents (the seed's noise), then B auxiliary latents (their own
  seed's noise, drawn for the same images: ``noise_batch_index``).
* While the noise level is above the split's sigma (``phase_end_sigma``: ComfyUI's ``percent_to_sigma``, the
  convention of its start/end percents and of the reference code's timestep rule), ``predict_noise`` calls ComfyUI's ``calc_cond_batch`` with two
  conds: the negative (all 2B rows) and one *mixed* positive whose context holds the concept prompt for the
  concept rows and the auxiliary prompt for the auxiliary rows. ComfyUI never splits one cond's rows across
  UNet calls, so every concept row meets its partner in the same call. The call carries a ``StepInfo`` in
  ``transformer_options``, which the MODEL's DCI patches (``wrapper.patch_model``, put on once when the guider
  is built) read; nothing is re-patched while sampling.
* After the split the auxiliary half is frozen (its denoised output is its input) and the concept half is
  sampled exactly as ``CFGGuider`` samples it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.sample
import comfy.samplers
import torch

from ...method.branches import DCIPlan, two_branch_steps
from ...method.dbim import DBIMSettings
from .attention import STEP_KEY, DCIRun, aux_kv_weights
from .prompt import dci_prompt_of, mixed_positive
from .wrapper import StepInfo, patch_model

MIXED_COND = "dci_mixed"  # the guider's extra cond: concept and auxiliary contexts in one


@dataclass(frozen=True)
class _Phase:
    """The two-branch phase of the current ``sample`` call."""

    run: DCIRun
    batch: int
    threshold: float  # model calls at a sigma above this run both branches


def phase_end_sigma(model_patcher, split: float) -> float:
    """The noise level at which the two-branch phase ends: model calls above it run both branches.

    ComfyUI's ``model_sampling.percent_to_sigma(split)`` (the sigma at timestep (1 - split) * 999 for
    SD-style models), so a split means one noise level whatever the scheduler, steps or denoise; infinite
    for split 0 (never), 0 for split 1 (every step).
    """
    if split <= 0.0:
        return math.inf
    return float(model_patcher.get_model_object("model_sampling").percent_to_sigma(split))


def noise_batch_index(noise: torch.Tensor, latent: torch.Tensor, seed: int | None,
                      limit: int = 512) -> list[int] | None:
    """The latent's ``batch_index``, read back from the noise that was drawn for it.

    SamplerCustomAdvanced hands a guider the noise and its seed, not the latent's batch_index; yet the
    auxiliary noise must be drawn for the same images, so that image k gets its own auxiliary noise whether it
    is sampled alone or in a batch. ComfyUI's ``prepare_noise`` draws image i's noise as row i of the seed's
    stream, so the rows are looked up among the first ``limit`` rows. None when the noise is the seed's plain
    draw for the whole batch, or was not drawn from ``seed`` this way (another NOISE node).
    """
    if seed is None:
        return None
    rows = noise.detach().cpu()
    if torch.equal(rows, comfy.sample.prepare_noise(latent, seed, None).to(rows.dtype)):
        return None
    count = rows.shape[0]
    while count <= limit:
        drawn = comfy.sample.prepare_noise(latent[:1], seed, list(range(count))).to(rows.dtype)
        found = [next((i for i in range(count) if torch.equal(drawn[i], row)), None) for row in rows]
        if None not in found:
            return found
        count *= 4
    return None


def two_branch_inputs(noise: torch.Tensor, latent: torch.Tensor, denoise_mask: torch.Tensor | None,
                      seed: int | None, aux_seed: int, zero_noise_stays: bool = False):
    """The sampler's 2B rows: (noise, latent, denoise mask) of the concept images, then of their auxiliary rows.

    The auxiliary rows get ``aux_seed``'s noise for the same images (``noise_batch_index``).
    ``zero_noise_stays``: where the sampler adds no noise (all-zero noise, e.g. KSamplerAdvanced with
    add_noise disabled), the auxiliary rows get none either and start from the same latent.
    """
    b = noise.shape[0]
    if zero_noise_stays and not bool(noise.any()):
        aux_noise = torch.zeros_like(noise)
    else:
        batch_index = noise_batch_index(noise, latent, seed)
        aux_noise = comfy.sample.prepare_noise(latent, aux_seed, batch_index)
    mask2 = denoise_mask
    if denoise_mask is not None and denoise_mask.shape[0] == b and b > 1:
        mask2 = torch.cat([denoise_mask, denoise_mask])
    return torch.cat([noise, aux_noise.to(noise)]), torch.cat([latent, latent]), mask2


def concept_half_callback(callback, b: int):
    """The sampler's step callback, shown only the concept rows (previews, progress)."""
    if callback is None:
        return None

    def concept_half(step, x0, x, total_steps):
        callback(step, x0[:b], x[:b], total_steps)

    return concept_half


def frozen_aux_step(predict, x: torch.Tensor, timestep: torch.Tensor, b: int) -> torch.Tensor:
    """After the split: ``predict`` on the concept rows; the auxiliary rows' denoised output is their input."""
    t = timestep[:b] if timestep.dim() > 0 and timestep.shape[0] == 2 * b else timestep
    concept = predict(x[:b], t)
    return torch.cat([concept, x[b:].to(concept)])


class DCIGuider(comfy.samplers.CFGGuider):
    """CFGGuider on a DCI-patched MODEL; runs both branches while the sigma is above the split's sigma."""

    def __init__(self, model_patcher, plan: DCIPlan, settings: DBIMSettings, aux_kv: dict | None = None):
        super().__init__(model_patcher)
        self.plan = plan
        self.settings = settings
        self.aux_kv = aux_kv
        self.positive = None
        self.phase: _Phase | None = None

    def set_conds(self, positive, negative):
        dci_prompt_of(positive)  # validate before any compute
        self.positive = positive
        super().set_conds(positive, negative)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        b = noise.shape[0]
        threshold = phase_end_sigma(self.model_patcher, self.plan.split)
        self.original_conds.pop(MIXED_COND, None)
        if two_branch_steps(sigmas, threshold) == 0:
            self.phase = None
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        mixed, data, length = mixed_positive(self.positive, b)
        self.phase = _Phase(DCIRun(self.settings, data, length, aux_kv=self.aux_kv), b, threshold)
        self.inner_set_conds({MIXED_COND: mixed})
        noise2, latent2, mask2 = two_branch_inputs(noise, latent_image, denoise_mask, seed, self.plan.aux_seed)
        try:
            out = super().sample(noise2, latent2, sampler, sigmas, mask2, concept_half_callback(callback, b),
                                 disable_pbar, seed)
        finally:
            self.phase = None
        return out[:b]

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = model_options if model_options is not None else {}
        neg, pos = self.conds.get("negative"), self.conds.get("positive")
        phase = self.phase
        if phase is None:
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, neg, pos, self.cfg,
                                                    model_options=model_options, seed=seed)
        b = phase.batch
        if float(timestep.max()) <= phase.threshold:
            return frozen_aux_step(lambda xc, t: comfy.samplers.sampling_function(
                self.inner_model, xc, t, neg, pos, self.cfg, model_options=model_options, seed=seed), x, timestep, b)
        cfg1 = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        uncond = None if cfg1 else neg
        mixed = self.conds[MIXED_COND]
        info = StepInfo(run=phase.run, mixed_index=0, uncond_index=None if cfg1 else 1, batch=b,
                        shared=self.plan.guidance == "shared")
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), STEP_KEY: info}
        out = comfy.samplers.calc_cond_batch(self.inner_model, [mixed, uncond], x, timestep, options)
        return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                           model_options=options, cond=mixed, uncond=uncond)


def build_guider(model_patcher, positive, negative, cfg: float, plan: DCIPlan, settings: DBIMSettings,
                 aux_model=None) -> DCIGuider:
    """A DCI guider on a patched clone of ``model_patcher`` (the input MODEL is never patched).

    ``aux_model``: optional MODEL whose cross-attention K/V the auxiliary branch uses (a variant of the method:
    the auxiliary branch on the base model); every other weight is the model's own.
    """
    dci_prompt_of(positive)
    aux_kv = aux_kv_weights(aux_model, model_patcher) if aux_model is not None else None
    guider = DCIGuider(patch_model(model_patcher, aux_kv=aux_kv is not None), plan, settings, aux_kv)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider
