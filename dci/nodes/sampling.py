"""DCI sampling nodes: the prompt encoder that prepares both branches, the KSampler replacement, the guider."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..comfyui.sampling.apply import apply_dci
from ..comfyui.sampling.guider import build_guider
from ..comfyui.sampling.prompt import CONCEPT_MAPS, DCIError, encode_dci_prompt
from ..method.branches import GUIDANCE_MODES, DCIPlan
from ..method.dbim import NORMALIZATIONS, READINGS, DBIMSettings
from ..method.token_spans import default_aux_noun
from .common import SEED_MAX, check_clip, check_model, register, reported, sampler_inputs, spec
from .concepts import CONCEPT_TYPE

PLAN, DBIM = DCIPlan(), DBIMSettings()  # the defaults of every DCI input


def _dci_options() -> dict:
    """The inputs that DCI adds, shared by the KSampler replacement and the guider (same order in both)."""
    return {
        "split": spec("FLOAT", "How much of the noise schedule, from its noisy start, runs two branches (concept + "
                      "auxiliary): the phase lasts while the noise level is above ComfyUI's percent_to_sigma(split), "
                      "as in the reference code and ComfyUI's start/end percents, whatever the scheduler, steps or "
                      "denoise. 0 = plain sampling; the method uses 0.2-0.3.", default=PLAN.split, min=0.0,
                      max=1.0, step=0.01),
        "lam": spec("FLOAT", "λ: how strongly the auxiliary branch's attention map pulls the blend towards the "
                    "auxiliary output (reference 0; typically -2…2).", default=DBIM.lam, min=-10.0, max=10.0,
                    step=0.1),
        "aux_map": spec(list(READINGS), "Which words make the auxiliary map that λ weighs. 'reference': the "
                        "auxiliary branch's attention to the context words (its prompt without the auxiliary noun), "
                        "as the reference code and the paper compute it. 'noun': its attention to the auxiliary "
                        "noun itself, a variant (what 'reference' meant before 0.2.0). 'paper': the same as "
                        "'reference', kept for workflows saved with that name.", default=DBIM.reading),
        "guidance": spec(list(GUIDANCE_MODES), "'shared': the auxiliary branch reuses the concept latent's "
                         "unconditional prediction (3 rows per image, cheaper); 'separate': ordinary CFG per "
                         "branch (4 rows).", default=PLAN.guidance),
        "aux_seed": spec("INT", "Seed of the auxiliary branch's own starting noise.", default=PLAN.aux_seed, min=0,
                         max=SEED_MAX),
    }


def _advanced_options() -> dict:
    return {
        "tau": spec("FLOAT", "τ: temperature of the attention-map softmaxes (reference 10).", default=DBIM.tau,
                    min=0.01, max=1000.0, step=0.1),
        "kappa": spec("FLOAT", "κ: scale of the spatial normalisation (reference 500).", default=DBIM.kappa,
                      min=0.01, max=100000.0, step=1.0),
        "normalization": spec(list(NORMALIZATIONS), "'reference': κ·softmax over pixels (its scale depends on the "
                              "layer's resolution); 'pixel_count': the same mean weight at every resolution.",
                              default=DBIM.normalization),
        "aux_model": spec("MODEL", "Optional: the auxiliary branch takes its cross-attention keys and values from "
                          "this MODEL, e.g. the checkpoint before DCI Load Concept (a variant of the method; "
                          "unconnected = the concept model, as in the reference code). Same architecture "
                          "required."),
    }


def _checked(node: str, model, split, lam, aux_map, guidance, aux_seed, tau=DBIM.tau, kappa=DBIM.kappa,
             normalization=DBIM.normalization, aux_model=None) -> tuple[DCIPlan, DBIMSettings]:
    """The checked DCI inputs of every sampling node → (plan, DBIM settings)."""
    check_model(node, model)
    if aux_model is not None:
        check_model(node, aux_model, "aux_model")
    with reported(node, ValueError, TypeError):
        settings = DBIMSettings(tau=float(tau), kappa=float(kappa), lam=float(lam), reading=aux_map,
                                normalization=normalization)
        plan = DCIPlan(split=float(split), guidance=guidance, aux_seed=int(aux_seed))
    return plan, settings


def _guider(node: str, model, positive, negative, cfg, aux_model=None, **dci):
    """The checked inputs of both sampling nodes → a DCI guider."""
    plan, settings = _checked(node, model, aux_model=aux_model, **dci)
    with reported(node, DCIError):
        return build_guider(model, positive, negative, cfg, plan, settings, aux_model=aux_model)


class DCIPromptEncode:
    """Encodes the prompt for the concept branch and the auxiliary prompt for the auxiliary branch."""

    NODE_ID = "DCIPromptEncode"
    DISPLAY_NAME = "DCI Prompt Encode"
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
                "clip": spec("CLIP", "The CLIP from DCI Load Concept (it knows the trigger word)."),
                "text": spec("STRING", "The prompt, containing the concept phrase.", multiline=True,
                             dynamicPrompts=True),
                "auxiliary_noun": spec("STRING", "The common noun that replaces the concept phrase in the "
                                       "auxiliary prompt; it should differ from the class noun. Empty = automatic "
                                       "('cat', or 'dog' when the class is cat).", default=""),
            },
            "optional": {
                "concept": spec(CONCEPT_TYPE, "From DCI Load Concept: gives the phrase (trigger + class noun)."),
                "concept_phrase": spec("STRING", "The phrase naming the concept in the prompt, e.g. 'sks dog'; "
                                       "overrides the concept input.", default=""),
                "concept_2": spec(CONCEPT_TYPE, "Optional second concept in the same prompt (from a second, "
                                  "chained DCI Load Concept): gives its phrase."),
                "concept_phrase_2": spec("STRING", "The second concept's phrase in the prompt, e.g. 'zwx mug'; "
                                         "overrides concept_2. Empty and no concept_2 = one concept.", default=""),
                "auxiliary_noun_2": spec("STRING", "The common noun that replaces the second concept's phrase in "
                                         "the auxiliary prompt. Empty = automatic (another noun than the first "
                                         "concept's).", default=""),
                "concept_maps": spec(list(CONCEPT_MAPS), "With two concepts: 'separate' protects each concept "
                                     "by its own attention map, as strongly as a lone concept; 'union' protects "
                                     "the area of all concept words together (one map shared by both). No effect "
                                     "with one concept.", default="separate"),
            },
        }

    def encode(self, clip, text, auxiliary_noun, concept=None, concept_phrase="", concept_2=None,
               concept_phrase_2="", auxiliary_noun_2="", concept_maps="separate"):
        node = self.DISPLAY_NAME
        check_clip(node, clip)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{node}: the prompt is empty")
        phrase, class_noun = _phrase(concept, concept_phrase)
        aux = (auxiliary_noun or "").strip() or default_aux_noun(class_noun, text)
        phrase_2, class_noun_2 = _phrase(concept_2, concept_phrase_2)
        more = ()
        if phrase_2:
            aux_2 = (auxiliary_noun_2 or "").strip() or default_aux_noun(class_noun_2, f"{text} {aux} {class_noun}")
            more = ((phrase_2, aux_2),)
        with reported(node, ValueError):
            return (encode_dci_prompt(clip, text, phrase, aux, more=more, maps=concept_maps),)


def _phrase(concept, typed: str) -> tuple[str, str]:
    """A concept's (phrase, class noun): the typed phrase if any, else the concept's."""
    phrase = (typed or "").strip() or (concept.phrase if concept is not None else "")
    class_noun = concept.class_noun if concept is not None else phrase.split()[-1] if phrase else ""
    return phrase, class_noun


class DCIKSampler:
    """The stock KSampler's inputs and behaviour, plus DCI's two-branch early phase."""

    NODE_ID = "DCIKSampler"
    DISPLAY_NAME = "DCI KSampler"
    CATEGORY = "concept/sampling"
    DESCRIPTION = (
        "Drop-in replacement of KSampler for a concept: in the noisy early part of the schedule (set by 'split') it "
        "runs the concept branch and an auxiliary branch (the prompt with a common noun instead of the concept) in one batched "
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
                "model": spec("MODEL", "The model with the concept (from DCI Load Concept)."),
                **sampler_inputs("Seed of the concept branch's noise (as in KSampler).",
                                 "Classifier-free guidance scale. At 1.0 no unconditional pass runs; the two "
                                 "conditional rows are still blended."),
                "positive": spec("CONDITIONING", "From DCI Prompt Encode."),
                "negative": spec("CONDITIONING", "The negative prompt (stock CLIP Text Encode)."),
                "latent_image": spec("LATENT", "The latent to denoise."),
                "denoise": spec("FLOAT", "As in KSampler. The split is a noise level, so a partial denoise runs two "
                                "branches only where its schedule is above it (nowhere if it starts below).",
                                default=1.0, min=0.0, max=1.0, step=0.01),
                **_dci_options(),
            },
            "optional": _advanced_options(),
        }

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               **dci):
        node = self.DISPLAY_NAME
        check_model(node, model)
        if not isinstance(latent_image, dict) or "samples" not in latent_image:
            raise ValueError(f"{node}: 'latent_image' must be a LATENT")
        guider = _guider(node, model, positive, negative, cfg, **dci)
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

    NODE_ID = "DCIGuider"
    DISPLAY_NAME = "DCI Guider"
    CATEGORY = "concept/sampling"
    DESCRIPTION = "DCI as a GUIDER for SamplerCustomAdvanced (any sampler, sigmas and noise nodes)."
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": spec("MODEL", "The model with the concept (from DCI Load Concept)."),
                "positive": spec("CONDITIONING", "From DCI Prompt Encode."),
                "negative": spec("CONDITIONING", "The negative prompt."),
                "cfg": spec("FLOAT", "Classifier-free guidance scale.", default=7.0, min=0.0, max=100.0, step=0.1,
                            round=0.01),
                **_dci_options(),
            },
            "optional": _advanced_options(),
        }

    def get_guider(self, model, positive, negative, cfg, **dci):
        return (_guider(self.DISPLAY_NAME, model, positive, negative, cfg, **dci),)


class DCIApply:
    """DCI for the stock samplers: a MODEL that runs the two-branch phase in whatever sampler samples it."""

    NODE_ID = "DCIApply"
    DISPLAY_NAME = "DCI Apply"
    CATEGORY = "concept/sampling"
    DESCRIPTION = (
        "Puts DCI on a MODEL, so that the stock KSampler, KSamplerAdvanced, SamplerCustomAdvanced (with any guider "
        "built from this MODEL) and other packs' samplers that use ComfyUI's sampling run the concept and the "
        "auxiliary branch in the noisy early part of the schedule, as DCI KSampler does with the same settings. "
        "The sampler's positive must come from DCI Prompt Encode (otherwise it samples plainly and logs one "
        "warning). split = 0 is the input MODEL's own sampling."
    )
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A copy of the MODEL that samples with DCI; the input MODEL is left unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": spec("MODEL", "The model with the concept (from DCI Load Concept)."),
                **_dci_options(),
            },
            "optional": _advanced_options(),
        }

    def apply(self, model, aux_model=None, **dci):
        node = self.DISPLAY_NAME
        plan, settings = _checked(node, model, aux_model=aux_model, **dci)
        with reported(node, DCIError):
            return (apply_dci(model, plan, settings, aux_model=aux_model),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCIPromptEncode, DCIKSampler, DCIGuiderNode, DCIApply)
