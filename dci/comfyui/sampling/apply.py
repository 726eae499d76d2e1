"""DCI Apply: DCI inside any sampler that goes through ComfyUI's ``CFGGuider.sample``, as wrappers on a MODEL.

Three wrappers with the owner key ``dci`` (beside the APPLY_MODEL wrapper and attn2 patches of
``wrapper.patch_model``) do what ``DCIGuider`` does in its own methods, for whatever guider samples the MODEL
(KSampler's and KSamplerAdvanced's CFGGuider, SamplerCustomAdvanced's CFGGuider, BasicGuider, other packs'):

* OUTER_SAMPLE (once per sampling run): finds the guider's cond that came from DCI Prompt Encode, adds the
  mixed cond (concept rows, then auxiliary rows) to the guider's conds before ComfyUI processes them, doubles
  the noise (the auxiliary rows get their own seed's noise), the latent and the denoise mask, hands the run to
  the model calls in ``transformer_options`` (``RUN_KEY``) and returns the concept half. When the schedule
  never reaches above the split's noise level, or no DCI positive is there (one warning), it only calls on.
* PREDICT_NOISE (every model evaluation): above the split's noise level the guider's own ``predict_noise``
  runs on all 2B rows with the DCI cond swapped for the mixed one; below it the guider runs on the concept
  half and the auxiliary half stays frozen, as in ``DCIGuider``.
* CALC_COND_BATCH: finds which cond of the guider's list is the mixed one, and the unconditional one for
  shared guidance, and puts the ``StepInfo`` there that the APPLY_MODEL wrapper and the attn2 patches read.

With CFGGuider the model calls are the very ones DCIGuider makes (same rows, conds and order), so DCI KSampler
and a stock KSampler on a DCI Apply model give the same latents bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.patcher_extension
import comfy.sampler_helpers

from ...method.branches import DCIPlan, two_branch_steps
from ...method.dbim import DBIMSettings
from .attention import STEP_KEY, DCIRun, aux_kv_weights
from .guider import DCIGuider, concept_half_callback, frozen_aux_step, phase_end_sigma, two_branch_inputs
from .prompt import COND_KEY, DCIError, mixed_positive
from .wrapper import WRAPPER_KEY, StepInfo, patch_model

log = logging.getLogger(__name__)

RUN_KEY = "dci_apply_run"  # transformer_options entry: the ApplyRun of the current sampling run
PHASE_KEY = "dci_apply_phase"  # transformer_options entry on a two-branch evaluation
MIXED_KEY = "dci_apply_mixed"  # the guider's extra cond during a run
MIXED_MARK = "dci_mixed_rows"  # conditioning entry that marks the mixed cond's entries

NO_DCI_POSITIVE = (
    "DCI Apply: no conditioning from DCI Prompt Encode reached the sampler, so it samples without DCI. Connect "
    "DCI Prompt Encode to the sampler's positive input (a plain CLIP Text Encode has no auxiliary prompt).")


@dataclass(frozen=True)
class ApplySettings:
    """What DCI Apply puts on a MODEL: the plan, the DBIM settings and the optional auxiliary K/V weights."""

    plan: DCIPlan
    settings: DBIMSettings
    aux_kv: dict | None = None


@dataclass(frozen=True)
class ApplyRun:
    """One sampling run's two-branch phase."""

    run: DCIRun
    batch: int
    threshold: float
    key: str  # the guider's cond that carries the DCI prompt
    shared: bool


def _raw(entries: list[dict]) -> list:
    """Converted cond dicts back into CONDITIONING (``[tensor, options]`` pairs)."""
    return [[e.get("cross_attn"), {k: v for k, v in e.items() if k not in ("cross_attn", "uuid")}] for e in entries]


def dci_cond_key(conds: dict) -> str | None:
    """The guider's cond that came from DCI Prompt Encode: ``positive`` if it does, else the only one that does."""
    keys = [k for k, entries in conds.items() if entries and any(COND_KEY in e for e in entries)]
    if "positive" in keys:
        return "positive"
    if len(keys) > 1:
        raise DCIError(f"several of the guider's conditionings come from DCI Prompt Encode ({', '.join(keys)}); "
                       "DCI Apply can't tell which one is the concept prompt")
    return keys[0] if keys else None


