"""DCI inside ComfyUI: the guider, the DBIM attention patch and the row bookkeeping between them.

How the two branches run in one UNet call, with any ComfyUI sampler:

* The sampler gets a latent batch of 2B rows: B concept latents (the seed's noise) then B auxiliary latents
  (their own seed's noise). Row k of the concept half pairs with row B + k of the auxiliary half, so rows of
  different images never mix.
* During the first ``split`` fraction of the schedule, ``DCIGuider.predict_noise`` calls ComfyUI's
  ``calc_cond_batch`` with two conds: the negative (applied to all 2B rows), and one *mixed* positive whose
  cross-attention context holds the concept prompt for the first B rows and the auxiliary prompt for the
  last B rows. ComfyUI never splits one cond's rows across UNet calls, so every concept row meets its
  auxiliary partner in the same call. With shared guidance the auxiliary rows' unconditional pass is
  dropped from the UNet batch (3 rows per image instead of 4) and replaced by the concept latent's
  unconditional noise prediction.
* An APPLY_MODEL wrapper (owner key ``dci``) finds the rows of each UNet call from ``cond_or_uncond`` and
  tells the attn2 patches which rows to blend; outside the two-branch phase it is inert.
* After the split the auxiliary half is frozen (its denoised output is its input) and the concept half is
  sampled exactly as ``CFGGuider`` samples it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch

from . import comfy_model
from .dbim import DBIMSettings, attention_probs, blend_outputs
from .token_spans import tile_mask

log = logging.getLogger(__name__)

WRAPPER_KEY = "dci"
STEP_KEY = "dci_step"  # transformer_options entry the guider sets for a two-branch model call
ROWS_KEY = "dci_rows"  # transformer_options entry the wrapper sets for the attn2 patches
AUX_ROWS_KEY = "dci_aux_rows"  # every auxiliary-branch row of a call (conditional, and unconditional if run)
CTX_KEY = "dci_context"  # where the context stash leaves each block's attn2 context for the replace patch
GUIDANCE_MODES = ("shared", "separate")
COND_KEY = "dci"  # the conditioning-dict entry DCI Prompt Encode adds


class DCIError(ValueError):
    """A DCI input is missing or inconsistent; the message says what to change."""


# -- what DCI Prompt Encode puts into the positive conditioning ----------------------------------------------
@dataclass
class DCIPrompt:
    """The auxiliary branch's conditioning and the token masks DBIM needs, carried inside CONDITIONING."""

    phrase: str
    aux_noun: str
    aux_prompt: str
    aux_cond: torch.Tensor  # [1, T_a, D]
    aux_pooled: torch.Tensor | None
    concept_mask: torch.Tensor  # [T_c] bool: tokens of the concept phrase
    prompt_mask: torch.Tensor  # [T_c] bool: real prompt tokens of the concept prompt
    aux_noun_mask: torch.Tensor  # [T_a] bool
    aux_prompt_mask: torch.Tensor  # [T_a] bool


def dci_prompt_of(positive) -> tuple[dict, DCIPrompt]:
    """The single positive conditioning entry and its DCI data; clear errors otherwise."""
    if not isinstance(positive, list) or not positive:
        raise DCIError("'positive' must be a CONDITIONING")
    entries = [c for c in positive if isinstance(c, (list, tuple)) and len(c) == 2 and COND_KEY in c[1]]
    if not entries:
        raise DCIError("'positive' must come from a DCI Prompt Encode node (it carries the concept's tokens and "
                       "the auxiliary prompt); a plain CLIPTextEncode has no auxiliary branch")
    if len(positive) != 1:
        raise DCIError("DCI needs exactly one positive conditioning entry from DCI Prompt Encode; combined, "
                       "concatenated or area conditioning is not supported for the two-branch phase")
    return positive[0], positive[0][1][COND_KEY]


