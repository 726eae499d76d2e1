"""Concept nodes: load a concept file onto a MODEL and CLIP."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..dci_core import comfy_concept, comfy_model
from ..dci_core.concept_format import SUFFIX, TRAIN_STATE_SUFFIX, ConceptFileError, load_concept

CONCEPT_TYPE = "DCI_CONCEPT"
FOLDER = "concepts"

# models/concepts, registered like ComfyUI's own model folders (extra_model_paths.yaml can add more).
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {SUFFIX})


def concept_path(name: str) -> Path:
    """The full path of a concept in the concepts folders; refuses paths that leave them."""
    if not isinstance(name, str) or not name.strip():
        raise ConceptFileError("no concept file chosen: put .safetensors concept files in models/concepts")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise ConceptFileError(f"concept name {name!r} must be a file inside models/concepts, not a path")
    full = folder_paths.get_full_path(FOLDER, name)
    if full is None:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise ConceptFileError(f"concept file {name!r} was not found in {folders}")
    return Path(full)


def concept_names() -> list[str]:
    """Concept files for the dropdown (training's resume-state files beside them are not concepts)."""
    return [n for n in folder_paths.get_filename_list(FOLDER) if not n.endswith(TRAIN_STATE_SUFFIX)]


def _check_model_and_clip(node: str, model, clip) -> None:
    if not hasattr(model, "model") or not hasattr(getattr(model, "model", None), "diffusion_model"):
        raise ValueError(f"{node}: 'model' must be a MODEL output (e.g. from Load Checkpoint)")
    if clip is not None and not hasattr(clip, "tokenize"):
        raise ValueError(f"{node}: 'clip' must be a CLIP output (e.g. from Load Checkpoint)")


def _check_strength(node: str, name: str, value) -> float:
    if not isinstance(value, (int, float)) or value != value or abs(value) > 100:
        raise ValueError(f"{node}: {name} must be a number between -100 and 100, got {value!r}")
    return float(value)


class DCILoadConcept:
    """Applies a concept to clones of MODEL and CLIP, so the stock CLIPTextEncode and KSampler use it."""

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
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model the concept was trained on (same family)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) of that model."}),
                "concept_name": (concept_names(), {"tooltip": "A concept file in models/concepts."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "Scale of the key/value deltas; 0 leaves the MODEL as it is."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "Prompt weight of the trigger's tokens, as if written "
                                                       "(trigger:weight); 0 turns the trigger word off."}),
            }
        }

    def load(self, model, clip, concept_name, strength_model, strength_clip):
        node = "DCI Load Concept"
        _check_model_and_clip(node, model, clip)
        strength_model = _check_strength(node, "strength_model", strength_model)
        strength_clip = _check_strength(node, "strength_clip", strength_clip)
        try:
            comfy_model.model_family(model)
            concept = load_concept(concept_path(concept_name))
            model_out, clip_out, _ = comfy_concept.apply_concept(
                concept, model, clip, strength_model, strength_clip, name=f"concept {concept_name!r}"
            )
        except (ConceptFileError, comfy_concept.ConceptMismatchError, comfy_model.UnsupportedModelError) as e:
            raise ValueError(f"{node}: {e}") from None
        ref = comfy_concept.ConceptRef(
            name=concept_name, trigger=concept.trigger, class_noun=concept.class_noun,
            family=concept.family, num_tokens=concept.num_tokens,
        )
        return (model_out, clip_out, ref)


NODE_CLASS_MAPPINGS = {"DCILoadConcept": DCILoadConcept}
NODE_DISPLAY_NAME_MAPPINGS = {"DCILoadConcept": "DCI Load Concept"}
