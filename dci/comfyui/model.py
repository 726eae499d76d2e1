"""What this pack needs to know about a ComfyUI MODEL: its family and its cross-attention layers.

Everything is *derived from the loaded model* (never a hard-coded block list per architecture), so distilled
or trimmed UNets work as long as ComfyUI runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy.ldm.modules.attention import SpatialTransformer

# ComfyUI's model-config class name → the family name this pack uses in files and messages.
# Exact classes only: e.g. instruct-pix2pix or unCLIP variants subclass SD15/SD20 but take other inputs.
FAMILY_OF_CONFIG: dict[str, str] = {
    "SD15": "sd1",
    "SD20": "sd2",
    "SDXL": "sdxl",
    "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl",
    "KOALA_700M": "sdxl",
    "KOALA_1B": "sdxl",
}

FAMILY_LABEL: dict[str, str] = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


class UnsupportedModelError(ValueError):
    """The MODEL is not of a family this pack supports."""


class _LayerAddress:
    """How ComfyUI's attention patches address a transformer block: ``block`` (("input"|"middle"|"output", i))
    and ``depth`` give the patch key and a readable name."""

    block: tuple[str, int]
    depth: int

    @property
    def patch_key(self) -> tuple[str, int, int]:
        return (self.block[0], self.block[1], self.depth)

    @property
    def name(self) -> str:
        return f"{self.block[0]}.{self.block[1]}.{self.depth}"


@dataclass(frozen=True)
class CrossAttentionLayer(_LayerAddress):
    """One attn2 layer, addressed the way ComfyUI's attn2 replace patches address it."""

    block: tuple[str, int]  # ("input", i) | ("middle", 0) | ("output", i): index into the UNet's block list
    depth: int  # index of the transformer block inside its SpatialTransformer
    heads: int
    dim_head: int
    context_dim: int  # in-features of to_k / to_v
    inner_dim: int  # out-features of to_k / to_v
    weight_prefix: str  # state-dict prefix of the attn2 module, e.g. "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2."


def config_name(model_patcher) -> str:
    return type(model_patcher.model.model_config).__name__


def model_family(model_patcher) -> str:
    """``sd1`` / ``sd2`` / ``sdxl``; raises UnsupportedModelError naming what was found."""
    name = config_name(model_patcher)
    family = FAMILY_OF_CONFIG.get(name)
    if family is None:
        supported = ", ".join(sorted(set(FAMILY_LABEL.values())))
        raise UnsupportedModelError(
            f"this MODEL is a {name} model; this node supports {supported} UNet models only"
        )
    return family


def _transformer_containers(diffusion_model: torch.nn.Module):
    """Yield (block name, block index, module) for every UNet block, in ComfyUI's own naming."""
    for name, attr in (("input", "input_blocks"), ("output", "output_blocks")):
        for i, block in enumerate(getattr(diffusion_model, attr, [])):
            yield name, i, f"{attr}.{i}", block
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        yield "middle", 0, "middle_block", middle


def cross_attention_layers(model_patcher) -> list[CrossAttentionLayer]:
    """Every cross-attention (attn2) layer of the UNet, in forward order of the block lists."""
    dm = model_patcher.model.diffusion_model
    layers: list[CrossAttentionLayer] = []
    for name, index, path, block in _transformer_containers(dm):
        for sub_name, sub in block.named_children():
            if not isinstance(sub, SpatialTransformer):
                continue
            for depth, tb in enumerate(sub.transformer_blocks):
                attn2 = getattr(tb, "attn2", None)
                if attn2 is None:
                    continue
                layers.append(
                    CrossAttentionLayer(
                        block=(name, index),
                        depth=depth,
                        heads=attn2.heads,
                        dim_head=attn2.dim_head,
                        context_dim=attn2.to_k.in_features,
                        inner_dim=attn2.to_k.out_features,
                        weight_prefix=f"diffusion_model.{path}.{sub_name}.transformer_blocks.{depth}.attn2.",
                    )
                )
    if not layers:
        raise UnsupportedModelError("this MODEL has no cross-attention layers (attn2); is it a UNet model?")
    return layers


@dataclass(frozen=True)
class SelfAttentionLayer(_LayerAddress):
    """One attn1 layer of the decoder, addressed the way ComfyUI's attn1 replace patches address it."""

    block: tuple[str, int]  # ("output", i)
    depth: int
    level: int  # resolution level of the decoder: 0 the coarsest; the finest is the highest


def decoder_self_attention_layers(model_patcher) -> list[SelfAttentionLayer]:
    """Every self-attention (attn1) layer of the UNet's decoder (``output_blocks``) with its resolution level,
    counted from the model: the level goes up after each block that ends in an ``Upsample``."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

    dm = model_patcher.model.diffusion_model
    layers: list[SelfAttentionLayer] = []
    level = 0
    for i, block in enumerate(getattr(dm, "output_blocks", [])):
        for sub in block.children():
            if isinstance(sub, SpatialTransformer):
                for depth, tb in enumerate(sub.transformer_blocks):
                    if getattr(tb, "attn1", None) is not None:
                        layers.append(SelfAttentionLayer(block=("output", i), depth=depth, level=level))
        if any(isinstance(sub, Upsample) for sub in block.children()):
            level += 1
    return layers


def finest_decoder_layers(model_patcher, levels: int) -> list[SelfAttentionLayer]:
    """The decoder's self-attention layers in its ``levels`` finest resolution levels that have any."""
    layers = decoder_self_attention_layers(model_patcher)
    if not layers:
        raise UnsupportedModelError("this MODEL's decoder has no self-attention layers (attn1)")
    kept = sorted({layer.level for layer in layers})[-levels:]
    return [layer for layer in layers if layer.level in kept]


def text_encoder_names(clip) -> list[str]:
    """The text encoders of a CLIP object, by ComfyUI's short names (``l``, ``g``)."""
    tokens = clip.tokenize("a")
    return sorted(tokens.keys())


def model_summary(model_patcher, clip=None) -> dict:
    """A JSON-friendly description of a MODEL (and CLIP): family, attention layout, encoders."""
    layers = cross_attention_layers(model_patcher)
    try:
        family = model_family(model_patcher)
    except UnsupportedModelError:
        family = None
    mm = model_patcher.model
    summary = {
        "config": config_name(model_patcher),
        "family": family,
        "model_type": getattr(mm.model_type, "name", str(mm.model_type)),
        "dtype": str(model_patcher.model_dtype()).replace("torch.", ""),
        "unet_parameters": sum(p.numel() for p in mm.diffusion_model.parameters()),
        "context_dim": sorted({layer.context_dim for layer in layers}),
        "cross_attention_layers": len(layers),
        "kv_parameters": sum(2 * layer.context_dim * layer.inner_dim for layer in layers),
        "infusion_values": sum(layer.inner_dim for layer in layers),  # one value vector per attn2 layer
        "layers": [
            {"name": layer.name, "heads": layer.heads, "dim_head": layer.dim_head, "context_dim": layer.context_dim}
            for layer in layers
        ],
    }
    if clip is not None:
        summary["text_encoders"] = text_encoder_names(clip)
    return summary