class DCIApplyWrappers:
    """The OUTER_SAMPLE, PREDICT_NOISE and CALC_COND_BATCH wrappers of one DCI Apply node's MODEL."""

    def __init__(self, apply: ApplySettings):
        self.apply = apply

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None, latent_shapes=None):
        guider = executor.class_obj
        args = (noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        if isinstance(guider, DCIGuider):  # DCI KSampler / DCI Guider run their own two branches
            log.warning("DCI Apply: this MODEL is sampled by DCI KSampler or DCI Guider; their DCI settings "
                        "apply and DCI Apply's are ignored")
            return executor(*args, latent_shapes=latent_shapes)
        plan = self.apply.plan
        threshold = phase_end_sigma(guider.model_patcher, plan.split)
        if two_branch_steps(sigmas, threshold) == 0:
            return executor(*args, latent_shapes=latent_shapes)
        try:
            key = dci_cond_key(guider.conds)
            if key is None:
                log.warning(NO_DCI_POSITIVE)
                return executor(*args, latent_shapes=latent_shapes)
            if latent_shapes is not None and len(latent_shapes) > 1:
                raise DCIError("nested (multi-part) latents are not supported")
            b = noise.shape[0]
            mixed, data, length = mixed_positive(_raw(guider.conds[key]), b)
        except DCIError as e:
            raise DCIError(f"DCI Apply: {e}") from None
        mixed[0][1][MIXED_MARK] = True
        guider.conds[MIXED_KEY] = comfy.sampler_helpers.convert_cond(mixed)
        state = ApplyRun(DCIRun(self.apply.settings, data, length, aux_kv=self.apply.aux_kv), b, threshold, key,
                         plan.guidance == "shared")
        options = guider.model_options.setdefault("transformer_options", {})
        options[RUN_KEY] = state
        noise2, latent2, mask2 = two_branch_inputs(noise, latent_image, denoise_mask, seed, plan.aux_seed,
                                                   zero_noise_stays=True)
        try:
            out = executor(noise2, latent2, sampler, sigmas, mask2, concept_half_callback(callback, b),
                           disable_pbar, seed, latent_shapes=[latent2.shape])
        finally:
            options.pop(RUN_KEY, None)
            guider.conds.pop(MIXED_KEY, None)
        return out[:b]

    def predict_noise(self, executor, x, timestep, model_options=None, seed=None):
        model_options = model_options if model_options is not None else {}
        state: ApplyRun | None = model_options.get("transformer_options", {}).get(RUN_KEY)
        if state is None or x.shape[0] != 2 * state.batch:
            return executor(x, timestep, model_options, seed)
        b = state.batch
        if float(timestep.max()) <= state.threshold:
            return frozen_aux_step(lambda xc, t: executor(xc, t, model_options, seed), x, timestep, b)
        guider = executor.class_obj
        conds = guider.conds
        original = conds[state.key]
        conds[state.key] = conds[MIXED_KEY]
        reached = [False]  # set by the CALC_COND_BATCH wrapper when it finds the mixed cond
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), PHASE_KEY: reached}
        try:
            out = executor(x, timestep, options, seed)
        finally:
            conds[state.key] = original
        if not reached[0]:
            state.run.warn_once("bypass", "DCI Apply: this sampler's guider evaluated the model without ComfyUI's "
                                          "calc_cond_batch (or without the DCI prompt); the two branches ran "
                                          "without the blend")
        return out

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        transformer_options = model_options.get("transformer_options", {})
        state: ApplyRun | None = transformer_options.get(RUN_KEY)
        if state is None or not transformer_options.get(PHASE_KEY):
            return executor(model, conds, x_in, timestep, model_options)
        mixed = [i for i, c in enumerate(conds) if c and any(MIXED_MARK in e for e in c)]
        if len(mixed) != 1:
            state.run.warn_once("mixed", "DCI Apply: the guider did not pass the DCI prompt to the model as one "
                                         "conditioning; this evaluation runs without the two-branch blend")
            return executor(model, conds, x_in, timestep, model_options)
        transformer_options[PHASE_KEY][0] = True
        others = [i for i, c in enumerate(conds) if c is not None and i != mixed[0]]
        if state.shared and len(others) > 1:
            state.run.warn_once("shared", "DCI Apply: shared guidance needs exactly one unconditional "
                                          "conditioning; with this guider's several, every one runs for both branches")
        uncond = others[0] if len(others) == 1 else None
        info = StepInfo(run=state.run, mixed_index=mixed[0], uncond_index=uncond, batch=state.batch,
                        shared=state.shared and uncond is not None)
        options = dict(model_options)
        options["transformer_options"] = {**transformer_options, STEP_KEY: info}
        return executor(model, conds, x_in, timestep, options)


def apply_dci(model_patcher, plan: DCIPlan, settings: DBIMSettings, aux_model=None):
    """A clone of MODEL on which any stock sampler runs DCI (the input MODEL is never patched)."""
    aux_kv = aux_kv_weights(aux_model, model_patcher) if aux_model is not None else None
    m = patch_model(model_patcher, aux_kv=aux_kv is not None)
    wrappers = DCIApplyWrappers(ApplySettings(plan, settings, aux_kv))
    kinds = comfy.patcher_extension.WrappersMP
    m.add_wrapper_with_key(kinds.OUTER_SAMPLE, WRAPPER_KEY, wrappers.outer_sample)
    m.add_wrapper_with_key(kinds.PREDICT_NOISE, WRAPPER_KEY, wrappers.predict_noise)
    m.add_wrapper_with_key(kinds.CALC_COND_BATCH, WRAPPER_KEY, wrappers.calc_cond_batch)
    return m
