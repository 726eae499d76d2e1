"""Concept nodes: load a concept file onto a MODEL and CLIP."""

from __future__ import annotations

from ..comfyui.concept import ConceptRef, apply_concept
from ..comfyui.folders import concept_names, concept_path
from ..comfyui.model import UnsupportedModelError, model_family
from ..comfyui.tokenizer import ConceptMismatchError
from ..files.concept import ConceptFileError, load_concept
from .common import check_clip, check_model, check_number, register, reported, spec

CONCEPT_TYPE = "DCI_CONCEPT"
STRENGTH_LIMIT = 100.0
CONCEPT_ERRORS = (ConceptFileError, ConceptMismatchError, UnsupportedModelError)


class DCILoadConcept:
    """Applies a concept to clones of MODEL and CLIP, so the stock CLIPTextEncode and KSampler use it."""

    NODE_ID = "DCILoadConcept"
    DISPLAY_NAME = "DCI Load Concept"
    CATEGORY = "concept"
    DESCRIPTION = (
        "Load a concept (.safetensors from models/concepts): adds its cross-attention key/value deltas to a "
        "copy of the MODEL and teaches a copy of the CLIP its trigger word. Type the trigger word followed by "
        "the class noun in any prompt (e.g. 'a photo of sks dog on the beach'). The inputs stay unchanged; "
        "loaders chain for several concepts."
    )
    RETURN_TYPES = ("MODEL", "CLIP", CONCEPT_TYPE)
    RETURN_NAMES = ("model", "clip", "concept")
    OUTPUT_TOOLTIPS = (
        "The MODEL with the concept's key/value deltas.",
        "The CLIP that knows the trigger word.",
        "Trigger word and class noun, for the DCI sampler.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        strength = {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01}
        return {
            "required": {
                "model": spec("MODEL", "The base model the concept was trained on (same family)."),
                "clip": spec("CLIP", "The text encoder(s) of that model."),
                "concept_name": spec(concept_names(), "A concept file in models/concepts."),
                "strength_model": spec("FLOAT", "Scale of the key/value deltas; 0 leaves the MODEL as it is.",
                                       **strength),
                "strength_clip": spec("FLOAT", "Prompt weight of the trigger's tokens, as if written "
                                               "(trigger:weight); 0 turns the trigger word off.", **strength),
            }
        }

    def load(self, model, clip, concept_name, strength_model, strength_clip):
        node = self.DISPLAY_NAME
        check_model(node, model)
        check_clip(node, clip)
        strength_model = check_number(node, "strength_model", strength_model, STRENGTH_LIMIT)
        strength_clip = check_number(node, "strength_clip", strength_clip, STRENGTH_LIMIT)
        with reported(node, *CONCEPT_ERRORS):
            model_family(model)
            concept = load_concept(concept_path(concept_name))
            model_out, clip_out, _ = apply_concept(concept, model, clip, strength_model, strength_clip,
                                                   name=f"concept {concept_name!r}")
        return (model_out, clip_out, ConceptRef.of(concept_name, concept))


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCILoadConcept)
