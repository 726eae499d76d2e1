"""Layout-and-Retouch nodes: the two prompts, step-blended sampling, reference inversion, the retouch MODEL."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch

from ..comfyui.model import UnsupportedModelError, model_family
from ..comfyui.retouch.inversion import invert_latent
from ..comfyui.retouch.layout import step_blended_sample
from ..comfyui.retouch.wrapper import retouch_model
from ..comfyui.sampling.prompt import DCIError, dci_prompt_of, encode_dci_prompt
from ..method.retouch import RetouchError, RetouchSettings, Trajectory, switch_step
from ..method.token_spans import default_aux_noun, phrase_occurrences, replace_phrase
from .common import check_clip, check_model, check_vae, register, reported, sampler_inputs, shown, spec
from .concepts import CONCEPT_TYPE

TRAJECTORY_TYPE = "DCI_TRAJECTORY"
RETOUCH = RetouchSettings()  # the defaults of every retouch input (this project's choices, docs/retouch.md)
SWITCH = 0.3  # the default share of the steps the vanilla model runs (this project's choice)
INVERSION_STEPS, INVERSION_REFINE = 20, 2
ERRORS = (RetouchError, DCIError, UnsupportedModelError)


def _check_family(node: str, model, other, other_name: str) -> str:
    with reported(node, *ERRORS):
        family, other_family = model_family(model), model_family(other)
    if family != other_family:
        raise ValueError(f"{node}: '{other_name}' is a {other_family} model but 'model' is {family}: both must be of "
                         "the same family (e.g. the checkpoint before and after DCI Load Concept)")
    return family


def _check_latent(node: str, value, name: str = "latent_image") -> None:
    if not isinstance(value, dict) or not isinstance(value.get("samples"), torch.Tensor):
        raise ValueError(f"{node}: '{name}' must be a LATENT")


def _check_trajectory(node: str, value, name: str) -> Trajectory:
    if not isinstance(value, Trajectory):
        raise ValueError(f"{node}: '{name}' must be a trajectory from DCI Layout KSampler or DCI Invert Reference")
    return value


class DCILayoutPromptEncode:
    """The concept prompt and the same prompt without the identifier, for step-blended sampling."""

    NODE_ID = "DCILayoutPromptEncode"
    DISPLAY_NAME = "DCI Layout Prompt Encode"
    CATEGORY = "concept/retouch"
    DESCRIPTION = (
        "Layout-and-Retouch, stage 1 prompts: write one prompt with the concept phrase (e.g. 'a photo of sks dog "
        "on the beach'). 'positive' is that prompt (it also carries the concept's tokens, for DCI Retouch Model's "
        "subject mask and for DCI KSampler); 'layout_positive' is the same prompt with the trigger word removed "
        "('a photo of dog on the beach'), for the vanilla model's first steps."
    )
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "layout_positive")
    OUTPUT_TOOLTIPS = ("The prompt with the concept (personalised model).",
                       "The prompt without the trigger word (vanilla model).")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": spec("CLIP", "The CLIP from DCI Load Concept (it knows the trigger word)."),
                "concept": spec(CONCEPT_TYPE, "From DCI Load Concept: its trigger word and class noun."),
                "text": spec("STRING", "The prompt, containing the concept phrase (trigger word + class noun).",
                             multiline=True, dynamicPrompts=True),
            },
        }

    def encode(self, clip, concept, text):
        node = self.DISPLAY_NAME
        check_clip(node, clip)
        if not hasattr(concept, "phrase"):
            raise ValueError(f"{node}: 'concept' must come from DCI Load Concept")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{node}: the prompt is empty")
        if not phrase_occurrences(text, concept.phrase):
            raise ValueError(f"{node}: the concept's trigger phrase {concept.phrase!r} is not in the prompt {text!r}; "
                             f"write it there as whole words, e.g. 'a photo of {concept.phrase} on the beach'")
        layout_text = replace_phrase(text, concept.phrase, concept.class_noun)
        with reported(node, DCIError, ValueError):
            positive = encode_dci_prompt(clip, text, concept.phrase, default_aux_noun(concept.class_noun, text))
            layout = clip.encode_from_tokens_scheduled(clip.tokenize(layout_text))
        return (positive, layout)


class DCILayoutKSampler:
    """Step-blended sampling: the vanilla model lays the scene out, the personalised model finishes it."""

    NODE_ID = "DCILayoutKSampler"
    DISPLAY_NAME = "DCI Layout KSampler"
    CATEGORY = "concept/retouch"
    DESCRIPTION = (
        "Layout-and-Retouch, stage 1 (step-blended sampling): the vanilla MODEL runs the first 'switch' share of "
        "the steps with the prompt without the trigger word, then the personalised MODEL finishes with the full "
        "prompt, on the same noise schedule (ComfyUI's own sampling, any sampler and scheduler). The result is a "
        "context image whose layout follows the prompt as the vanilla model would. switch = 0 is the stock "
        "KSampler on the personalised model. Also returns the latent at every step, for DCI Retouch Model."
    )
    RETURN_TYPES = ("LATENT", TRAJECTORY_TYPE)
    RETURN_NAMES = ("context", "trajectory")
    OUTPUT_TOOLTIPS = ("The context latent.", "The latent at every sigma of the run (for DCI Retouch Model).")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": spec("MODEL", "The personalised model (from DCI Load Concept or DCI Train Concept)."),
                "vanilla_model": spec("MODEL", "The model without the concept (the checkpoint), same family."),
                **sampler_inputs(),
                "positive": spec("CONDITIONING", "The prompt with the concept (personalised model)."),
                "layout_positive": spec("CONDITIONING", "The prompt without the trigger word (vanilla model), e.g. "
                                        "from DCI Layout Prompt Encode."),
                "negative": spec("CONDITIONING", "The negative prompt (both models)."),
                "latent_image": spec("LATENT", "The latent to denoise."),
                "denoise": spec("FLOAT", "As in KSampler.", default=1.0, min=0.0, max=1.0, step=0.01),
                "switch": spec("FLOAT", "λ1: the share of the steps the vanilla model runs (rounded to whole steps). "
                               f"0 = the personalised model only; 1 = the vanilla model only. Default {SWITCH} is "
                               "this project's choice (the paper's value could not be read).", default=SWITCH,
                               min=0.0, max=1.0, step=0.05),
            },
        }

    def sample(self, model, vanilla_model, seed, steps, cfg, sampler_name, scheduler, positive, layout_positive,
               negative, latent_image, denoise, switch):
        node = self.DISPLAY_NAME
        check_model(node, model)
        check_model(node, vanilla_model, "vanilla_model")
        _check_family(node, model, vanilla_model, "vanilla_model")
        _check_latent(node, latent_image)
        with reported(node, RetouchError):
            switch_step(switch, steps)
        with reported(node, RetouchError):
            return step_blended_sample(model, vanilla_model, positive, layout_positive, negative, seed, steps, cfg,
                                       sampler_name, scheduler, latent_image, denoise, switch)


class DCIInvertReference:
    """Deterministic inversion of a reference image: its latent at every sigma of a schedule."""

    NODE_ID = "DCIInvertReference"
    DISPLAY_NAME = "DCI Invert Reference"
    CATEGORY = "concept/retouch"
    DESCRIPTION = (
        "Layout-and-Retouch, the reference: inverts an image deterministically (DDIM-style Euler steps of the "
        "probability-flow ODE, optionally refined by fixed-point iterations) with the MODEL and the prompt, "
        "keeping the latent at every sigma of the schedule; then regenerates the image from the inverted noise "
        "and reports how far the round trip lands from the input (lower is a more faithful trajectory). Also "
        "inverts any other image, e.g. a context image made by DCI KSampler, for DCI Retouch Model's context."
    )
    RETURN_TYPES = (TRAJECTORY_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("trajectory", "round_trip", "report")
    OUTPUT_TOOLTIPS = ("The image's latent at every sigma of the schedule.",
                       "The image regenerated from the inverted noise (Euler steps).",
                       "The round trip's error.")
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": spec("MODEL", "The model that will use the trajectory (e.g. the personalised model)."),
                "vae": spec("VAE", "Encodes the image."),
                "image": spec("IMAGE", "The reference image (one or a batch); its size must be the generated "
                              "image's size."),
                "positive": spec("CONDITIONING", "The prompt the inversion follows (e.g. 'a photo of sks dog'); "
                                 "inversion is conditional only (CFG 1)."),
                "steps": spec("INT", "Steps of the schedule; use the retouch pass's steps and scheduler so every "
                              "sigma is stored (others are interpolated).", default=INVERSION_STEPS, min=1,
                              max=1000),
                "scheduler": spec(comfy.samplers.KSampler.SCHEDULERS, "The schedule's scheduler."),
                "refine": spec("INT", "Fixed-point iterations per step: each re-evaluates the model at the new "
                               f"point, making the step closer to the exact inverse of a sampling step. Default "
                               f"{INVERSION_REFINE} is this project's choice.", default=INVERSION_REFINE, min=0,
                               max=10),
            },
        }

    def invert(self, model, vae, image, positive, steps, scheduler, refine):
        node = self.DISPLAY_NAME
        check_model(node, model)
        check_vae(node, vae)
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (3, 4):
            raise ValueError(f"{node}: 'image' must be an IMAGE")
        with reported(node, *ERRORS):
            model_family(model)
        h, w = image.shape[1:3]
        if h % 8 or w % 8:
            raise ValueError(f"{node}: the image is {w}×{h} px; its sides must be multiples of 8 (resize or crop "
                             "it to the size you generate at)")
        samples = vae.encode(image[..., :3])
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        with reported(node, *ERRORS):
            result = invert_latent(model, positive, samples, int(steps), scheduler, int(refine))
        decoded = vae.decode(result.round_trip)
        if decoded.dim() == 5:
            decoded = decoded.reshape(-1, *decoded.shape[-3:])
        pixel = float((decoded.float().cpu().clamp(0, 1) - image[..., :3].float().cpu()).abs().mean())
        report = (f"round trip ({steps} steps, {scheduler}, refine {refine}): latent RMS error "
                  f"{result.latent_rms_error:.4f} ({100 * result.relative_error:.1f}% of the latent's RMS), "
                  f"mean absolute pixel error {pixel:.4f}")
        return shown(report, result.trajectory, decoded, report)


class DCIRetouchModel:
    """The MODEL patch for the retouch pass (stage 2)."""

    NODE_ID = "DCIRetouchModel"
    DISPLAY_NAME = "DCI Retouch Model"
    CATEGORY = "concept/retouch"
    DESCRIPTION = (
        "Layout-and-Retouch, stage 2: a copy of the personalised MODEL for the retouch pass. Sample it with the "
        "stock KSampler (the context's steps, sampler and scheduler): the pass begins at 'start' from the "
        "context's latent there (the steps before are the context's own, so its layout stays), and until 'end' "
        "self-attention in the decoder's finest levels takes keys and values from the reference's trajectory "
        "inside the subject mask and from the context's trajectory outside it. The mask comes from the concept "
        "tokens' cross-attention at the previous step (or from 'mask'). The input MODEL is unchanged."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The retouching copy of the model (sample it with the stock KSampler).",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": spec("MODEL", "The personalised model."),
                "reference": spec(TRAJECTORY_TYPE, "From DCI Invert Reference (the subject's photo)."),
                "context": spec(TRAJECTORY_TYPE, "From DCI Layout KSampler (or DCI Invert Reference on another "
                                "context image)."),
                "mask_threshold": spec("FLOAT", "A pixel is the subject where its cross-attention to the concept's "
                                       "tokens reaches this share of the image's maximum (the previous step's map, "
                                       f"averaged over layers). Default {RETOUCH.threshold} is this project's "
                                       "choice.", default=RETOUCH.threshold, min=0.01, max=1.0, step=0.01),
                "start": spec("FLOAT", "The retouch pass begins at this share of the noise schedule, from the "
                              "context's latent there (the steps before are the context's: its layout); 0 = from "
                              f"the context's noise. Default {RETOUCH.start} is this project's choice.", default=RETOUCH.start, min=0.0,
                              max=1.0, step=0.01),
                "end": spec("FLOAT", "The attention swap ends at this share of the noise schedule (1 = the last "
                            "step); the steps after it run unswapped. "
                            f"Default {RETOUCH.end} is this project's choice.", default=RETOUCH.end, min=0.0,
                            max=1.0, step=0.01),
                "decoder_levels": spec("INT", "How many of the decoder's finest resolution levels swap "
                                       "self-attention (counted from the model). Default "
                                       f"{RETOUCH.decoder_levels} is this project's choice.",
                                       default=RETOUCH.decoder_levels, min=1, max=8),
            },
            "optional": {
                "positive": spec("CONDITIONING", "From DCI Layout Prompt Encode or DCI Prompt Encode: tells where "
                                 "the concept's tokens are, for the mask. Not needed with 'mask'."),
                "mask": spec("MASK", "Optional: the subject's mask, used as it is instead of cross-attention."),
            },
        }

    def patch(self, model, reference, context, mask_threshold, start, end, decoder_levels, positive=None, mask=None):
        node = self.DISPLAY_NAME
        check_model(node, model)
        reference = _check_trajectory(node, reference, "reference")
        context = _check_trajectory(node, context, "context")
        with reported(node, *ERRORS):
            family = model_family(model)
            settings = RetouchSettings(threshold=float(mask_threshold), start=float(start), end=float(end),
                                       decoder_levels=int(decoder_levels))
        for name, t in (("reference", reference), ("context", context)):
            if t.family != family:
                raise ValueError(f"{node}: the {name} trajectory was made with a {t.family} model but 'model' is "
                                 f"{family}; make it with this model's family")
        if reference.latent_shape != context.latent_shape:
            (_, rh, rw), (_, ch, cw) = reference.latent_shape, context.latent_shape
            raise ValueError(f"{node}: the reference image is {rw * 8}×{rh * 8} px but the context is {cw * 8}×{ch * 8} "
                             "px: resize the reference to the context's size before DCI Invert Reference")
        tokens = None
        if mask is None:
            if positive is None:
                raise ValueError(f"{node}: connect 'positive' (from DCI Layout Prompt Encode) so the subject mask "
                                 "can be found from the concept's tokens, or connect a 'mask'")
            with reported(node, DCIError):
                tokens = dci_prompt_of(positive)[1].concept_mask
        elif not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
            raise ValueError(f"{node}: 'mask' must be a MASK")
        else:
            mask = mask if mask.dim() == 3 else mask[None]
        with reported(node, *ERRORS):
            patched = retouch_model(model, reference, context, settings, subject_tokens=tokens, mask=mask)
        return (patched,)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCILayoutPromptEncode, DCILayoutKSampler,
                                                           DCIInvertReference, DCIRetouchModel)
