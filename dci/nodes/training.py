"""Training nodes: learn a concept (ICO, Custom Diffusion or Infusion) from a few images, inside ComfyUI."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comfyui.concept import ConceptRef, apply_concept
from ..comfyui.concept_encoder import concept_tokens
from ..comfyui.folders import concepts_folder
from ..comfyui.training.loop import train_concept
from ..comfyui.training.loss_curve import loss_curve_image
from ..comfyui.training.preview import Previews, parse_prompts, preview_folder
from ..comfyui.training.settings import (
    AUTOCAST,
    DEFAULTS,
    LIMITS,
    RESOLUTION_STEP,
    TrainingError,
    TrainSettings,
)
from ..files.concept import ConceptFileError, check_trigger
from ..method import ico
from .common import SEED_MAX, check_clip, check_model, check_vae, register, reported, spec
from .concepts import CONCEPT_ERRORS, CONCEPT_TYPE

DATASET_TYPE = "DCI_CONCEPT_DATASET"


@dataclass(frozen=True)
class ConceptDataset:
    """One further concept of a joint training run: its photos (a list of IMAGE batches, any sizes), optional
    masks, class noun and trigger word."""

    images: tuple
    class_noun: str
    trigger: str
    masks: tuple | None = None


def _captions(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _ranged(kind: str, name: str, tooltip: str, **options) -> tuple:
    """An INT/FLOAT input whose default and range are the trainer's (``settings.DEFAULTS``/``LIMITS``)."""
    lo, hi = LIMITS[name]
    return spec(kind, tooltip, default=getattr(DEFAULTS, name), min=lo, max=hi, **options)


