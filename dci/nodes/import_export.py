"""Concept files in and out: import Custom Diffusion results of diffusers or adobe's code, export a concept as
a stock ComfyUI LoRA + embedding or as a diffusers Custom Diffusion folder."""

from __future__ import annotations

import re

from ..comfyui import import_export
from ..comfyui.concept import ConceptRef, apply_concept
from ..comfyui.folders import concept_names, concept_path, concepts_folder, export_paths, source_path
from ..comfyui.model import model_family
from ..files.concept import load_concept, sanitize_name, save_or_reuse
from ..files.convert import EXPORT_PRECISIONS, export_token_names
from ..files.foreign import FORMATS
from .common import (
    check_choice,
    check_clip,
    check_flag,
    check_model,
    check_text,
    register,
    reported,
    shown,
    spec,
)
from .concepts import CONCEPT_ERRORS, CONCEPT_TYPE

TARGETS = ("comfy_lora_and_embedding", "diffusers")
FILE_ERRORS = (*CONCEPT_ERRORS, FileExistsError)


class DCIImportConcept:
    """Turns a Custom Diffusion result of another tool into a concept file, then loads it like DCI Load Concept."""

    NODE_ID = "DCIImportConcept"
    DISPLAY_NAME = "DCI Import Concept"
    CATEGORY = "concept/files"
    DESCRIPTION = (
        "Import a Custom Diffusion result (diffusers folder with pytorch_custom_diffusion_weights + <new1> token "
        "files, or adobe delta.bin, compressed or CompVis), or the vectors of the official Infusion code, from "
        "models/concepts or the input folder. Saves it as "
        "a concept file in models/concepts (key/value changes relative to this MODEL's weights) and applies it "
        "to copies of MODEL and CLIP: write the trigger word and the class noun in a prompt."
    )
    RETURN_TYPES = ("MODEL", "CLIP", CONCEPT_TYPE)
    RETURN_NAMES = ("model", "clip", "concept")
    OUTPUT_TOOLTIPS = (
        "The MODEL with the imported concept's key/value changes.",
        "The CLIP that knows the trigger word.",
        "Trigger word and class noun, for the DCI sampler and DCI Export Concept.",
    )
    FUNCTION = "import_concept"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": spec("MODEL", "The base model the source was trained on (same family)."),
                "clip": spec("CLIP", "The text encoder(s) of that model."),
                "source": spec("STRING", "A file or folder inside models/concepts or the input folder, e.g. "
                               "'cat_run' (diffusers output folder) or 'cat_run/delta.bin'.", default=""),
                "format": spec(list(FORMATS), "auto detects from the content; diffusers: "
                               "pytorch_custom_diffusion_weights + token files; adobe: delta.bin (also compressed "
                               "and CompVis); infusion: the official Infusion code's target_output vectors (give a "
                               "trigger word and the class noun it was trained with).", default="auto"),
                "trigger": spec("STRING", "The word to write in prompts. Empty: the source's own (a concept "
                                "exported by this pack) or derived from the token names (<new1> → new1).", default=""),
                "class_noun": spec("STRING", "What the concept is (dog, mug, plush toy). Empty only when the "
                                   "source records it.", default=""),
                "tokens": spec("STRING", "Which modifier tokens form this concept, e.g. '<new1>' (comma "
                               "separated). Empty: all of them, in order, under one trigger word. For a "
                               "multi-concept source, import once per token.", default=""),
                "save_name": spec("STRING", "File name of the concept in models/concepts. Empty: the source's "
                                  "name.", default=""),
                "overwrite": spec("BOOLEAN", "Replace an existing, different concept file of that name. An "
                                  "identical one is always reused.", default=False),
            }
        }

    def import_concept(self, model, clip, source, format, trigger, class_noun, tokens, save_name, overwrite):
        node = self.DISPLAY_NAME
        check_model(node, model)
        check_clip(node, clip)
        fmt = check_choice(node, "format", format, FORMATS)
        trigger = check_text(node, "trigger", trigger)
        class_noun = check_text(node, "class_noun", class_noun)
        tokens = check_text(node, "tokens", tokens)
        save_name = check_text(node, "save_name", save_name)
        overwrite = check_flag(node, "overwrite", overwrite)
        with reported(node, *FILE_ERRORS):
            model_family(model)
            src = source_path(check_text(node, "source", source))
            file_name = sanitize_name(save_name or src.stem)
            concept, notes = import_export.import_concept(src, fmt, model, clip, trigger, class_noun, tokens)
            path, written = save_or_reuse(concept, concepts_folder(), file_name, overwrite)
            model_out, clip_out, warnings = apply_concept(concept, model, clip, 1.0, 1.0, name=f"concept {path.name!r}")
        ref = ConceptRef.of(path.name, concept)
        lines = [f"{'saved' if written else 'unchanged (identical concept already there)'}: {path}",
                 f"prompt: {ref.phrase}", *notes, *warnings]
        return shown("\n".join(lines), model_out, clip_out, ref)


