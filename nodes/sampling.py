"""DCI sampling nodes: the prompt encoder that prepares both branches, the KSampler replacement, the guider."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..dci_core import comfy_dci, dbim
from .concepts import CONCEPT_TYPE

DEFAULT_SPLIT = 0.3  # the paper's default fraction of steps with two branches (the newest reference example: 0.2)


def _dci_options():
    """The inputs that DCI adds, shared by the KSampler replacement and the guider (same order in both)."""
    return {
        "split": ("FLOAT", {"default": DEFAULT_SPLIT, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "Fraction of the steps that run two branches (concept + auxiliary). "
                                       "0 = plain sampling; the method uses 0.2-0.3."}),
        "lam": ("FLOAT", {"default": 0.0, "min": -10.0, "max": 10.0, "step": 0.1,
                          "tooltip": "λ: how strongly the auxiliary branch's attention map pulls the blend "
                                     "towards the auxiliary output (reference 0; typically -2…2)."}),
        "aux_map": (list(dbim.READINGS), {"default": "reference",
                                          "tooltip": "Which auxiliary tokens make the auxiliary map: 'reference' "
                                                     "= the auxiliary noun (reference code), 'paper' = the other "
                                                     "prompt words (the paper's figure)."}),
        "guidance": (list(comfy_dci.GUIDANCE_MODES), {"default": "shared",
                                                      "tooltip": "'shared': the auxiliary branch reuses the "
                                                                 "concept latent's unconditional prediction (3 "
                                                                 "rows per image, cheaper); 'separate': ordinary "
                                                                 "CFG per branch (4 rows)."}),
        "aux_seed": ("INT", {"default": 1, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of the auxiliary branch's own starting noise."}),
    }


def _advanced_options():
    return {
        "tau": ("FLOAT", {"default": 10.0, "min": 0.01, "max": 1000.0, "step": 0.1,
                          "tooltip": "τ: temperature of the attention-map softmaxes (reference 10)."}),
        "kappa": ("FLOAT", {"default": 500.0, "min": 0.01, "max": 100000.0, "step": 1.0,
                            "tooltip": "κ: scale of the spatial normalisation (reference 500)."}),
        "normalization": (list(dbim.NORMALIZATIONS), {"default": "reference",
                                                      "tooltip": "'reference': κ·softmax over pixels (its scale "
                                                                 "depends on the layer's resolution); "
                                                                 "'pixel_count': the same mean weight at every "
                                                                 "resolution."}),
        "aux_model": ("MODEL", {"tooltip": "Optional: the auxiliary branch takes its cross-attention keys and "
                                           "values from this MODEL, e.g. the checkpoint before DCI Load Concept "
                                           "(a variant of the method; unconnected = the concept model, as in "
                                           "the reference code). Same architecture required."}),
    }


def _settings(node: str, split, lam, aux_map, guidance, aux_seed, tau, kappa, normalization):
    try:
        settings = dbim.DBIMSettings(tau=float(tau), kappa=float(kappa), lam=float(lam), reading=aux_map,
                                     normalization=normalization)
        plan = comfy_dci.DCIPlan(split=float(split), guidance=guidance, aux_seed=int(aux_seed))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{node}: {e}") from None
    return plan, settings


def _check_model(node: str, model, name: str = "model") -> None:
    if not hasattr(model, "model") or not hasattr(getattr(model, "model", None), "diffusion_model"):
        raise ValueError(f"{node}: '{name}' must be a MODEL output (e.g. from Load Checkpoint)")


class DCIPromptEncode:
    """Encodes the prompt for the concept branch and the auxiliary prompt for the auxiliary branch."""

    CATEGORY = "concept/sampling"
    DESCRIPTION = (
        "Like CLIP Text Encode, for DCI sampling: write an ordinary prompt that contains the concept phrase "
        "(e.g. 'a photo of sks dog swimming in a pool'). The node finds the concept's tokens and also encodes the "
        "auxiliary prompt, with the phrase replaced by a common noun. Works as a normal positive prompt with "
        "the stock samplers too."
    )
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("positive",)
    OUTPUT_TOOLTIPS = ("The concept prompt's conditioning, carrying the auxiliary branch for DCI KSampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP from DCI Load Concept (it knows the trigger word)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The prompt, containing the concept phrase."}),
                "auxiliary_noun": ("STRING", {"default": "",
                                              "tooltip": "The common noun that replaces the concept phrase in the "
                                                         "auxiliary prompt; it should differ from the class noun. "
                                                         "Empty = automatic ('cat', or 'dog' when the class is cat)."}),
            },
            "optional": {
                "concept": (CONCEPT_TYPE, {"tooltip": "From DCI Load Concept: gives the phrase (trigger + class noun)."}),
                "concept_phrase": ("STRING", {"default": "",
                                              "tooltip": "The phrase naming the concept in the prompt, e.g. "
                                                         "'sks dog'; overrides the concept input."}),
            },
        }

    def encode(self, clip, text, auxiliary_noun, concept=None, concept_phrase=""):
        node = "DCI Prompt Encode"
        if not hasattr(clip, "tokenize"):
            raise ValueError(f"{node}: 'clip' must be a CLIP output")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{node}: the prompt is empty")
        phrase = (concept_phrase or "").strip() or (concept.phrase if concept is not None else "")
        class_noun = concept.class_noun if concept is not None else phrase.split()[-1] if phrase else ""
        aux = (auxiliary_noun or "").strip() or comfy_dci.default_aux_noun(class_noun, text)
        try:
            return (comfy_dci.encode_dci_prompt(clip, text, phrase, aux),)
        except (comfy_dci.DCIError, ValueError) as e:
            raise ValueError(f"{node}: {e}") from None


class DCIKSampler:
    """The stock KSampler's inputs and behaviour, plus DCI's two-branch early phase."""

    CATEGORY = "concept/sampling"
    DESCRIPTION = (
        "Drop-in replacement of KSampler for a concept: for the first 'split' of the steps it runs the concept "
        "branch and an auxiliary branch (the prompt with a common noun instead of the concept) in one batched "
        "UNet call and blends their cross-attention outputs (DBIM), so the concept keeps its look while the "
        "scene follows the prompt; then it finishes the concept branch alone. split = 0 is the stock KSampler."
    )
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent of the concept branch.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model with the concept (from DCI Load Concept)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the concept branch's noise (as in KSampler)."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale. At 1.0 no unconditional pass runs; "
                                             "the two conditional rows are still blended."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Any ComfyUI sampler."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Any ComfyUI scheduler."}),
                "positive": ("CONDITIONING", {"tooltip": "From DCI Prompt Encode."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt (stock CLIP Text Encode)."}),
                "latent_image": ("LATENT", {"tooltip": "The latent to denoise."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "As in KSampler; the split applies to the steps that run."}),
                **_dci_options(),
            },
            "optional": _advanced_options(),
        }

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               split, lam, aux_map, guidance, aux_seed, tau=10.0, kappa=500.0, normalization="reference",
               aux_model=None):
        node = "DCI KSampler"
        _check_model(node, model)
        plan, settings = _settings(node, split, lam, aux_map, guidance, aux_seed, tau, kappa, normalization)
        if not isinstance(latent_image, dict) or "samples" not in latent_image:
            raise ValueError(f"{node}: 'latent_image' must be a LATENT")
        try:
            if aux_model is not None:
                _check_model(node, aux_model, "aux_model")
            guider = comfy_dci.build_guider(model, positive, negative, cfg, plan, settings, aux_model=aux_model)
        except comfy_dci.DCIError as e:
            raise ValueError(f"{node}: {e}") from None
        guider.batch_index = latent_image.get("batch_index")
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options)
        callback = latent_preview.prepare_callback(model, steps)
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), ks.sigmas,
                                denoise_mask=latent_image.get("noise_mask"), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return (out,)


class DCIGuiderNode:
    """The same two-branch guidance as a GUIDER, for SamplerCustomAdvanced."""

    CATEGORY = "concept/sampling"
    DESCRIPTION = "DCI as a GUIDER for SamplerCustomAdvanced (any sampler, sigmas and noise nodes)."
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model with the concept (from DCI Load Concept)."}),
                "positive": ("CONDITIONING", {"tooltip": "From DCI Prompt Encode."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale."}),
                **_dci_options(),
            },
            "optional": _advanced_options(),
        }

    def get_guider(self, model, positive, negative, cfg, split, lam, aux_map, guidance, aux_seed, tau=10.0,
                   kappa=500.0, normalization="reference", aux_model=None):
        node = "DCI Guider"
        _check_model(node, model)
        if aux_model is not None:
            _check_model(node, aux_model, "aux_model")
        plan, settings = _settings(node, split, lam, aux_map, guidance, aux_seed, tau, kappa, normalization)
        try:
            return (comfy_dci.build_guider(model, positive, negative, cfg, plan, settings, aux_model=aux_model),)
        except comfy_dci.DCIError as e:
            raise ValueError(f"{node}: {e}") from None


NODE_CLASS_MAPPINGS = {
    "DCIPromptEncode": DCIPromptEncode,
    "DCIKSampler": DCIKSampler,
    "DCIGuider": DCIGuiderNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DCIPromptEncode": "DCI Prompt Encode",
    "DCIKSampler": "DCI KSampler",
    "DCIGuider": "DCI Guider",
}