class DCITrainConcept:
    """Trains a concept's attn2 key/value deltas, trigger-token embeddings and (ICO) per-image contexts."""

    NODE_ID = "DCITrainConcept"
    DISPLAY_NAME = "DCI Train Concept"
    CATEGORY = "concept/training"
    DESCRIPTION = (
        "Teach the model a concept from a few photos. Trains the cross-attention key/value weights and the "
        "trigger word's embeddings (Custom Diffusion); in 'ico' mode every photo also gets its own learnable "
        "caption context that absorbs what is specific to that photo, so the trigger stays editable; in "
        "'infusion' mode only one vector per cross-attention layer trains, added to the values at the trigger's "
        "tokens (prompts without the trigger stay exactly the base model's). Saves the "
        "concept to models/concepts (with periodic checkpoints; Cancel saves one too) and returns the MODEL and "
        "CLIP with the concept loaded, exactly as DCI Load Concept would load the file."
    )
    RETURN_TYPES = ("MODEL", "CLIP", CONCEPT_TYPE, "IMAGE")
    RETURN_NAMES = ("model", "clip", "concept", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The input MODEL with the trained concept loaded.",
        "The input CLIP that knows the trigger word.",
        "Trigger word and class noun, for the DCI sampler.",
        "The training loss per step.",
    )
    FUNCTION = "train"
    # Every input arrives as a list: ``images`` and ``reg_images`` may be lists of images of different sizes
    # (Load Image Dataset from Folder); every other input must be one value.
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        d = DEFAULTS
        return {
            "required": {
                "model": spec("MODEL", "The SD1.x, SD2.x or SDXL model to customise; it is not modified."),
                "clip": spec("CLIP", "Its text encoder; it is not modified."),
                "vae": spec("VAE", "Its VAE, to encode the images once before training."),
                "images": spec("IMAGE", "Photos of the concept (3-12 is typical): an IMAGE batch, or the image list "
                                        "of Load Image Dataset from Folder (any sizes). Each is centre-cropped "
                                        "to a square and resized to the resolution."),
                "class_noun": spec("STRING", "What the concept is, in one or two words (dog, mug, plush toy).",
                                   default=d.class_noun),
                "trigger_word": spec("STRING", "The made-up word that will stand for the concept in prompts: 'a "
                                     "qxz dog on the beach'. Avoid real words.", default=d.trigger),
                "num_tokens": _ranged("INT", "num_tokens", "Learned token vectors behind the trigger word; they "
                                      "start from rarely used tokens."),
                "mode": spec(list(ico.MODES), "ico: every image gets learnable caption contexts (better "
                             "editability). custom_diffusion: the fixed caption '<prefix_context> <trigger> "
                             "<class> <suffix_context>', by default 'photo of a <trigger> <class>' (baseline). infusion: the same caption, but only one residual vector per "
                             "cross-attention layer trains (added to the values at the trigger's tokens; the "
                             "trigger's token vectors stay fixed).", default=d.mode),
                "prefix_context": spec("STRING", "ico: words the per-image prefix starts from (its length is "
                                       "their token count), or a number N for N random tokens; empty for none. "
                                       "custom_diffusion/infusion: the fixed words before the trigger (words or "
                                       "empty), e.g. in the language the model's captions use.",
                                       default=d.prefix),
                "suffix_context": spec("STRING", "ico: words (or a number of random tokens) the per-image suffix "
                                       "starts from; empty for none. custom_diffusion/infusion: fixed words "
                                       "after the class noun, e.g. the scene the photos share ('on a white "
                                       "background'); the default '.' adds nothing.", default=d.suffix),
                "steps": _ranged("INT", "steps", "Optimisation steps (the reference trains 900 at batch 6)."),
                "batch_size": _ranged("INT", "batch_size", "Concept images per step (as many regularisation "
                                      "images are added when connected)."),
                "learning_rate": _ranged("FLOAT", "learning_rate", "Per-image learning rate of the key/value "
                                         "weights and tokens; the step uses it times the batch size. infusion: "
                                         "the residual vectors learn 1000 times faster (1e-5 → 0.01).",
                                         step=1e-6, round=False),
                "context_lr_multiplier": _ranged("FLOAT", "context_lr_multiplier", "ico: the contexts learn this "
                                                 "many times faster.", step=0.1),
                "resolution": _ranged("INT", "resolution", "Training resolution in pixels (square).",
                                      step=RESOLUTION_STEP),
                "seed": spec("INT", "Seed of everything random in training; same seed, same result.",
                             default=d.seed, min=0, max=SEED_MAX),
                "precision": spec(list(AUTOCAST), "fp32 (reference), or bf16/fp16 autocast to save memory and "
                                  "time on GPUs.", default=d.precision),
                "gradient_checkpointing": spec("BOOLEAN", "Recompute activations in the backward pass: less "
                                               "memory, about 30% slower.", default=d.gradient_checkpointing),
                "save_name": spec("STRING", "File name in models/concepts.", default="my_concept"),
                "overwrite": spec("BOOLEAN", "Replace an existing concept of that name.", default=False),
                "resume": spec("BOOLEAN", "Continue the saved training of save_name up to 'steps' (same settings "
                               "and images).", default=False),
                "checkpoint_every": _ranged("INT", "checkpoint_every", "Save a resumable checkpoint every N "
                                            "steps; 0 saves only at the end (and on Cancel)."),
                "random_flip": spec("BOOLEAN", "Mirror images at random, as the reference does.",
                                    default=d.random_flip),
            },
            "optional": {
                "reg_images": spec("IMAGE", "Regularisation images of the class (e.g. generated from 'photo of a "
                                   "dog'), mixed into every step at equal weight to keep the class prior."),
                "reg_captions": spec("STRING", "Their captions: one per line, or one line for all.",
                                     multiline=True, default=""),
                "unlock_keys": spec("BOOLEAN", "infusion: also train a residual vector on the keys at the "
                                    "trigger's tokens (as the official code's default attention path does); off: "
                                    "keys stay locked, as the paper describes.", default=d.unlock_keys),
                "mask": spec("MASK", "Foreground masks of the concept images (1 = the concept; one for all or one "
                             "per image, same size as its image): the loss counts only the masked parts, as the "
                             "official Infusion code does. Any mode."),
                "preview_every": spec("INT", "Every N steps, sample one fixed-seed preview image per preview prompt "
                                      "with the concept as it stands (8 Euler steps at the training resolution), "
                                      "show them on the node and save them as PNGs beside the loss curve in "
                                      "output/concept_training/<save_name>/. 0: no previews.",
                                      default=0, min=0, max=LIMITS["steps"][1]),
                "preview_prompts": spec("STRING", "The preview prompts, one per line, with the trigger word; empty: "
                                        "'a photo of <trigger> <class noun>' and '<trigger> <class noun> on the "
                                        "beach'.", multiline=True, default=""),
                "more_concepts": spec(DATASET_TYPE, "Joint training: further concepts from chained DCI Concept "
                                      "Dataset nodes, each with its own photos, class noun and trigger word. One "
                                      "run trains them all (shared key/value weights, one token set per trigger) "
                                      "into one file; loading it registers every trigger. ico and "
                                      "custom_diffusion modes."),
                "start_concept": spec(CONCEPT_TYPE, "Start the trigger's token rows from this concept's (e.g. DCI "
                                      "Encode Concept's, or any loaded concept with num_tokens rows) instead of "
                                      "rarely used tokens: a short run then refines what the encoder found."),
            },
        }

    def train(self, images, reg_images=None, mask=None, more_concepts=None, start_concept=None, **inputs):
        node = self.DISPLAY_NAME
        more_concepts = [m for m in more_concepts or [] if m is not None]
        more = list(more_concepts[0]) if more_concepts else []
        if more_concepts and len(more_concepts) != 1:
            raise ValueError(f"{node}: 'more_concepts' got a list of {len(more_concepts)} values; chain the DCI "
                             "Concept Dataset nodes instead")
        single = {}
        for name, value in inputs.items():
            if len(value) != 1:
                raise ValueError(f"{node}: '{name}' got a list of {len(value)} values; only the images may be lists")
            single[name] = value[0]
        res, (lo, hi) = single.get("resolution"), LIMITS["resolution"]
        if not isinstance(res, int) or not lo <= res <= hi:
            raise ValueError(f"{node}: resolution must be a whole number of pixels from {lo:g} to {hi:g}, got {res!r}")
        with reported(node, ValueError):
            batch = ico.collect_images(images, res)
            reg = ico.collect_images(reg_images, res) if reg_images else None
            masks = ico.collect_masks(mask, res) if mask else None
            if more:  # joint training: the further concepts' photos follow the first concept's
                parts = [(batch, masks)] + [(ico.collect_images(c.images, res),
                                             ico.collect_masks(c.masks, res) if c.masks else None) for c in more]
                for (b, m), c in zip(parts[1:], more, strict=True):
                    if m is not None and m.shape[0] not in (1, b.shape[0]):
                        raise ValueError(f"the concept {c.trigger!r} has {b.shape[0]} photos but {m.shape[0]} "
                                         "masks: give one mask for all or one per photo")
                if any(m is not None for _, m in parts):
                    masks = torch.cat([torch.ones(b.shape[0], res, res) if m is None else m.expand(b.shape[0], -1, -1)
                                       if m.shape[0] == 1 else m for b, m in parts])
                batch = torch.cat([b for b, _ in parts])
        joint = [{"trigger": c.trigger, "class_noun": c.class_noun, "images": sum(int(x.shape[0]) for x in c.images)}
                 for c in more]
        if start_concept is not None and len(start_concept) != 1:
            raise ValueError(f"{node}: 'start_concept' got a list of {len(start_concept)} concepts; connect one")
        start = start_concept[0] if start_concept else None
        return self._train(images=batch, reg_images=reg, masks=masks, more_concepts=joint, start_concept=start,
                           **single)

    def _train(self, model, clip, vae, images, class_noun, trigger_word, num_tokens, mode, prefix_context,
               suffix_context, steps, batch_size, learning_rate, context_lr_multiplier, resolution, seed, precision,
               gradient_checkpointing, save_name, overwrite, resume, checkpoint_every, random_flip, reg_images=None,
               reg_captions="", unlock_keys=False, masks=None, preview_every=0, preview_prompts="",
               more_concepts=(), start_concept=None):
        node = self.DISPLAY_NAME
        check_model(node, model)
        check_clip(node, clip)
        check_vae(node, vae)
        captions = _captions(reg_captions)
        if reg_images is not None and not captions:
            captions = [f"photo of a {class_noun.strip()}"]
        settings = TrainSettings(
            class_noun=class_noun, trigger=trigger_word.strip(), num_tokens=num_tokens, mode=mode,
            prefix=prefix_context, suffix=suffix_context, steps=steps, batch_size=batch_size,
            learning_rate=learning_rate, context_lr_multiplier=context_lr_multiplier, resolution=resolution,
            seed=seed, precision=precision, random_flip=random_flip, gradient_checkpointing=gradient_checkpointing,
            checkpoint_every=checkpoint_every, reg_captions=captions if reg_images is not None else [],
            unlock_keys=unlock_keys, more_concepts=list(more_concepts),
        )
        if not isinstance(preview_every, int) or isinstance(preview_every, bool) or preview_every < 0:
            raise ValueError(f"{node}: preview_every must be a whole number of steps, 0 for none; got {preview_every!r}")
        with reported(node, TrainingError, *CONCEPT_ERRORS):
            folder, subfolder = preview_folder(save_name)
            prompts = parse_prompts(preview_prompts, settings.trigger, class_noun, settings.more_concepts)
            previews = Previews(preview_every, prompts, folder, subfolder, seed=seed)
            start = concept_tokens(start_concept) if start_concept is not None else None
            result = train_concept(model, clip, vae, images, settings, concepts_folder(), save_name,
                                   overwrite=overwrite, resume=resume, reg_images=reg_images, masks=masks,
                                   previews=previews, start_tokens=start)
            model_out, clip_out, _ = apply_concept(result.concept, model, clip, name=result.path.name)
        ref = ConceptRef.of(result.path.name, result.concept)
        shown = [n for n in previews.shown if n.startswith("preview")] + [previews.save_loss_curve(result.losses)]
        ui = [{"filename": n, "subfolder": previews.subfolder, "type": "output"} for n in shown]
        return {"ui": {"images": ui}, "result": (model_out, clip_out, ref, loss_curve_image(result.losses))}


