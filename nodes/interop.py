"""Concept files in and out: import Custom Diffusion results of diffusers or adobe's code, export a concept as
a stock ComfyUI LoRA + embedding or as a diffusers Custom Diffusion folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths

from ..dci_core import comfy_concept, comfy_interop, comfy_model, interop
from ..dci_core.concept_format import ConceptFileError, load_concept, sanitize_name, save_concept
from .concepts import CONCEPT_TYPE, FOLDER, _check_model_and_clip, concept_path

TARGETS = ("comfy_lora_and_embedding", "diffusers")
DIFFUSERS_OUTPUT = "custom_diffusion"  # folder under ComfyUI's output directory
_ERRORS = (ConceptFileError, comfy_concept.ConceptMismatchError, comfy_model.UnsupportedModelError, FileExistsError)


def source_roots() -> list[str]:
    """The folders an import may read from: models/concepts (all registered paths) and the input folder."""
    roots = [os.path.abspath(p) for p in folder_paths.get_folder_paths(FOLDER)]
    return roots + [os.path.abspath(folder_paths.get_input_directory())]


def source_path(source: str) -> Path:
    """The file or folder ``source`` names inside the allowed folders; refuses anything outside them."""
    if not isinstance(source, str) or not source.strip():
        raise ConceptFileError("no source given: put the Custom Diffusion file or folder into models/concepts or "
                               "the input folder and enter its name (e.g. 'my_run' or 'my_run/delta.bin')")
    raw = source.strip()
    roots = source_roots()
    if ".." in Path(raw).parts:
        raise ConceptFileError(f"source {raw!r} must be a file or folder inside {' or '.join(roots)}, without '..'")
    if os.path.isabs(raw):
        candidates = [os.path.abspath(raw)]
        if not any(os.path.commonpath([r, candidates[0]]) == r for r in roots):
            raise ConceptFileError(f"source {raw!r} is outside the folders imports may read ({', '.join(roots)}); "
                                   "move it into one of them")
    else:
        candidates = [os.path.abspath(os.path.join(r, raw)) for r in roots]
    for c in candidates:
        if c not in roots and os.path.exists(c):
            return Path(c)
    raise ConceptFileError(f"source {raw!r} was not found in {', '.join(roots)}")


def _text(value, what: str, node: str) -> str:
    if not isinstance(value, str) or "\n" in value:
        raise ValueError(f"{node}: {what} must be a single line of text, got {value!r}")
    return value.strip()


def _choice(value, what: str, choices: tuple[str, ...], node: str) -> str:
    if value not in choices:
        raise ValueError(f"{node}: {what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _flag(value, what: str, node: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{node}: {what} must be true or false, got {value!r}")
    return value


def _save(concept, file_name: str, overwrite: bool) -> tuple[Path, bool]:
    """Save into models/concepts; an existing identical concept is reused, a different one only replaced on request."""
    folder = Path(folder_paths.get_folder_paths(FOLDER)[0])
    path = folder / file_name
    if path.exists() and not overwrite:
        try:
            same = interop.same_concept(load_concept(path), concept)
        except ConceptFileError:
            same = False
        if same:
            return path, False
        raise FileExistsError(f"{path} already exists with another concept; choose another save_name or allow "
                              "overwriting")
    return save_concept(concept, folder, file_name, overwrite=overwrite), True


class DCIImportConcept:
    """Turns a Custom Diffusion result of another tool into a concept file, then loads it like DCI Load Concept."""

    CATEGORY = "concept/files"
    DESCRIPTION = (
        "Import a Custom Diffusion result (diffusers folder with pytorch_custom_diffusion_weights + <new1> token "
        "files, or adobe delta.bin, compressed or CompVis) from models/concepts or the input folder. Saves it as "
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
                "model": ("MODEL", {"tooltip": "The base model the source was trained on (same family)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) of that model."}),
                "source": ("STRING", {"default": "", "tooltip": "A file or folder inside models/concepts or the "
                                      "input folder, e.g. 'cat_run' (diffusers output folder) or 'cat_run/delta.bin'."}),
                "format": (list(interop.FORMATS), {"default": "auto", "tooltip": "auto detects from the content; "
                           "diffusers: pytorch_custom_diffusion_weights + token files; adobe: delta.bin (also "
                           "compressed and CompVis)."}),
                "trigger": ("STRING", {"default": "", "tooltip": "The word to write in prompts. Empty: the source's own "
                            "(a concept exported by this pack) or derived from the token names (<new1> → new1)."}),
                "class_noun": ("STRING", {"default": "", "tooltip": "What the concept is (dog, mug, plush toy). "
                               "Empty only when the source records it."}),
                "tokens": ("STRING", {"default": "", "tooltip": "Which modifier tokens form this concept, e.g. "
                           "'<new1>' (comma separated). Empty: all of them, in order, under one trigger word. For a "
                           "multi-concept source, import once per token."}),
                "save_name": ("STRING", {"default": "", "tooltip": "File name of the concept in models/concepts. "
                              "Empty: the source's name."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing, different concept file "
                              "of that name. An identical one is always reused."}),
            }
        }

    def import_concept(self, model, clip, source, format, trigger, class_noun, tokens, save_name, overwrite):
        node = "DCI Import Concept"
        _check_model_and_clip(node, model, clip)
        if clip is None:
            raise ValueError(f"{node}: 'clip' must be a CLIP output (e.g. from Load Checkpoint)")
        fmt = _choice(format, "format", interop.FORMATS, node)
        trigger = _text(trigger, "trigger", node)
        class_noun = _text(class_noun, "class_noun", node)
        tokens = _text(tokens, "tokens", node)
        save_name = _text(save_name, "save_name", node)
        overwrite = _flag(overwrite, "overwrite", node)
        try:
            comfy_model.model_family(model)
            src = source_path(_text(source, "source", node))
            file_name = sanitize_name(save_name or src.stem)
            concept, notes = comfy_interop.import_concept(src, fmt, model, clip, trigger, class_noun, tokens)
            path, written = _save(concept, file_name, overwrite)
            model_out, clip_out, warnings = comfy_concept.apply_concept(
                concept, model, clip, 1.0, 1.0, name=f"concept {path.name!r}"
            )
        except _ERRORS as e:
            raise ValueError(f"{node}: {e}") from None
        ref = comfy_concept.ConceptRef(name=path.name, trigger=concept.trigger, class_noun=concept.class_noun,
                                       family=concept.family, num_tokens=concept.num_tokens)
        lines = [f"{'saved' if written else 'unchanged (identical concept already there)'}: {path}",
                 f"prompt: {ref.phrase}", *notes, *warnings]
        return {"ui": {"text": ["\n".join(lines)]}, "result": (model_out, clip_out, ref)}


class DCIExportConcept:
    """Writes a concept in formats other tools load: stock ComfyUI LoRA + embedding, or diffusers Custom Diffusion."""

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
                "model": ("MODEL", {"tooltip": "The base model of the concept; diffusers export writes its weights "
                          "plus the concept's changes (patches on this MODEL are ignored)."}),
                "concept_name": (folder_paths.get_filename_list(FOLDER), {"tooltip": "A concept file in "
                                 "models/concepts (ignored when 'concept' is connected)."}),
                "target": (list(TARGETS), {"default": TARGETS[0], "tooltip": "comfy_lora_and_embedding: stock "
                           "ComfyUI nodes; diffusers: a Custom Diffusion folder for diffusers' load_attn_procs and "
                           "load_textual_inversion."}),
                "name": ("STRING", {"default": "", "tooltip": "Name of the exported files/folder. Empty: the "
                         "concept's file name."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace existing, different files of "
                              "that name. Identical ones are always left as they are."}),
                "precision": (list(interop.PRECISIONS), {"default": "exact", "tooltip": "exact: the narrowest dtype "
                              "that gives the concept back bit for bit on re-import (float64 where float32 cannot); "
                              "float32/float16: smaller files, rounded."}),
            },
            "optional": {
                "concept": (CONCEPT_TYPE, {"tooltip": "A concept from DCI Load/Import Concept; its file is exported "
                            "instead of concept_name."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, concept_name):
        # Checked when the node runs: concept_name may name a file an import earlier in the same graph creates.
        return True

    def export(self, model, concept_name, target, name, overwrite, precision, concept=None):
        node = "DCI Export Concept"
        _check_model_and_clip(node, model, None)
        target = _choice(target, "target", TARGETS, node)
        precision = _choice(precision, "precision", interop.PRECISIONS, node)
        name = _text(name, "name", node)
        overwrite = _flag(overwrite, "overwrite", node)
        if concept is not None:
            if not isinstance(concept, comfy_concept.ConceptRef):
                raise ValueError(f"{node}: 'concept' must come from DCI Load Concept or DCI Import Concept")
            concept_name = concept.name
        try:
            src = concept_path(concept_name)
            data = load_concept(src)
            stem = re.sub(r"\s+", "_", sanitize_name(name or src.stem)[: -len(".safetensors")])
            if target == "diffusers":
                folder = Path(folder_paths.get_output_directory()) / DIFFUSERS_OUTPUT / stem
                results = comfy_interop.export_diffusers(data, model, folder, overwrite, precision)
                usage = f"diffusers prompt: {' '.join(interop.export_token_names(data))} {data.class_noun}"
            else:
                lora = Path(folder_paths.get_folder_paths("loras")[0]) / f"{stem}.safetensors"
                emb = Path(folder_paths.get_folder_paths("embeddings")[0]) / f"{stem}.safetensors"
                results = comfy_interop.export_lora_and_embedding(data, model, lora, emb, overwrite, precision)
                usage = f"LoraLoaderModelOnly: {lora.name}; prompt: embedding:{stem} {data.class_noun}"
        except _ERRORS as e:
            raise ValueError(f"{node}: {e}") from None
        paths = "\n".join(str(p) for p, _ in results)
        shown = [f"{'written' if w else 'unchanged'}: {p}" for p, w in results] + [usage]
        return {"ui": {"text": ["\n".join(shown)]}, "result": (paths,)}


NODE_CLASS_MAPPINGS = {"DCIImportConcept": DCIImportConcept, "DCIExportConcept": DCIExportConcept}
NODE_DISPLAY_NAME_MAPPINGS = {"DCIImportConcept": "DCI Import Concept", "DCIExportConcept": "DCI Export Concept"}