class DCIExportConcept:
    """Writes a concept in formats other tools load: stock ComfyUI LoRA + embedding, or diffusers Custom Diffusion."""

    NODE_ID = "DCIExportConcept"
    DISPLAY_NAME = "DCI Export Concept"
    CATEGORY = "concept/files"
    DESCRIPTION = (
        "Export a concept file. comfy_lora_and_embedding: models/loras/<name>.safetensors (key/value changes as "
        ".diff entries for the stock LoraLoaderModelOnly) and models/embeddings/<name>.safetensors (write "
        "'embedding:<name> <class noun>' in a stock prompt). diffusers: output/custom_diffusion/<name>/ with "
        "pytorch_custom_diffusion_weights.safetensors (full key/value weights for this MODEL) and one token file "
        "per token. Only .safetensors is written, atomically; existing different files only with overwrite."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("paths",)
    OUTPUT_TOOLTIPS = ("The written (or identical, already present) files, one per line.",)
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": spec("MODEL", "The base model of the concept; diffusers export writes its weights plus "
                              "the concept's changes (patches on this MODEL are ignored)."),
                "concept_name": spec(concept_names(), "A concept file in models/concepts (ignored when 'concept' "
                                     "is connected)."),
                "target": spec(list(TARGETS), "comfy_lora_and_embedding: stock ComfyUI nodes; diffusers: a Custom "
                               "Diffusion folder for diffusers' load_attn_procs and load_textual_inversion.",
                               default=TARGETS[0]),
                "name": spec("STRING", "Name of the exported files/folder. Empty: the concept's file name.",
                             default=""),
                "overwrite": spec("BOOLEAN", "Replace existing, different files of that name. Identical ones are "
                                  "always left as they are.", default=False),
                "precision": spec(list(EXPORT_PRECISIONS), "exact: the narrowest dtype that gives the concept back "
                                  "bit for bit on re-import (float64 where float32 cannot); float32/float16: "
                                  "smaller files, rounded.", default="exact"),
            },
            "optional": {
                "concept": spec(CONCEPT_TYPE, "A concept from DCI Load/Import Concept; its file is exported "
                                "instead of concept_name."),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, concept_name):
        # Checked when the node runs: concept_name may name a file an import earlier in the same graph creates.
        return True

    def export(self, model, concept_name, target, name, overwrite, precision, concept=None):
        node = self.DISPLAY_NAME
        check_model(node, model)
        target = check_choice(node, "target", target, TARGETS)
        precision = check_choice(node, "precision", precision, EXPORT_PRECISIONS)
        name = check_text(node, "name", name)
        overwrite = check_flag(node, "overwrite", overwrite)
        if concept is not None:
            if not isinstance(concept, ConceptRef):
                raise ValueError(f"{node}: 'concept' must come from DCI Load Concept or DCI Import Concept")
            concept_name = concept.name
        with reported(node, *FILE_ERRORS):
            src = concept_path(concept_name)
            data = load_concept(src)
            stem = re.sub(r"\s+", "_", sanitize_name(name or src.stem)[: -len(".safetensors")])
            lora, embedding, folder = export_paths(stem)
            if target == "diffusers":
                results = import_export.export_diffusers(data, model, folder, overwrite, precision)
                usage = f"diffusers prompt: {' '.join(export_token_names(data))} {data.class_noun}"
            else:
                results = import_export.export_lora_and_embedding(data, model, lora, embedding, overwrite, precision)
                usage = f"LoraLoaderModelOnly: {lora.name}; prompt: embedding:{stem} {data.class_noun}"
        paths = "\n".join(str(p) for p, _ in results)
        lines = [f"{'written' if w else 'unchanged'}: {p}" for p, w in results] + [usage]
        return shown("\n".join(lines), paths)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCIImportConcept, DCIExportConcept)