def _lcm_repeat(t: torch.Tensor, length: int) -> torch.Tensor:
    return t.repeat(1, length // t.shape[1], *([1] * (t.dim() - 2)))


def mixed_positive(positive, batch: int) -> tuple[list, DCIPrompt, int]:
    """One cond whose context rows are [concept × B, auxiliary × B] (contexts repeated to a common length)."""
    (cond, extras), data = dci_prompt_of(positive)
    length = math.lcm(cond.shape[1], data.aux_cond.shape[1])
    mixed = torch.cat([_lcm_repeat(cond, length).repeat(batch, 1, 1),
                       _lcm_repeat(data.aux_cond.to(cond), length).repeat(batch, 1, 1)])
    out = {k: v for k, v in extras.items() if k != COND_KEY}
    pooled = extras.get("pooled_output")
    if pooled is not None:
        aux_pooled = data.aux_pooled if data.aux_pooled is not None else pooled
        out["pooled_output"] = torch.cat([pooled.repeat(batch, 1), aux_pooled.to(pooled).repeat(batch, 1)])
    return [[mixed, out]], data, length


# -- per-call bookkeeping -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepInfo:
    """Set by the guider on a two-branch model call: which cond index is which, and the image batch B."""

    mixed_index: int
    uncond_index: int | None
    batch: int
    shared: bool


@dataclass
class DCIState:
    """Static data of one DCI sampling run, shared by the wrapper and every attn2 patch."""

    settings: DBIMSettings
    data: DCIPrompt
    context_length: int
    masks: dict[int, tuple] = field(default_factory=dict)  # context length → tiled masks
    warned: set = field(default_factory=set)
    blend_override: float | None = None  # tests only: force w_c
    # Optional: per layer (patch key), the attn2 K/V weights the auxiliary branch uses instead of the model's
    aux_kv: dict | None = None

    def masks_for(self, length: int):
        if length not in self.masks:
            d = self.data
            c_len, a_len = d.concept_mask.shape[0], d.aux_noun_mask.shape[0]
            if length % c_len or length % a_len:
                raise DCIError(f"context length {length} is not a multiple of the prompt lengths {c_len}/{a_len}")
            self.masks[length] = (tile_mask(d.concept_mask, length), tile_mask(d.prompt_mask, length),
                                  tile_mask(d.aux_noun_mask, length), tile_mask(d.aux_prompt_mask, length))
        return self.masks[length]

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message)


class DBIMPatch:
    """attn2 replace patch of one layer: fused attention for the outputs, DBIM blend on the concept rows."""

    def __init__(self, state: DCIState, layer: comfy_model.CrossAttentionLayer, inner=None):
        self.state = state
        self.layer = layer
        self.inner = inner  # an attn2 replace patch that was there before ours (another extension's)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        aux_rows, stashed = extra_options.get(AUX_ROWS_KEY), extra_options.get(CTX_KEY)
        if self.state.aux_kv is not None and aux_rows is not None and stashed is not None:
            # the auxiliary branch's keys and values from the other model's weights (its own context rows)
            wk, wv = self.state.aux_kv[self.layer.patch_key]
            context, value = stashed
            k, v = k.clone(), v.clone()
            k[aux_rows] = torch.nn.functional.linear(context[aux_rows], wk.to(k))
            v[aux_rows] = torch.nn.functional.linear(value[aux_rows], wv.to(v))
        if self.inner is not None:
            out = self.inner(q, k, v, extra_options)
        else:
            out = optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
        rows = extra_options.get(ROWS_KEY)
        if rows is None:
            return out
        c_rows, a_rows = rows
        st = self.state
        if st.blend_override is not None:
            w = torch.full((len(c_rows), heads, q.shape[1]), st.blend_override, dtype=torch.float32)
        else:
            concept, prompt_c, aux_noun, prompt_a = st.masks_for(k.shape[1])
            p_c = attention_probs(q[c_rows], k[c_rows], heads)
            p_a = attention_probs(q[a_rows], k[a_rows], heads) if st.settings.lam != 0.0 else None
            w = st.settings.weights(p_c, p_a, concept_tokens=concept, aux_noun_tokens=aux_noun,
                                    prompt_tokens_c=prompt_c, prompt_tokens_a=prompt_a)
        out = out.clone()
        out[c_rows] = blend_outputs(out[c_rows], out[a_rows], w.to(out.device), heads)
        return out


def _call_rows(cond_or_uncond: list[int], total: int, info: StepInfo):
    """Row indices of this UNet call: (concept cond rows, aux cond rows, concept uncond rows, aux uncond rows)."""
    chunks = len(cond_or_uncond)
    if total % chunks:
        return None
    size = total // chunks
    if size != 2 * info.batch:
        return None
    b = info.batch
    found = {"mixed": None, "uncond": None}
    for j, idx in enumerate(cond_or_uncond):
        if idx == info.mixed_index:
            found["mixed"] = j * size
        elif idx == info.uncond_index:
            found["uncond"] = j * size
    rng = lambda start: torch.arange(start, start + b)  # noqa: E731
    m, u = found["mixed"], found["uncond"]
    return (rng(m) if m is not None else None, rng(m + b) if m is not None else None,
            rng(u) if u is not None else None, rng(u + b) if u is not None else None)


