"""Toy-world nodes: the bundled tiny model as MODEL/CLIP/VAE, and a renderer that shows what its world holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..comfyui.folders import checkpoint_names, checkpoint_path, embedding_folders
from ..toyworld import model as toy_model
from ..toyworld import render
from .common import check_choice, register, spec

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "assets" / "toyworld"
BUNDLED_NAME = "toyworld_base.safetensors"
CHECKPOINT_SUBFOLDER = "toyworld"  # models/checkpoints/toyworld/*.safetensors are listed too
NONE = "none"


def _in_subfolder(name: str) -> bool:
    return name.replace("\\", "/").startswith(f"{CHECKPOINT_SUBFOLDER}/")


def model_names() -> list[str]:
    """The bundled model first, then toy-world files the user put in models/checkpoints/toyworld/."""
    return [BUNDLED_NAME, *(n for n in checkpoint_names() if _in_subfolder(n) and n.endswith(".safetensors"))]


def model_path(node: str, name: str) -> Path:
    """The file behind a dropdown entry, with a message that says what to do when it isn't there."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{node}: no model chosen; pick '{BUNDLED_NAME}' (the bundled toy model)")
    if name == BUNDLED_NAME:
        path = BUNDLED_DIR / BUNDLED_NAME
        if not path.is_file():
            raise ValueError(
                f"{node}: the toy-world weights are not in this checkout ({path} is missing). They are committed "
                f"with the pack: update or re-clone it (with Git LFS files, if your clone skipped them), or put a "
                f"toy-world .safetensors file in models/checkpoints/{CHECKPOINT_SUBFOLDER}/ and pick that one."
            )
        return path
    if not _in_subfolder(name):
        raise ValueError(f"{node}: {name!r} is not a toy-world model; pick '{BUNDLED_NAME}' or a file in "
                         f"models/checkpoints/{CHECKPOINT_SUBFOLDER}/")
    path = checkpoint_path(name)
    if path is None:
        raise ValueError(f"{node}: {name!r} was not found in models/checkpoints; refresh the node list")
    return path


class DCIToyWorldLoader:
    """Loads the toy world's tiny SD1.x-family model: a default model that trains and samples on a CPU."""

    NODE_ID = "DCIToyWorldLoader"
    DISPLAY_NAME = "DCI Toy World Loader"
    CATEGORY = "concept/toy world"
    DESCRIPTION = (
        "Load the toy world's tiny model (128×128 scenes of coloured shapes with patterns and emblems; captions "
        "like 'a small red circle with yellow stripes and a blue star emblem at the left on a green background'). "
        "ComfyUI treats it as SD1.5, so every stock node accepts its MODEL, CLIP and VAE; sample at 128×128. It "
        "exists to try concept training and DCI sampling in minutes on a CPU, with fidelity and editability "
        "measurable from pixels."
    )
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = (
        "The toy UNet (SD1.5 family, ε prediction).",
        "The toy text encoder on the standard SD1 tokenizer.",
        "The toy VAE (128×128 images ↔ 16×16×4 latents).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": spec(model_names(), f"'{BUNDLED_NAME}' is the model bundled with the pack; other "
                                   f"toy-world files go in models/checkpoints/{CHECKPOINT_SUBFOLDER}/.",
                                   default=BUNDLED_NAME),
            }
        }

    def load(self, model_name):
        node = self.DISPLAY_NAME
        path = model_path(node, model_name)
        meta = toy_model.read_metadata(path)
        if "toyworld.unet_config" not in meta or "toyworld.text_config" not in meta:
            raise ValueError(f"{node}: {path.name} is not a toy-world file (its metadata has no toyworld.* "
                             f"architecture); load ordinary checkpoints with Load Checkpoint")
        try:
            model, clip, vae = toy_model.load_toyworld(path, embedding_folders())
        except ValueError as e:
            raise ValueError(f"{node}: {path.name}: {e}") from None
        # Fresh objects per execution (ComfyUI caches node outputs itself); callers may patch or clone them.
        return (model, clip, vae)


