"""Training nodes: learn a concept (ICO or Custom Diffusion) from a few images, inside ComfyUI."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from ..dci_core import comfy_concept, comfy_training, ico
from ..dci_core.concept_format import ConceptFileError
from .concepts import CONCEPT_TYPE, FOLDER, _check_model_and_clip


def _concepts_folder() -> Path:
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def _captions(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


class DCITrainConcept:
    """Trains a concept's attn2 key/value deltas, trigger-token embeddings and (ICO) per-image contexts."""

    CATEGORY = "concept/training"
    DESCRIPTION = (
        "Teach the model a concept from a few photos. Trains the cross-attention key/value weights and the "
        "trigger word's embeddings (Custom Diffusion); in 'ico' mode every photo also gets its own learnable "
        "caption context that absorbs what is specific to that photo, so the trigger stays editable. Saves the "
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

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x or SD2.x model to customise; it is not modified."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder; it is not modified."}),
                "vae": ("VAE", {"tooltip": "Its VAE, to encode the images once before training."}),
                "images": ("IMAGE", {"tooltip": "Photos of the concept (3-12 is typical). Each is centre-cropped "
                                                "to a square and resized to the resolution."}),
                "class_noun": ("STRING", {"default": "dog", "tooltip": "What the concept is, in one or two words "
                                                                      "(dog, mug, plush toy)."}),
                "trigger_word": ("STRING", {"default": "qxz", "tooltip": "The made-up word that will stand for the "
                                                                        "concept in prompts: 'a qxz dog on the "
                                                                        "beach'. Avoid real words."}),
                "num_tokens": ("INT", {"default": 2, "min": 1, "max": ico.MAX_MODIFIER_TOKENS,
                                       "tooltip": "Learned token vectors behind the trigger word; they start "
                                                  "from rarely used tokens."}),
                "mode": (list(ico.MODES), {"default": "ico", "tooltip": "ico: every image gets learnable caption "
                                                                      "contexts (better editability). "
                                                                      "custom_diffusion: the fixed caption "
                                                                      "'photo of a <trigger> <class>' (baseline)."}),
                "prefix_context": ("STRING", {"default": "photo of a", "tooltip": "ico: words the per-image prefix "
                                                                                "starts from (its length is their "
                                                                                "token count), or a number N for N "
                                                                                "random tokens; empty for none."}),
                "suffix_context": ("STRING", {"default": ".", "tooltip": "ico: words (or a number of random "
                                                                       "tokens) the per-image suffix starts "
                                                                       "from; empty for none."}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000,
                                  "tooltip": "Optimisation steps (the reference trains 900 at batch 6)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Concept images per step (as many regularisation images are "
                                                  "added when connected)."}),
                "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1e-2, "step": 1e-6, "round": False,
                                            "tooltip": "Per-image learning rate of the key/value weights and "
                                                       "tokens; the step uses it times the batch size."}),
                "context_lr_multiplier": ("FLOAT", {"default": 10.0, "min": 0.01, "max": 1000.0, "step": 0.1,
                                                    "tooltip": "ico: the contexts learn this many times faster."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                       "tooltip": "Training resolution in pixels (square)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of everything random in training; same seed, same result."}),
                "precision": (list(comfy_training.PRECISIONS), {"default": "fp32",
                                                                 "tooltip": "fp32 (reference), or bf16/fp16 "
                                                                            "autocast to save memory and time on "
                                                                            "GPUs."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute activations in the "
                                                                                    "backward pass: less memory, "
                                                                                    "about 30% slower."}),
                "save_name": ("STRING", {"default": "my_concept", "tooltip": "File name in models/concepts."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing concept of that name."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the saved training of save_name up "
                                                                   "to 'steps' (same settings and images)."}),
                "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000,
                                             "tooltip": "Save a resumable checkpoint every N steps; 0 saves only "
                                                        "at the end (and on Cancel)."}),
                "random_flip": ("BOOLEAN", {"default": True, "tooltip": "Mirror images at random, as the "
                                                                       "reference does."}),
            },
            "optional": {
                "reg_images": ("IMAGE", {"tooltip": "Regularisation images of the class (e.g. generated from "
                                                    "'photo of a dog'), mixed into every step at equal weight to "
                                                    "keep the class prior."}),
                "reg_captions": ("STRING", {"multiline": True, "default": "", "tooltip": "Their captions: one per "
                                                                                     "line, or one line for "
                                                                                     "all."}),
            },
        }

    def train(self, model, clip, vae, images, class_noun, trigger_word, num_tokens, mode, prefix_context,
              suffix_context, steps, batch_size, learning_rate, context_lr_multiplier, resolution, seed, precision,
              gradient_checkpointing, save_name, overwrite, resume, checkpoint_every, random_flip, reg_images=None,
              reg_captions=""):
        node = "DCI Train Concept"
        _check_model_and_clip(node, model, clip)
        if not hasattr(vae, "encode"):
            raise ValueError(f"{node}: 'vae' must be a VAE output (e.g. from Load Checkpoint)")
        captions = _captions(reg_captions)
        if reg_images is not None and not captions:
            captions = [f"photo of a {class_noun.strip()}"]
        settings = comfy_training.TrainSettings(
            class_noun=class_noun, trigger=trigger_word.strip(), num_tokens=num_tokens, mode=mode,
            prefix=prefix_context, suffix=suffix_context, steps=steps, batch_size=batch_size,
            learning_rate=learning_rate, context_lr_multiplier=context_lr_multiplier, resolution=resolution,
            seed=seed, precision=precision, random_flip=random_flip, gradient_checkpointing=gradient_checkpointing,
            checkpoint_every=checkpoint_every, reg_captions=captions if reg_images is not None else [],
        )
        try:
            result = comfy_training.train_concept(model, clip, vae, images, settings, _concepts_folder(), save_name,
                                                  overwrite=overwrite, resume=resume, reg_images=reg_images)
            concept = result.concept
            model_out, clip_out, _ = comfy_concept.apply_concept(concept, model, clip, name=result.path.name)
        except (comfy_training.TrainingError, ConceptFileError, comfy_concept.ConceptMismatchError) as e:
            raise ValueError(f"{node}: {e}") from None
        ref = comfy_concept.ConceptRef(name=result.path.name, trigger=concept.trigger, class_noun=concept.class_noun,
                                       family=concept.family, num_tokens=concept.num_tokens)
        return (model_out, clip_out, ref, comfy_training.loss_curve_image(result.losses))


NODE_CLASS_MAPPINGS = {"DCITrainConcept": DCITrainConcept}
NODE_DISPLAY_NAME_MAPPINGS = {"DCITrainConcept": "DCI Train Concept"}
