"""The folders ComfyUI knows and this pack uses: models/concepts and models/concept_encoders (registered here),
import sources, exports.

``models/concepts`` and ``models/concept_encoders`` are registered like ComfyUI's own model folders (extra_model_paths.yaml can add more).
Every name a node receives is resolved here and refused when it would leave its folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..files.concept import SUFFIX, TRAIN_STATE_SUFFIX, ConceptFileError

CONCEPTS = "concepts"
CONCEPT_ENCODERS = "concept_encoders"  # concept-encoder weights (DCI Load Concept Encoder)
DIFFUSERS_OUTPUT = "custom_diffusion"  # folder under ComfyUI's output directory

if CONCEPTS not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[CONCEPTS] = ([os.path.join(folder_paths.models_dir, CONCEPTS)], {SUFFIX})
if CONCEPT_ENCODERS not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[CONCEPT_ENCODERS] = (
        [os.path.join(folder_paths.models_dir, CONCEPT_ENCODERS)], {SUFFIX})


def concepts_folder() -> Path:
    """Where new concept files are written: the first registered concepts folder."""
    return Path(folder_paths.get_folder_paths(CONCEPTS)[0])


def concept_names() -> list[str]:
    """Concept files for the dropdowns (training's resume-state files beside them are not concepts)."""
    return [n for n in folder_paths.get_filename_list(CONCEPTS) if not n.endswith(TRAIN_STATE_SUFFIX)]


def concept_path(name: str) -> Path:
    """The full path of a concept in the concepts folders; refuses paths that leave them."""
    if not isinstance(name, str) or not name.strip():
        raise ConceptFileError("no concept file chosen: put .safetensors concept files in models/concepts")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise ConceptFileError(f"concept name {name!r} must be a file inside models/concepts, not a path")
    full = folder_paths.get_full_path(CONCEPTS, name)
    if full is None:
        folders = ", ".join(folder_paths.get_folder_paths(CONCEPTS))
        raise ConceptFileError(f"concept file {name!r} was not found in {folders}")
    return Path(full)


def source_roots() -> list[str]:
    """The folders an import may read from: models/concepts (all registered paths) and the input folder."""
    roots = [os.path.abspath(p) for p in folder_paths.get_folder_paths(CONCEPTS)]
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


def export_paths(stem: str) -> tuple[Path, Path, Path]:
    """(LoRA file, embedding file, diffusers folder) an export named ``stem`` writes."""
    lora = Path(folder_paths.get_folder_paths("loras")[0]) / f"{stem}.safetensors"
    embedding = Path(folder_paths.get_folder_paths("embeddings")[0]) / f"{stem}.safetensors"
    diffusers = Path(folder_paths.get_output_directory()) / DIFFUSERS_OUTPUT / stem
    return lora, embedding, diffusers


def embedding_folders() -> list[str]:
    return folder_paths.get_folder_paths("embeddings")


def checkpoint_names() -> list[str]:
    return folder_paths.get_filename_list("checkpoints")


def checkpoint_path(name: str) -> Path | None:
    full = folder_paths.get_full_path("checkpoints", name)
    return Path(full) if full is not None else None