class DCIToyWorldScene:
    """Renders one toy-world scene exactly as the training data looks, with its caption."""

    NODE_ID = "DCIToyWorldScene"
    DISPLAY_NAME = "DCI Toy World Scene"
    CATEGORY = "concept/toy world"
    DESCRIPTION = (
        "Draw a toy-world scene from its attributes, to see what the toy model was trained on and what a "
        "prompt should produce. The caption output is the base world's caption of the scene. The optional "
        "stripe angle, emblem placement and emblem scale are parts no caption names: the model draws them at "
        "random, and a concept pins them down."
    )
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "caption")
    OUTPUT_TOOLTIPS = ("The 128×128 render.", "The scene's full caption in the toy world's grammar.")
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        colours = list(render.COLOURS)
        return {
            "required": {
                "shape": spec(list(render.SHAPES), "The object's shape."),
                "colour": spec(colours, "The object's colour.", default="red"),
                "pattern": spec(list(render.PATTERNS), "A pattern in its own colour.", default="plain"),
                "pattern_colour": spec(colours, "Colour of the pattern.", default="yellow"),
                "emblem": spec([NONE, *render.EMBLEM_SHAPES], "A small shape on the object.", default=NONE),
                "emblem_colour": spec(colours, "Colour of the emblem.", default="blue"),
                "size": spec(list(render.SIZES), "Object size.", default="large"),
                "position": spec(list(render.POSITIONS), "Where the object sits.", default="centre"),
                "background": spec(colours, "Background colour.", default="white"),
                "texture": spec(list(render.TEXTURES), "Background texture.", default="flat"),
            },
            "optional": {
                "stripe_angle": spec(list(render.STRIPE_ANGLES), "Stripes run vertically or horizontally (never "
                                     "named in a caption).", default="vertical"),
                "emblem_place": spec(list(render.EMBLEM_PLACES), "Where the emblem sits (never named in a "
                                     "caption).", default="centre"),
                "emblem_scale": spec(list(render.EMBLEM_SCALES), "Emblem size (never named in a caption).",
                                     default="large"),
            },
        }

    def draw(self, shape, colour, pattern, pattern_colour, emblem, emblem_colour, size, position, background,
             texture, stripe_angle="vertical", emblem_place="centre", emblem_scale="large"):
        node = self.DISPLAY_NAME
        for name, value, options in (
            ("shape", shape, render.SHAPES), ("colour", colour, render.COLOURS), ("pattern", pattern, render.PATTERNS),
            ("pattern_colour", pattern_colour, render.COLOURS), ("emblem", emblem, (NONE, *render.EMBLEM_SHAPES)),
            ("emblem_colour", emblem_colour, render.COLOURS), ("size", size, render.SIZES),
            ("position", position, render.POSITIONS), ("background", background, render.COLOURS),
            ("texture", texture, render.TEXTURES), ("stripe_angle", stripe_angle, render.STRIPE_ANGLES),
            ("emblem_place", emblem_place, render.EMBLEM_PLACES), ("emblem_scale", emblem_scale, render.EMBLEM_SCALES),
        ):
            check_choice(node, name, value, options)
        has_emblem, has_pattern = emblem != NONE, pattern != "plain"
        used = [("object", colour), ("background", background)]
        used += [("pattern", pattern_colour)] if has_pattern else []
        used += [("emblem", emblem_colour)] if has_emblem else []
        seen: dict[str, str] = {}
        for part, c in used:
            if c in seen:
                raise ValueError(f"{node}: the {seen[c]} and the {part} are both {c}; pick different colours")
            seen[c] = part
        obj = render.ObjectSpec(
            shape=shape, colour=colour, size=size, position=position, pattern=pattern,
            pattern_colour=pattern_colour if has_pattern else None,
            emblem=emblem if has_emblem else None, emblem_colour=emblem_colour if has_emblem else None,
            stripe_angle=stripe_angle, emblem_place=emblem_place, emblem_scale=emblem_scale,
        )
        scene = render.SceneSpec(obj=obj, background=background, texture=texture)
        pixels = render.render_scene(scene).astype(np.float32) / 255.0
        return (torch.from_numpy(pixels)[None], render.caption(scene))


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCIToyWorldLoader, DCIToyWorldScene)
