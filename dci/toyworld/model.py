"""The toy world's model: a tiny SD1.x-family checkpoint that every stock ComfyUI node accepts.

ComfyUI treats it as SD1.5 (``comfy.supported_models.SD15``, EPS prediction, the SD15 latent format with
scale 0.18215), so CLIPTextEncode, EmptyLatentImage, KSampler, VAEEncode and VAEDecode work unchanged:

- VAE: ComfyUI's TAESD architecture, 4 latent channels, ×8 (128×128 images → 16×16×4 latents). Its
  ``vae_scale``/``vae_shift`` are set after training so that 0.18215 × encoded latents have unit std.
- Text encoder: a narrow CLIP text transformer on the standard SD1 tokenizer (49408 tokens, 77 positions).
  The tokenizer's embedding size is set to the hidden size so ``embedding:`` prompts and raw embedding
  tensors in token lists keep working.
- UNet: ComfyUI's SD-style ``UNetModel``, small, with cross-attention (attn2) at every resolution.

All of it lives in one safetensors file with ComfyUI's checkpoint key prefixes; the architecture is in the
file's metadata, so the file alone rebuilds the model. ComfyUI is imported inside functions only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

# Defaults of the shipped model; training may override them and the file's metadata records what was used.
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": 64,
}
# Three levels (16×16, 8×8, 4×4 latents). Transformers at 8×8, 4×4 and the middle on both sides, and at
# 16×16 in the decoder's last block only: attention at the finest level is what costs on a CPU (three
# transformers there double a training step), one keeps 16×16 cross-attention maps for DCI. Lists run from
# the finest level; ComfyUI pops ``transformer_depth_output`` from the end (the coarsest output block first).
UNET_CONFIG: dict[str, Any] = {
    "model_channels": 64,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 0, 1, 1, 1, 1],
    "num_heads": 4,
}
LATENT_SCALE = 0.18215  # ComfyUI's SD15 latent format; the VAE's own scale/shift are fitted against it.

_PREFIX_UNET = "model.diffusion_model."
_PREFIX_CLIP = "cond_stage_model."
_PREFIX_VAE = "first_stage_model."


def _sd15_unet_config(unet: dict[str, Any], context_dim: int) -> dict[str, Any]:
    """A full ``UNetModel`` config in the form ``comfy.model_detection`` produces for SD1.5."""
    depth = list(unet["transformer_depth"])
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": unet["model_channels"],
        "num_res_blocks": list(unet["num_res_blocks"]),
        "transformer_depth": depth,
        "transformer_depth_output": list(unet["transformer_depth_output"]),
        "channel_mult": list(unet["channel_mult"]),
        "transformer_depth_middle": unet["transformer_depth_middle"],
        "use_linear_in_transformer": False,
        "context_dim": context_dim,
        "num_head_channels": -1,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def build_model_config(unet: dict[str, Any], context_dim: int, zsnr: bool = False):
    """The ``SD15`` model config for the toy UNet; heads are ours, not SD1.5's 8 (too narrow here).

    ``zsnr``: SD's schedule rescaled to zero terminal SNR (ComfyUI's own ``zsnr`` sampling setting, the
    same schedule its ModelSamplingDiscrete node offers), so sampling starts from noise that carries
    nothing of an image's layout.
    """
    import comfy.supported_models

    config = comfy.supported_models.SD15(_sd15_unet_config(unet, context_dim))
    config.unet_config["num_heads"] = unet["num_heads"]
    if zsnr:
        config.sampling_settings = {**config.sampling_settings, "zsnr": True}
    return config


def build_unet(unet: dict[str, Any], context_dim: int, prediction: str = "eps", zsnr: bool = False):
    """A ``comfy.model_base.BaseModel`` (ε- or v-prediction) with uninitialised weights."""
    import comfy.model_base

    if prediction not in ("eps", "v"):
        raise ValueError(f"unknown prediction type {prediction!r} (eps or v)")
    config = build_model_config(unet, context_dim, zsnr)
    kind = comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
    return comfy.model_base.BaseModel(config, model_type=kind)


def clip_target(hidden_size: int):
    """SD15's text encoder classes, with the tokenizer's embedding size matched to the hidden size."""
    import comfy.sd1_clip
    import comfy.supported_models_base

    token_cls = functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=hidden_size)
    tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=token_cls)
    return comfy.supported_models_base.ClipTarget(tokenizer, comfy.sd1_clip.SD1ClipModel)


def build_clip(text: dict[str, Any], embedding_directory: str | None = None):
    """A ``comfy.sd.CLIP`` with an uninitialised narrow text transformer."""
    import comfy.sd

    return comfy.sd.CLIP(
        clip_target(text["hidden_size"]),
        embedding_directory=embedding_directory,
        model_options={"clip_l_model_config": dict(text), "dtype": torch.float32},
    )


def build_taesd():
    """ComfyUI's TAESD module, uninitialised."""
    import comfy.taesd.taesd

    return comfy.taesd.taesd.TAESD(latent_channels=4)