class DCIConceptDataset:
    """One more concept for joint training: photos, class noun and trigger word, chained."""

    NODE_ID = "DCIConceptDataset"
    DISPLAY_NAME = "DCI Concept Dataset"
    CATEGORY = "concept/training"
    DESCRIPTION = (
        "One more concept for joint training in DCI Train Concept (its 'more_concepts' input), as Custom "
        "Diffusion trains several concepts at once: the concept's photos, class noun and trigger word. Chain "
        "several of these nodes for three or more concepts. The photos are prepared exactly as DCI Train "
        "Concept's own images (centre-cropped to a square, resized to the training resolution)."
    )
    RETURN_TYPES = (DATASET_TYPE,)
    RETURN_NAMES = ("more_concepts",)
    OUTPUT_TOOLTIPS = ("This concept after the chained ones; connect to DCI Train Concept's more_concepts.",)
    FUNCTION = "add"
    INPUT_IS_LIST = True  # the photos may be the image list of Load Image Dataset from Folder

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": spec("IMAGE", "Photos of this concept: an IMAGE batch, or the image list of Load Image "
                                        "Dataset from Folder (any sizes)."),
                "class_noun": spec("STRING", "What this concept is, in one or two words.", default="cat"),
                "trigger_word": spec("STRING", "Its own made-up trigger word (different from every other "
                                     "concept's).", default="zwv"),
            },
            "optional": {
                "mask": spec("MASK", "Foreground masks of these photos (one for all or one per photo): the loss "
                             "counts only the masked parts."),
                "more_concepts": spec(DATASET_TYPE, "Further concepts (a chained DCI Concept Dataset)."),
            },
        }

    def add(self, images, class_noun, trigger_word, mask=None, more_concepts=None):
        node = self.DISPLAY_NAME
        more_concepts = [m for m in more_concepts or [] if m is not None]
        if len(class_noun) != 1 or len(trigger_word) != 1 or (more_concepts and len(more_concepts) != 1):
            raise ValueError(f"{node}: only the images and masks may be lists")
        noun, trigger = class_noun[0].strip(), trigger_word[0].strip()
        if not images or any(not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] < 1 for x in images):
            raise ValueError(f"{node}: no photos: connect an IMAGE batch or an image list")
        if not noun:
            raise ValueError(f"{node}: the class noun is empty: name what the concept is, e.g. 'cat' or 'mug'")
        with reported(node, ConceptFileError):
            check_trigger(trigger)
        chain = tuple(more_concepts[0]) if more_concepts else ()
        if trigger.lower() in (c.trigger.lower() for c in chain):
            raise ValueError(f"{node}: the trigger word {trigger!r} is already used by a chained concept")
        return ((*chain, ConceptDataset(tuple(images), noun, trigger, tuple(mask) if mask else None)),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCITrainConcept, DCIConceptDataset)
