"""Everything about a training run that can be checked before any compute: inputs, captions, the file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ...files.concept import ConceptFileError, sanitize_name
from ...files.train_state import state_path
from ...method import ico
from ..model import FAMILY_LABEL, UnsupportedModelError, cross_attention_layers, model_family
from ..tokenizer import existing_triggers
from .settings import TRAINABLE_FAMILIES, TrainingError, TrainSettings
from .text_encoder import TextEncoders
from .unet import prediction_kind

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """A checked run: its family, text encoders, caption parts (entries per encoder), target file, warnings."""

    family: str
    prediction: str
    text: TextEncoders
    class_entries: list[dict[str, list]]  # per concept (the first, then settings.more_concepts)
    prefix: ico.ContextSpec
    suffix: ico.ContextSpec
    prefix_entries: dict[str, list]
    suffix_entries: dict[str, list]
    path: Path
    resume: bool
    warnings: list[str]


def fixed_prefix(text: str, mode: str) -> str:
    """The words before the trigger in the custom_diffusion/infusion caption: ``prefix_context`` as written
    (default "photo of a"; empty for none)."""
    return _fixed_words(text, mode, "prefix_context", ico.CUSTOM_DIFFUSION_PREFIX)


def fixed_suffix(text: str, mode: str) -> str:
    """The words after the class noun in the custom_diffusion/infusion caption: ``suffix_context`` as written,
    e.g. the scene the photos share ("on a white background"), so that the scene's look goes to its own words
    rather than to the trigger. The node's default "." (ICO's starting suffix) adds nothing here, so captions
    made before these modes read the suffix stay as they were."""
    return "" if text.strip() == "." else _fixed_words(text, mode, "suffix_context", "on a white background")


def _fixed_words(text: str, mode: str, name: str, example: str) -> str:
    """A fixed caption part's words; a number of random tokens is an ICO context and is refused here."""
    spec = ico.parse_context_spec(text)
    if spec.length:
        raise TrainingError(f"{mode} trains on a fixed caption: {name} must be words (e.g. '{example}') or empty, "
                            f"not a number of random tokens ({text!r})")
    return spec.words


def _check_images(images, reg_images, settings: TrainSettings) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise TrainingError("no concept images: connect an IMAGE batch with at least one image")
    if images.shape[-1] not in (3, 4) or not torch.isfinite(images).all():
        raise TrainingError(f"the concept images must be a finite IMAGE batch [B, H, W, 3], got {tuple(images.shape)}")
    if reg_images is not None:
        if not isinstance(reg_images, torch.Tensor) or reg_images.dim() != 4 or reg_images.shape[0] < 1:
            raise TrainingError("the regularisation images input is connected but holds no images")
        if len(settings.reg_captions) not in (1, reg_images.shape[0]):
            raise TrainingError(f"{reg_images.shape[0]} regularisation images need one caption for all or one per "
                                f"image (one per line); got {len(settings.reg_captions)}")
    elif settings.reg_captions and any(c.strip() for c in settings.reg_captions):
        log.warning("regularisation captions are given but no regularisation images; the captions are ignored")


def _check_masks(masks, images) -> None:
    if masks is None:
        return
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[0] not in (1, images.shape[0]):
        raise TrainingError(f"the mask input needs one MASK for all concept images or one per image "
                            f"({images.shape[0]}); got shape {tuple(getattr(masks, 'shape', ()))}")
    if not torch.isfinite(masks).all() or float(masks.min()) < 0 or float(masks.max()) > 1:
        raise TrainingError("the masks must hold values from 0 to 1 (1 = the concept)")
    if not bool((masks.flatten(1).amax(dim=1) > 0).all()):
        raise TrainingError("a mask is empty (all 0): it would hide its whole image from training")


def _check_pairing(model, text: TextEncoders, family: str) -> None:
    """The CLIP must be the MODEL's: its context as wide as the cross-attention takes, SDXL's pooled output."""
    width = sum(p.width for p in text.parts)
    wanted = {layer.context_dim for layer in cross_attention_layers(model)}
    if wanted and wanted != {width}:
        raise TrainingError(f"this CLIP's text encoders ({', '.join(text.keys)}) give a context {width} wide, but the "
                            f"MODEL's cross-attention takes {', '.join(map(str, sorted(wanted)))}: connect the CLIP "
                            "of the same checkpoint")
    if family == "sdxl" and text.pooled_key is None:
        raise TrainingError(f"an SDXL MODEL needs the SDXL CLIP (clip_l and clip_g); this CLIP has "
                            f"{', '.join(text.keys)}")


