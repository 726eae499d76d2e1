"""Custom Diffusion files ↔ concepts for a ComfyUI MODEL/CLIP: the part of import/export that touches ComfyUI.

Key names are translated with ComfyUI's own UNet mapping (``comfy.utils.unet_to_diffusers`` on the MODEL's
``unet_config``, the table its LoRA loader uses), so every UNet layout ComfyUI can describe works without a
hard-coded block list. The file formats live in ``dci.files.foreign``, the arithmetic in ``dci.files.convert``.
"""

from __future__ import annotations

from pathlib import Path

import comfy.utils

from ..files import convert, foreign
from ..files.atomic import write_files, write_folder
from ..files.concept import Concept, ConceptFileError
from .concept import base_fingerprint, base_kv_weights, check_compatible, kv_weight_keys
from .model import UnsupportedModelError, config_name, model_family
from .tokenizer import text_encoder_widths

LDM_MODEL_PREFIX = "diffusion_model."


def _diffusers_map(model_patcher) -> dict[str, str]:
    """Every diffusers UNet parameter name → ComfyUI model key, for this MODEL's layout."""
    mapping = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    if not mapping:
        raise UnsupportedModelError(f"this MODEL ({config_name(model_patcher)}) has no diffusers UNet layout to "
                                    "map names to")
    return {d: LDM_MODEL_PREFIX + c for d, c in mapping.items()}


def kv_key_map(model_patcher, naming: str) -> dict[str, str]:
    """Source K/V key (diffusers or CompVis/ldm naming) → ComfyUI key of this MODEL's attn2 to_k/to_v weight."""
    keys = set(kv_weight_keys(model_patcher))
    if naming == "ldm":
        return {k[len(LDM_MODEL_PREFIX):]: k for k in keys}
    return {d: c for d, c in _diffusers_map(model_patcher).items() if c in keys}


def attention_processors(model_patcher) -> list[str]:
    """diffusers' attention processor names (``….attn1.processor``, ``….attn2.processor``) of this UNet."""
    names = []
    for d in _diffusers_map(model_patcher):
        for attn in (".attn1.to_q.weight", ".attn2.to_q.weight"):
            if d.endswith(attn):
                names.append(d[: -len(".to_q.weight")] + ".processor")
    return sorted(names)


def import_concept(source: Path, fmt: str, model_patcher, clip, trigger: str, class_noun: str,
                   tokens: str = "") -> tuple[Concept, list[str]]:
    """Read a Custom Diffusion source and turn it into a concept for this MODEL and CLIP (nothing is written)."""
    family = model_family(model_patcher)
    found = foreign.read_source(source, fmt)
    if found.format == "infusion":
        return _infusion_concept(found, model_patcher, clip, family, trigger, class_noun, source.name)
    chosen = foreign.select_tokens(found, tokens)
    if not chosen:
        raise foreign.ForeignFormatError(foreign.NO_TOKENS)
    meta = found.metadata
    if not trigger.strip():
        recorded = meta.get("dci_trigger", "")
        trigger = recorded if recorded and chosen == found.token_names else foreign.default_trigger(chosen)
    if not class_noun.strip():
        class_noun = meta.get("dci_class_noun", "")
        if not class_noun:
            raise foreign.ForeignFormatError("enter the class noun (e.g. dog): the source does not record it")
    concept, notes = convert.build_concept(
        found, kv_key_map(model_patcher, found.naming), base_kv_weights(model_patcher), text_encoder_widths(clip),
        family, trigger.strip(), class_noun, chosen, base_fingerprint(model_patcher), source.name,
    )
    check_compatible(concept, model_patcher, clip)
    return concept, notes


IMPORTED_TOKEN_NUDGE = 1e-3  # relative change that keeps an imported trigger's rows apart from its class noun's