def _select_rows(value, keep: torch.Tensor, total: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value[keep.to(value.device)]
    return value


def make_apply_model_wrapper(state: DCIState):
    """APPLY_MODEL wrapper: marks the rows to blend, and in shared mode skips the aux rows' uncond pass."""

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        info: StepInfo | None = transformer_options.get(STEP_KEY)
        if info is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        total = x.shape[0]
        rows = _call_rows(transformer_options.get("cond_or_uncond", []), total, info)
        if rows is None:
            state.warn_once("layout", "DCI: a UNet call did not contain whole branch pairs (the batch was split "
                                      "unexpectedly); this call runs without the two-branch blend")
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        c_rows, a_rows, uc_rows, ua_rows = rows
        drop = info.shared and ua_rows is not None and control is None
        keep = torch.ones(total, dtype=torch.bool)
        if drop:
            keep[ua_rows] = False
        kept_index = torch.cumsum(keep.long(), 0) - 1  # position of each kept row in the smaller batch
        options = dict(transformer_options)
        if c_rows is not None:
            options[ROWS_KEY] = (kept_index[c_rows], kept_index[a_rows])
            aux = a_rows if drop or ua_rows is None else torch.cat([a_rows, ua_rows])
            options[AUX_ROWS_KEY] = kept_index[aux]
        if drop:
            options["cond_or_uncond"] = list(options.get("cond_or_uncond", []))
            out_small = executor(x[keep], t[keep], _select_rows(c_concat, keep, total),
                                 _select_rows(c_crossattn, keep, total), control, options,
                                 **{k: _select_rows(v, keep, total) for k, v in kwargs.items()})
            out = torch.empty((total, *out_small.shape[1:]), dtype=out_small.dtype, device=out_small.device)
            out[keep.to(out.device)] = out_small
        else:
            out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        if info.shared and ua_rows is not None:
            # shared guidance: the auxiliary latent uses the concept latent's unconditional noise prediction,
            # eps_u(x_c) = (x_c - D_u(x_c)) / sigma, so D_u(x_a) := x_a - sigma * eps_u(x_c)
            out[ua_rows] = out[uc_rows] + (x[ua_rows] - x[uc_rows]).to(out.dtype)
        return out

    return wrapper


def _stash_context(n, context, value, extra_options):
    """attn2_patch: leaves the block's cross-attention context where the replace patch finds it (two-branch
    calls only, and only when the auxiliary branch has K/V weights of its own)."""
    if AUX_ROWS_KEY in extra_options:
        extra_options[CTX_KEY] = (context, value)
    return n, context, value


def aux_kv_weights(aux_model, model) -> dict:
    """Per cross-attention layer of ``model``: ``aux_model``'s effective attn2 to_k/to_v weights (its own
    patches applied, e.g. the MODEL before DCI Load Concept: the base model's K/V)."""
    import comfy.lora

    layers = comfy_model.cross_attention_layers(model)
    entries = aux_model.get_key_patches("diffusion_model.")
    out = {}
    for layer in layers:
        pair = []
        for name in ("to_k", "to_v"):
            key = layer.weight_prefix + name + ".weight"
            found = entries.get(key)
            if found is None:
                raise DCIError(f"aux_model has no cross-attention layer {layer.name} ({key}); connect a MODEL of "
                               "the same architecture, e.g. the checkpoint before DCI Load Concept")
            weight, convert = found[0]
            w = convert(weight).float().clone()
            if len(found) > 1:
                w = comfy.lora.calculate_weight(found[1:], w, key)
            if tuple(w.shape) != (layer.inner_dim, layer.context_dim):
                raise DCIError(f"aux_model's {key} is {tuple(w.shape)}, the model's is "
                               f"{(layer.inner_dim, layer.context_dim)}: not the same architecture")
            pair.append(w)
        out[layer.patch_key] = tuple(pair)
    return out


def patch_model(model_patcher, state: DCIState):
    """A clone of MODEL with the DBIM patch on every cross-attention layer and the row wrapper."""
    import comfy.patcher_extension

    m = model_patcher.clone()
    if state.aux_kv is not None:
        m.set_model_attn2_patch(_stash_context)
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in comfy_model.cross_attention_layers(m):
        inner = existing.get(layer.patch_key) or existing.get(layer.block)
        m.set_model_attn2_replace(DBIMPatch(state, layer, inner), layer.block[0], layer.block[1], layer.depth)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                           make_apply_model_wrapper(state))
    return m


