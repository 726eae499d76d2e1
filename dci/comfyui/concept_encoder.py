"""The concept encoder in ComfyUI: load its file, check it against a MODEL and CLIP, encode images to a concept.

An encoded concept is an ordinary ``Concept`` (``dci.files.concept``) that holds token rows only (no key/value
deltas): applying it is ``concept.apply_concept``, saving it is ``save_or_reuse``, so DCI Prompt Encode, DCI
KSampler, the stock CLIPTextEncode, export and every other node treat it like a trained one. Its
``DCI_CONCEPT`` output also carries the concept itself (``EncodedConceptRef``), so DCI Train Concept can start
from its rows without a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import folder_paths
import torch

from ..files.concept import Concept, ConceptFileError, load_concept
from ..files.concept_encoder import EncoderFileError, load_encoder
from ..method.concept_encoder import ConceptEncoder, EncoderConfig, prepare_images
from .concept import ConceptRef, base_fingerprint
from .folders import CONCEPT_ENCODERS as FOLDER
from .folders import concept_path
from .model import FAMILY_LABEL, model_family
from .tokenizer import ConceptMismatchError, text_encoder_widths

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "assets" / "toyworld"
BUNDLED_FILE = "concept_encoder.safetensors"
BUNDLED_NAME = "toyworld_concept_encoder.safetensors"  # the dropdown entry of the bundled file


@dataclass(frozen=True)
class LoadedEncoder:
    """What the DCI_CONCEPT_ENCODER output carries."""

    name: str
    module: ConceptEncoder = field(compare=False, repr=False)
    family: str
    text_encoder: str
    base_fingerprint: str = ""
    base_name: str = ""

    @property
    def config(self) -> EncoderConfig:
        return self.module.config


@dataclass(frozen=True)
class EncodedConceptRef(ConceptRef):
    """A ``ConceptRef`` that also holds the encoded concept (for DCI Train Concept's start rows)."""

    concept: Concept | None = field(default=None, compare=False, hash=False, repr=False)


def encoder_names() -> list[str]:
    """The bundled encoder first, then files in models/concept_encoders."""
    return [BUNDLED_NAME, *(n for n in folder_paths.get_filename_list(FOLDER) if n != BUNDLED_NAME)]


def encoder_path(name: str) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise EncoderFileError(f"no concept encoder chosen; pick '{BUNDLED_NAME}' (the bundled toy-world encoder)")
    if name == BUNDLED_NAME:
        path = BUNDLED_DIR / BUNDLED_FILE
        if not path.is_file():
            raise EncoderFileError(f"the bundled concept encoder is missing from this checkout ({path}); update "
                                   "or re-clone the pack, or put an encoder file in models/concept_encoders")
        return path
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise EncoderFileError(f"encoder name {name!r} must be a file inside models/{FOLDER}, not a path")
    full = folder_paths.get_full_path(FOLDER, name)
    if full is None:
        raise EncoderFileError(f"concept encoder {name!r} was not found in "
                               f"{', '.join(folder_paths.get_folder_paths(FOLDER))}")
    return Path(full)


def load(name: str) -> LoadedEncoder:
    path = encoder_path(name)
    f = load_encoder(path)
    try:
        module = ConceptEncoder(EncoderConfig.from_dict(f.config))
    except (TypeError, ValueError) as e:
        raise EncoderFileError(f"{path.name}: its 'config' metadata is not a valid encoder config ({e})") from None
    missing, unexpected = module.load_state_dict(f.tensors, strict=False)
    if missing or unexpected:
        raise EncoderFileError(f"{path.name}: its weights don't match its config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    module.eval()
    return LoadedEncoder(name, module, f.family, f.text_encoder, f.base_fingerprint, f.metadata.get("base_name", ""))


def check_encoder(encoder: LoadedEncoder, model, clip) -> list[str]:
    """Raise ConceptMismatchError for another family or text-encoder width; warn about other base weights."""
    label = FAMILY_LABEL.get(encoder.family, encoder.family)
    family = model_family(model)
    if family != encoder.family:
        raise ConceptMismatchError(f"the concept encoder {encoder.name!r} writes tokens for {label} models, but this "
                                   f"MODEL is {FAMILY_LABEL.get(family, family)}; use an encoder trained for it")
    widths = text_encoder_widths(clip)
    if set(widths) != {encoder.text_encoder}:
        raise ConceptMismatchError(f"the concept encoder {encoder.name!r} writes {encoder.text_encoder} tokens only; "
                                   f"this CLIP has {', '.join(sorted(widths))}")
    if widths[encoder.text_encoder] != encoder.config.width:
        raise ConceptMismatchError(f"the concept encoder {encoder.name!r} writes {encoder.config.width}-wide tokens; "
                                   f"this CLIP's {encoder.text_encoder} is {widths[encoder.text_encoder]} wide (another "
                                   "model of the same family): use an encoder trained for this model")
    warnings = []
    if encoder.base_fingerprint and encoder.base_fingerprint != base_fingerprint(model):
        warnings.append(f"the concept encoder {encoder.name!r} was trained against other base weights "
                        f"({encoder.base_name or encoder.base_fingerprint}); its concepts may look off on this model")
    return warnings


def encode(encoder: LoadedEncoder, images: torch.Tensor, trigger: str, class_noun: str, model,
           note: str = "") -> tuple[Concept, str]:
    """An IMAGE batch → a token-only concept for ``trigger`` and what was done to the images."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise ConceptFileError("no images: connect an IMAGE batch with at least one image of the object")
    if images.shape[-1] not in (3, 4) or not torch.isfinite(images).all():
        raise ConceptFileError(f"the images must be a finite IMAGE batch [N, H, W, 3], got {tuple(images.shape)}")
    x, resized = prepare_images(images.cpu(), encoder.config.image_size)
    with torch.inference_mode():
        rows = encoder.module(x)[0].float().clone()
    concept = Concept(family=encoder.family, trigger=trigger, class_noun=class_noun.strip(), kv_deltas={},
                      tokens={encoder.text_encoder: rows.contiguous()}, base_fingerprint=base_fingerprint(model),
                      method="encoder", steps=0,
                      training={"encoder": encoder.name, "images": int(images.shape[0]),
                                "image_rule": resized or "none", **({"note": note} if note else {})})
    concept.validate()
    return concept, resized


def concept_tokens(ref) -> dict[str, torch.Tensor]:
    """The token rows of the concept behind a DCI_CONCEPT (the encoded one it carries, or its saved file)."""
    if not isinstance(ref, ConceptRef):
        raise ConceptFileError("'start_concept' must be a DCI_CONCEPT (from DCI Encode Concept or DCI Load Concept)")
    concept = getattr(ref, "concept", None)
    if concept is None:
        concept = load_concept(concept_path(ref.name))
    if not concept.tokens:
        raise ConceptFileError(f"the start concept {ref.name!r} has no token rows to start from")
    return {k: v.detach().float().clone() for k, v in concept.tokens.items()}