def _target(folder: Path, name: str, overwrite: bool, resume: bool) -> Path:
    try:
        path = Path(folder) / sanitize_name(name)
    except ConceptFileError as e:
        raise TrainingError(str(e)) from None
    if resume:
        if not path.is_file():
            raise TrainingError(f"nothing to resume: {path.name} does not exist in {path.parent}")
        if not state_path(path).is_file():
            raise TrainingError(f"{path.name} can't be resumed: its training state {state_path(path).name} is missing")
    elif path.exists() and not overwrite:
        raise TrainingError(f"{path.name} already exists in {path.parent}: choose another save name, allow "
                            "overwriting, or resume it")
    return path


def plan_training(model, clip, images, settings: TrainSettings, folder: Path, name: str, overwrite: bool,
                  resume: bool, reg_images=None, masks=None) -> Plan:
    """Validate everything that can be validated without computing; raises TrainingError."""
    settings.check()
    try:
        family = model_family(model)
    except UnsupportedModelError as e:
        raise TrainingError(str(e)) from None
    if family not in TRAINABLE_FAMILIES:
        raise TrainingError(f"training {FAMILY_LABEL[family]} concepts is not yet supported; use an "
                            "SD1.x, SD2.x or SDXL checkpoint")
    prediction = prediction_kind(model)
    _check_images(images, reg_images, settings)
    _check_masks(masks, images)

    text = TextEncoders(clip)
    _check_pairing(model, text, family)
    warnings = []
    if sum(c["images"] for c in settings.more_concepts) >= images.shape[0]:
        raise TrainingError("the further concepts' images leave none for the first concept")
    class_entries = []
    for trigger, noun in [(settings.trigger, settings.class_noun)] + [(c["trigger"], c["class_noun"])
                                                                       for c in settings.more_concepts]:
        if trigger.lower() in (w.lower() for w in existing_triggers(clip)):
            raise TrainingError(f"the trigger word {trigger!r} is already used by another concept loaded on this "
                                "CLIP; choose another one")
        if text.is_vocabulary_word(trigger):
            warnings.append(f"the trigger word {trigger!r} is an existing word of the text encoder's vocabulary; "
                            "prompts that use it in its usual sense will get the concept instead (a made-up word "
                            "like 'qxz' avoids that)")
        class_entries.append(text.word_entries(noun, "class noun"))
        if not class_entries[-1][text.primary.key]:
            raise TrainingError(f"the class noun {noun!r} gives no tokens")
    if settings.mode == "ico":
        prefix, suffix = ico.parse_context_spec(settings.prefix), ico.parse_context_spec(settings.suffix)
    else:  # the fixed caption "<prefix words> <trigger> <class> <suffix words>", as the official code's
        # --instance_prompt
        prefix = ico.ContextSpec(words=fixed_prefix(settings.prefix, settings.mode))
        suffix = ico.ContextSpec(words=fixed_suffix(settings.suffix, settings.mode))
    none = {k: [] for k in text.keys}
    prefix_entries = text.word_entries(prefix.words, "prefix") if prefix.words else none
    suffix_entries = text.word_entries(suffix.words, "suffix") if suffix.words else none
    for part in text.parts:
        n_prefix = len(prefix_entries[part.key]) if prefix.from_words else prefix.length
        n_suffix = len(suffix_entries[part.key]) if suffix.from_words else suffix.length
        try:
            for entries in class_entries:
                ico.caption_entries(part.special, [0] * n_prefix, torch.zeros(settings.num_tokens, part.width),
                                    entries[part.key], [0] * n_suffix)
        except ico.CaptionError as e:
            raise TrainingError(str(e)) from None

    path = _target(folder, name, overwrite, resume)
    for w in warnings:
        log.warning(w)
    return Plan(family, prediction, text, class_entries, prefix, suffix, prefix_entries, suffix_entries, path,
                resume, warnings)
