"""Model inspection: what this pack sees in a MODEL (family, cross-attention layout, text encoders)."""

from __future__ import annotations

import json

from ..dci_core import comfy_model


class DCIModelInfo:
    """Shows the family and the cross-attention layers that concept training and DCI sampling will patch.

    Useful before training (is this model supported? how many K/V parameters will train?) and when a
    concept refuses to load (which family is this MODEL?).
    """

    CATEGORY = "concept/utils"
    DESCRIPTION = (
        "Describe a MODEL (and optionally its CLIP) the way this pack sees it: model family, number of "
        "cross-attention layers, trainable key/value parameters, text encoders."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("The description as JSON text.",)
    FUNCTION = "describe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to inspect."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Its text encoder(s), to list them too."}),
            },
        }

    def describe(self, model, clip=None):
        if not hasattr(model, "model") or not hasattr(model.model, "diffusion_model"):
            raise ValueError("DCI Model Info: 'model' must be a MODEL output (e.g. from Load Checkpoint).")
        if clip is not None and not hasattr(clip, "tokenize"):
            raise ValueError("DCI Model Info: 'clip' must be a CLIP output (e.g. from Load Checkpoint).")
        summary = comfy_model.model_summary(model, clip)
        text = json.dumps(summary, indent=1)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"DCIModelInfo": DCIModelInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"DCIModelInfo": "DCI Model Info"}
