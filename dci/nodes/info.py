"""Model inspection: what this pack sees in a MODEL (family, cross-attention layout, text encoders)."""

from __future__ import annotations

import json

from ..comfyui.model import model_summary
from .common import check_clip, check_model, register, shown, spec


class DCIModelInfo:
    """Shows the family and the cross-attention layers that concept training and DCI sampling will patch.

    Useful before training (is this model supported? how many K/V parameters will train?) and when a
    concept refuses to load (which family is this MODEL?).
    """

    NODE_ID = "DCIModelInfo"
    DISPLAY_NAME = "DCI Model Info"
    CATEGORY = "concept/utils"
    DESCRIPTION = (
        "Describe a MODEL (and optionally its CLIP) the way this pack sees it: model family, number of "
        "cross-attention layers, trainable key/value parameters (and Infusion's value vectors), text encoders."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("The description as JSON text.",)
    FUNCTION = "describe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": spec("MODEL", "The diffusion model to inspect.")},
            "optional": {"clip": spec("CLIP", "Its text encoder(s), to list them too.")},
        }

    def describe(self, model, clip=None):
        check_model(self.DISPLAY_NAME, model)
        if clip is not None:
            check_clip(self.DISPLAY_NAME, clip)
        text = json.dumps(model_summary(model, clip), indent=1)
        return shown(text, text)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCIModelInfo)