# -- the guider ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DCIPlan:
    split: float
    guidance: str
    aux_seed: int

    def __post_init__(self):
        if not (0.0 <= self.split <= 1.0):
            raise DCIError(f"split must be between 0 and 1 (the fraction of steps with two branches); got {self.split}")
        if self.guidance not in GUIDANCE_MODES:
            raise DCIError(f"guidance must be one of {GUIDANCE_MODES}; got {self.guidance!r}")


def split_sigma(sigmas: torch.Tensor, split: float) -> float:
    """Model calls at a sigma above this run both branches: the first round(split × steps) steps."""
    steps = len(sigmas) - 1
    if steps < 1:
        return math.inf
    n = min(steps, max(0, round(split * steps)))
    return float(sigmas[n]) if n > 0 else math.inf


def make_guider_class():
    import comfy.sample
    import comfy.samplers

    class DCIGuider(comfy.samplers.CFGGuider):
        """CFGGuider that runs the auxiliary branch beside the concept branch during the early steps."""

        def __init__(self, model_patcher, plan: DCIPlan, settings: DBIMSettings, blend_override=None,
                     aux_kv=None):
            super().__init__(model_patcher)
            self.aux_kv = aux_kv
            self.plan = plan
            self.settings = settings
            self.blend_override = blend_override
            self.base_patcher = model_patcher
            self.positive_raw = None
            self.batch: int | None = None
            self.threshold = math.inf
            self.batch_index = None  # the latent's batch_index, so image k's auxiliary noise is its own

        def set_conds(self, positive, negative):
            dci_prompt_of(positive)  # validate before any compute
            self.positive_raw = positive
            super().set_conds(positive, negative)

        def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                   disable_pbar=False, seed=None):
            b = noise.shape[0]
            self.threshold = split_sigma(sigmas, self.plan.split)
            mixed, data, length = mixed_positive(self.positive_raw, b)
            state = DCIState(self.settings, data, length, blend_override=self.blend_override, aux_kv=self.aux_kv)
            # patched anew for every run; the patches are inert outside the two-branch phase
            self.model_patcher = patch_model(self.base_patcher, state)
            self.model_options = self.model_patcher.model_options
            self.original_conds.pop("dci_mixed", None)
            if math.isinf(self.threshold):
                self.batch = None
                return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback,
                                      disable_pbar, seed)
            self.batch = b
            self.inner_set_conds({"dci_mixed": mixed})
            aux_noise = comfy.sample.prepare_noise(latent_image, self.plan.aux_seed, self.batch_index)
            noise2 = torch.cat([noise, aux_noise.to(noise)])
            latent2 = torch.cat([latent_image, latent_image])
            mask2 = denoise_mask
            if denoise_mask is not None and denoise_mask.shape[0] == b and b > 1:
                mask2 = torch.cat([denoise_mask, denoise_mask])

            def concept_half(step, x0, x, total_steps):
                if callback is not None:
                    callback(step, x0[:b], x[:b], total_steps)

            out = super().sample(noise2, latent2, sampler, sigmas, mask2, concept_half, disable_pbar, seed)
            return out[:b]

        def predict_noise(self, x, timestep, model_options=None, seed=None):
            model_options = model_options if model_options is not None else {}
            neg, pos = self.conds.get("negative"), self.conds.get("positive")
            if self.batch is None:
                return comfy.samplers.sampling_function(self.inner_model, x, timestep, neg, pos, self.cfg,
                                                        model_options=model_options, seed=seed)
            b = self.batch
            if float(timestep.max()) <= self.threshold:
                t = timestep[:b] if timestep.dim() > 0 and timestep.shape[0] == 2 * b else timestep
                concept = comfy.samplers.sampling_function(self.inner_model, x[:b], t, neg, pos, self.cfg,
                                                           model_options=model_options, seed=seed)
                return torch.cat([concept, x[b:].to(concept)])  # the auxiliary branch is dropped
            cfg1 = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
            uncond = None if cfg1 else neg
            mixed = self.conds["dci_mixed"]
            info = StepInfo(mixed_index=0, uncond_index=None if cfg1 else 1, batch=b,
                            shared=self.plan.guidance == "shared")
            options = dict(model_options)
            options["transformer_options"] = {**model_options.get("transformer_options", {}), STEP_KEY: info}
            out = comfy.samplers.calc_cond_batch(self.inner_model, [mixed, uncond], x, timestep, options)
            return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                               model_options=options, cond=mixed, uncond=uncond)

    return DCIGuider


