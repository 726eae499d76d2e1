"""Concept-encoder nodes: load an encoder, and turn a few images of an object into a concept without training."""

from __future__ import annotations

import logging
import time

from ..comfyui import concept_encoder as ce
from ..comfyui.concept import apply_concept
from ..comfyui.folders import concepts_folder
from ..files.concept import ConceptFileError, check_trigger, save_or_reuse
from ..files.concept_encoder import EncoderFileError
from .common import check_clip, check_flag, check_model, check_text, register, reported, spec
from .concepts import CONCEPT_ERRORS, CONCEPT_TYPE

log = logging.getLogger(__name__)
ENCODER_TYPE = "DCI_CONCEPT_ENCODER"


class DCILoadConceptEncoder:
    """Loads a concept encoder: the network that maps images of an object to its trigger's token rows."""

    NODE_ID = "DCILoadConceptEncoder"
    DISPLAY_NAME = "DCI Load Concept Encoder"
    CATEGORY = "concept/encoder"
    DESCRIPTION = (
        "Load a concept encoder (.safetensors from models/concept_encoders; the toy-world one is bundled). "
        "An encoder turns a few photos of an object into the token rows of a trigger word in one forward pass, "
        "with no training (after Taming Encoder). It writes tokens for the model family and text-encoder width "
        "it was trained for; DCI Encode Concept checks that against the MODEL and CLIP."
    )
    RETURN_TYPES = (ENCODER_TYPE,)
    RETURN_NAMES = ("encoder",)
    OUTPUT_TOOLTIPS = ("The concept encoder, for DCI Encode Concept.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder_name": spec(ce.encoder_names(), f"'{ce.BUNDLED_NAME}' is bundled with the pack (for the "
                                     "toy-world model); other encoders go in models/concept_encoders.",
                                     default=ce.BUNDLED_NAME),
            }
        }

    def load(self, encoder_name):
        with reported(self.DISPLAY_NAME, EncoderFileError, ConceptFileError):
            return (ce.load(encoder_name),)


class DCIEncodeConcept:
    """Images of an object → MODEL and CLIP clones that know its trigger word, and a concept, in milliseconds."""

    NODE_ID = "DCIEncodeConcept"
    DISPLAY_NAME = "DCI Encode Concept"
    CATEGORY = "concept/encoder"
    DESCRIPTION = (
        "Turn 1-N photos of one object into a concept without training: the concept encoder reads them and "
        "writes the token rows of the trigger word (no key/value changes). Returns copies of MODEL and CLIP "
        "with the concept loaded, exactly as DCI Load Concept loads a file, so DCI Prompt Encode, DCI KSampler "
        "and the stock CLIP Text Encode + KSampler use it; with a save name it is also saved to "
        "models/concepts as an ordinary concept file (export, DCI Load Concept and DCI Train Concept's "
        "start_concept accept it). Images that are not square are centre-cropped; every image is resized to "
        "the encoder's size."
    )
    RETURN_TYPES = ("MODEL", "CLIP", CONCEPT_TYPE, "STRING")
    RETURN_NAMES = ("model", "clip", "concept", "report")
    OUTPUT_TOOLTIPS = (
        "The MODEL (a copy; encoded concepts change no weights).",
        "The CLIP that knows the trigger word.",
        "Trigger word and class noun, for the DCI sampler (and DCI Train Concept's start_concept).",
        "What was done: images read, resizing, time, the file written.",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": spec("MODEL", "The model the encoder was trained for (same family); it is not modified."),
                "clip": spec("CLIP", "Its text encoder; it is not modified."),
                "encoder": spec(ENCODER_TYPE, "A concept encoder from DCI Load Concept Encoder."),
                "images": spec("IMAGE", "Photos of the object (1-8 is typical), as one IMAGE batch."),
                "class_noun": spec("STRING", "What the object is, in one or two words (in the toy world: its "
                                   "shape, e.g. circle).", default="circle"),
                "trigger_word": spec("STRING", "The made-up word that stands for the object in prompts: 'a sks "
                                     "circle at the left'.", default="sks"),
                "save_name": spec("STRING", "File name in models/concepts; empty: the concept is not saved.",
                                  default="encoded_concept"),
                "overwrite": spec("BOOLEAN", "Replace an existing, different concept of that name (an identical "
                                  "one is reused).", default=False),
            }
        }

    def encode(self, model, clip, encoder, images, class_noun, trigger_word, save_name, overwrite):
        node = self.DISPLAY_NAME
        check_model(node, model)
        check_clip(node, clip)
        if not isinstance(encoder, ce.LoadedEncoder):
            raise ValueError(f"{node}: 'encoder' must come from DCI Load Concept Encoder")
        class_noun = check_text(node, "class_noun", class_noun)
        trigger = check_text(node, "trigger_word", trigger_word)
        save_name = check_text(node, "save_name", save_name)
        overwrite = check_flag(node, "overwrite", overwrite)
        if not class_noun:
            raise ValueError(f"{node}: the class noun is empty: name what the object is (in the toy world, its shape)")
        with reported(node, EncoderFileError, FileExistsError, *CONCEPT_ERRORS):
            check_trigger(trigger)
            for w in ce.check_encoder(encoder, model, clip):
                log.warning(w)
            t0 = time.perf_counter()
            concept, resized = ce.encode(encoder, images, trigger, class_noun, model)
            ms = (time.perf_counter() - t0) * 1000
            name = f"(unsaved) {trigger}"
            saved = "not saved (no save name)"
            if save_name:
                path, written = save_or_reuse(concept, concepts_folder(), save_name, overwrite)
                name = path.name
                saved = f"saved as {path.name}" if written else f"identical to {path.name} (kept)"
            model_out, clip_out, _ = apply_concept(concept, model, clip, name=f"encoded concept {trigger!r}")
        report = (f"{images.shape[0]} image(s) encoded in {ms:.1f} ms into {concept.num_tokens} token rows for "
                  f"'{trigger} {class_noun}'; images: {resized or 'used as they are'}; {saved}")
        ref = ce.EncodedConceptRef(name=name, trigger=trigger, class_noun=class_noun, family=concept.family,
                                   num_tokens=concept.num_tokens, concept=concept)
        return (model_out, clip_out, ref, report)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCILoadConceptEncoder, DCIEncodeConcept)