def init_weights(module: torch.nn.Module) -> None:
    """Plain PyTorch initialisation for a model built with ComfyUI's init-skipping ops.

    ComfyUI's ``disable_weight_init`` layers leave weights as ``torch.empty``; training from scratch
    needs real values. Layers that SD zero-initialises (UNet output convs, transformer ``proj_out``)
    are zeroed again so that every residual branch starts as the identity.
    """
    for m in module.modules():
        for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm):
            if isinstance(m, cls):
                cls.reset_parameters(m)
        if isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.02)
    for name, m in module.named_modules():
        zero = name.endswith("proj_out") or name.endswith("out_layers.3") or name == "out.2"
        if zero and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.zeros_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def state_dict_for_file(
    diffusion_model: torch.nn.Module, clip_model: torch.nn.Module, taesd: torch.nn.Module
):
    """All weights under ComfyUI checkpoint prefixes, fp16."""
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in ((_PREFIX_UNET, diffusion_model), (_PREFIX_CLIP, clip_model), (_PREFIX_VAE, taesd)):
        for k, v in mod.state_dict().items():
            out[prefix + k] = v.detach().to(torch.float16).contiguous().clone()
    return out


def file_metadata(text: dict[str, Any], unet: dict[str, Any], extra: dict[str, Any]) -> dict[str, str]:
    """Safetensors metadata (strings only) that lets ``load_toyworld`` rebuild the architecture."""
    meta = {"toyworld.text_config": json.dumps(text), "toyworld.unet_config": json.dumps(unet)}
    meta.update({f"toyworld.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a toy-world file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def load_toyworld(path: str | Path, embedding_directory: str | None = None):
    """Builds ``(model_patcher, clip, vae)`` from one toy-world safetensors file.

    The three objects are the ones ComfyUI's checkpoint loader returns, so they go straight into stock
    nodes. Weights are kept in fp32 at run time: the model is small and the CPU has no fast fp16.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    meta = read_metadata(path)
    text = json.loads(meta["toyworld.text_config"])
    unet = json.loads(meta["toyworld.unet_config"])

    prediction = meta.get("toyworld.prediction", "eps")
    zsnr = meta.get("toyworld.zsnr", "false") == "true"
    model = build_unet(unet, text["hidden_size"], prediction, zsnr)
    missing, unexpected = model.diffusion_model.load_state_dict(
        {k: v.float() for k, v in _sub(sd, _PREFIX_UNET).items()}, strict=False
    )
    if missing or unexpected:
        raise ValueError(
            f"toy-world UNet weights don't match: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.diffusion_model.float()
    patcher = comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )

    clip = build_clip(text, embedding_directory)
    clip_sd = {k: v.float() for k, v in _sub(sd, _PREFIX_CLIP).items()}
    missing, unexpected = clip.cond_stage_model.load_state_dict(clip_sd, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ValueError(
            f"toy-world text weights don't match: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )

    vae = comfy.sd.VAE(sd={k: v.float() for k, v in _sub(sd, _PREFIX_VAE).items()})
    return patcher, clip, vae


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (for reports)."""
    return sum(p.numel() for p in module.parameters())