def _infusion_concept(found, model_patcher, clip, family: str, trigger: str, class_noun: str,
                      source: str) -> tuple[Concept, list[str]]:
    """Infusion vectors → a concept: residuals under this MODEL's keys; the trigger stands for the class noun's
    token row (the official training starts its placeholder there and never trains it), scaled by
    1 + IMPORTED_TOKEN_NUDGE so that prompts naming the class noun itself never look like the trigger."""
    from .training.settings import TrainingError
    from .training.text_encoder import TextEncoder

    if not trigger.strip():
        raise foreign.ForeignFormatError("enter a trigger word: an Infusion file has no usable token name")
    if not class_noun.strip():
        raise foreign.ForeignFormatError("enter the class noun the Infusion vectors were trained with (its "
                                         "'initializer_words', e.g. cat)")
    residuals = {LDM_MODEL_PREFIX + k: v for k, v in found.residuals.items()}
    try:
        text = TextEncoder(clip)
        row = text.vocabulary_rows((class_noun.strip(),)).detach().float().cpu()
    except TrainingError as e:
        raise foreign.ForeignFormatError(f"the class noun must be one token of this CLIP's vocabulary ({e})") from None
    tokens = {text.key: row * (1 + IMPORTED_TOKEN_NUDGE)}
    concept = Concept(family=family, trigger=trigger.strip(), class_noun=class_noun.strip(), kv_deltas={},
                      tokens=tokens, token_init={text.key: row.clone()}, residuals=residuals,
                      base_fingerprint=base_fingerprint(model_patcher), method="infusion (imported)",
                      training={"source": source, "format": "infusion"})
    check_compatible(concept, model_patcher, clip)
    return concept, list(found.notes)


def refuse_residuals(concept: Concept) -> None:
    """Infusion's residual vectors act only at the trigger's tokens, which no weight change can express."""
    if concept.residuals:
        raise ConceptFileError("this is an Infusion concept: its residual vectors act only at the trigger word's "
                               "tokens, which a LoRA or a Custom Diffusion folder can't express; load it with DCI "
                               "Load Concept instead")
    if concept.more:
        raise ConceptFileError(f"this file holds {1 + len(concept.more)} jointly trained triggers; the export formats "
                               "carry one trigger's embedding: load it with DCI Load Concept instead")


def export_lora_and_embedding(concept: Concept, model_patcher, lora_path: Path, embedding_path: Path,
                              overwrite: bool, precision: str = "exact") -> list[tuple[Path, bool]]:
    """A LoRA file of ``.diff`` entries (stock LoraLoaderModelOnly) and an embedding file (``embedding:name``)."""
    refuse_residuals(concept)
    check_compatible(concept, model_patcher)
    usage = f"embedding:{embedding_path.stem} {concept.class_noun}"
    meta = {"dci_trigger": concept.trigger, "dci_class_noun": concept.class_noun, "dci_family": concept.family,
            "dci_base_fingerprint": concept.base_fingerprint, "dci_prompt": usage}
    files = {}
    if concept.kv_deltas:
        files[lora_path] = (convert.lora_tensors(concept, precision), {**meta, "dci_embedding": embedding_path.stem})
    if concept.tokens:
        files[embedding_path] = (convert.embedding_tensors(concept, precision), meta)
    return write_files(files, overwrite)


def export_diffusers(concept: Concept, model_patcher, folder: Path, overwrite: bool,
                     precision: str = "exact") -> list[tuple[Path, bool]]:
    """A diffusers Custom Diffusion folder: full K/V weights (base + delta) under diffusers names, token files."""
    refuse_residuals(concept)
    check_compatible(concept, model_patcher)
    to_diffusers = {c: d for d, c in kv_key_map(model_patcher, "diffusers").items()}
    missing = [k for k in concept.kv_deltas if k not in to_diffusers]
    if missing:
        raise UnsupportedModelError(f"{len(missing)} key/value layers have no diffusers name (e.g. {missing[0]})")
    base = {k: v.detach().to("cpu") for k, v in base_kv_weights(model_patcher).items()}
    files = convert.diffusers_files(concept, base, to_diffusers, attention_processors(model_patcher), precision)
    return write_folder(folder, files, overwrite)