_GUIDER_CLASS = None


def guider_class():
    global _GUIDER_CLASS
    if _GUIDER_CLASS is None:
        _GUIDER_CLASS = make_guider_class()
    return _GUIDER_CLASS


def build_guider(model_patcher, positive, negative, cfg: float, plan: DCIPlan, settings: DBIMSettings,
                 blend_override: float | None = None, aux_model=None):
    """A DCI guider on a clone of ``model_patcher`` (the input MODEL is never patched).

    ``aux_model``: optional MODEL whose cross-attention K/V the auxiliary branch uses (a variant of the method:
    the auxiliary branch on the base model); every other weight is the model's own.
    """
    dci_prompt_of(positive)
    aux_kv = aux_kv_weights(aux_model, model_patcher) if aux_model is not None else None
    guider = guider_class()(model_patcher.clone(), plan, settings, blend_override, aux_kv)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


# -- DCI Prompt Encode ----------------------------------------------------------------------------------------
AUX_NOUN_CANDIDATES = ("cat", "dog", "car", "chair", "cup", "bird")


def default_aux_noun(class_noun: str, prompt: str) -> str:
    """A common noun different from the class noun and absent from the prompt (the method's 'cat' example)."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", prompt)} | {class_noun.lower().strip()}
    for noun in AUX_NOUN_CANDIDATES:
        if noun not in words:
            return noun
    return "thing"


def _encode(clip, text: str):
    """Exactly what the stock CLIPTextEncode returns for ``text``."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def encode_dci_prompt(clip, text: str, phrase: str, aux_noun: str) -> list:
    """The concept prompt's CONDITIONING (as CLIPTextEncode makes it) carrying the auxiliary branch's data."""
    from .comfy_tokens import locate_phrase, shared_context_masks
    from .token_spans import replace_phrase

    phrase = " ".join(phrase.split())
    aux_noun = " ".join(aux_noun.split())
    if not phrase:
        raise DCIError("no concept phrase: connect the concept from DCI Load Concept or type the phrase "
                       "(trigger word and class noun, e.g. 'sks dog')")
    if not aux_noun:
        raise DCIError("the auxiliary noun is empty")
    if aux_noun.lower() == phrase.lower():
        raise DCIError("the auxiliary noun must differ from the concept phrase")
    try:
        aux_prompt = replace_phrase(text, phrase, aux_noun)
    except ValueError:
        raise DCIError(f"the concept phrase {phrase!r} is not in the prompt {text!r}: write it there as whole "
                       f"words, e.g. 'a photo of {phrase} on the beach'") from None
    located = locate_phrase(clip, text, phrase)
    prompt_mask, concept_mask = shared_context_masks(located)
    located_a = locate_phrase(clip, aux_prompt, aux_noun)
    aux_prompt_mask, aux_noun_mask = shared_context_masks(located_a)
    positive = _encode(clip, text)
    auxiliary = _encode(clip, aux_prompt)
    if len(positive) != 1 or len(auxiliary) != 1:
        raise DCIError("scheduled text-encoder hooks are not supported by DCI Prompt Encode")
    cond, extras = positive[0]
    aux_cond, aux_extras = auxiliary[0]
    if cond.shape[1] != concept_mask.shape[0] or aux_cond.shape[1] != aux_noun_mask.shape[0]:
        raise DCIError(f"token masks ({concept_mask.shape[0]}, {aux_noun_mask.shape[0]}) do not match the "
                       f"encoded lengths ({cond.shape[1]}, {aux_cond.shape[1]})")
    data = DCIPrompt(
        phrase=phrase, aux_noun=aux_noun, aux_prompt=aux_prompt, aux_cond=aux_cond,
        aux_pooled=aux_extras.get("pooled_output"), concept_mask=concept_mask, prompt_mask=prompt_mask,
        aux_noun_mask=aux_noun_mask, aux_prompt_mask=aux_prompt_mask,
    )
    return [[cond, {**extras, COND_KEY: data}]]
