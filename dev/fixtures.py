"""Test fixtures: tiny models with random weights (no weights can be downloaded) and random concepts.

* ``write_tiny_sd15_checkpoint``: a checkpoint file that the stock ``CheckpointLoaderSimple`` detects as
  SD1.5 — model_channels 320 and context 768 (what ComfyUI's detection keys on) but a single UNet level with
  one res block and one transformer, the full CLIP-L text encoder (ComfyUI's SD1 CLIP has a fixed config)
  and a TAESD VAE. About 300 MB in fp16; generated at test time, never committed.
* ``tiny_sd15_in_memory`` / ``tiny_sdxl_in_memory`` / ``tiny_sd2_in_memory``: MODEL, CLIP, VAE objects built
  directly in memory (32-64 channels), for fast in-process tests.
* ``random_concept`` / ``write_concept``: a concept file for a given MODEL/CLIP from random tensors.
* ``FixedBlend``, ``dci_sample``, ``BranchProbe``: DCI sampling with a forced blend weight, and a record of
  which model calls ran both branches.

Callers boot ComfyUI first (``dev.harness``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

TINY_SD15_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1],
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def _torch_reset(module: torch.nn.Module):
    """torch's own reset_parameters for a layer (ComfyUI's operation classes override it with a no-op)."""
    for klass in type(module).__mro__:
        if klass.__module__.startswith("torch.nn") and "reset_parameters" in klass.__dict__:
            return klass.reset_parameters
    return None


KEEP_CONSTRUCTOR_VALUES = ("vae_scale", "vae_shift")  # TAESD sets these (1 and 0) itself


def _init_random(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip weight initialisation; give every layer torch's default init, seeded.

    Parameters outside torch layers (e.g. CLIP's ``text_projection``) are created empty too: they get a small
    normal init, except those whose constructor set real values (``KEEP_CONSTRUCTOR_VALUES``).
    """
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        initialised: set[int] = set()
        for m in module.modules():
            reset = _torch_reset(m)
            if reset is not None:
                reset(m)
                initialised.update(id(p) for p in m.parameters(recurse=False))
        for name, p in module.named_parameters():
            if id(p) in initialised or name.rsplit(".", 1)[-1] in KEEP_CONSTRUCTOR_VALUES:
                continue
            with torch.no_grad():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
                else:
                    p.zero_()
    finally:
        torch.random.set_rng_state(gen_state)


def _small_text_embeddings(text_model: torch.nn.Module, seed: int) -> None:
    """SD's CLIP embeddings are small; default init (std 1) would drown the position embeddings."""
    g = torch.Generator().manual_seed(seed)
    emb = text_model.embeddings
    with torch.no_grad():
        emb.token_embedding.weight.copy_(torch.randn(emb.token_embedding.weight.shape, generator=g) * 0.02)
        emb.position_embedding.weight.copy_(torch.randn(emb.position_embedding.weight.shape, generator=g) * 0.01)


def tiny_sd15_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    import json

    import comfy.clip_model
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    sd: dict[str, torch.Tensor] = {}
    unet = UNetModel(**TINY_SD15_UNET, operations=comfy.ops.disable_weight_init)
    _init_random(unet, seed)
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    del unet

    config_path = Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json"
    clip_config = json.loads(config_path.read_text())
    text = comfy.clip_model.CLIPTextModel(clip_config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    _init_random(text, seed + 1)
    _small_text_embeddings(text.text_model, seed + 3)
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in text.state_dict().items()})
    del text

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_random(vae, seed + 2)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def write_tiny_sd15_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the SD1.5-detected tiny checkpoint atomically; returns its path."""
    from dci.files.atomic import write_safetensors

    return write_safetensors(path, tiny_sd15_state_dict(seed), {"purpose": "tiny random SD1.5-architecture test model"})


def _cpu_patcher(model):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


TINY_IN_MEMORY_UNET = {
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1],
    "context_dim": 64,
    "num_heads": 2,
    "num_head_channels": -1,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "in_channels": 4,
    "out_channels": 4,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
}

TINY_CLIP_L = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 64,
}


def _in_memory(config_class, unet: dict, tokenizer_class, clip_class, encoders: dict[str, dict], seed: int,
               extra_options: dict | None = None):
    """(MODEL, CLIP, VAE) on the CPU: ComfyUI's model config with ``unet``, a CLIP whose text encoders
    (``encoders``: ComfyUI name → config overrides) get small random embeddings, and a random TAESD VAE."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.taesd.taesd

    model = config_class(dict(unet)).get_model({})
    _init_random(model.diffusion_model, seed)
    patcher = _cpu_patcher(model)
    cpu = torch.device("cpu")
    options = {f"{name}_model_config": dict(cfg) for name, cfg in encoders.items()}
    options.update(dtype=torch.float32, load_device=cpu, offload_device=cpu, initial_device=cpu, **(extra_options or {}))
    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer_class, clip_class), model_options=options)
    _init_random(clip.cond_stage_model, seed + 1)
    for i, name in enumerate(encoders):
        _small_text_embeddings(getattr(clip.cond_stage_model, name).transformer.text_model, seed + 3 + i)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_random(taesd, seed + 2)
    return patcher, clip, comfy.sd.VAE(sd=taesd.state_dict())


def tiny_sd15_in_memory(seed: int = 0):
    """(MODEL, CLIP, VAE) of the SD1.5 family with a 32-channel UNet and a 64-wide, 2-layer CLIP."""
    import comfy.sd1_clip
    import comfy.supported_models

    return _in_memory(comfy.supported_models.SD15, TINY_IN_MEMORY_UNET, comfy.sd1_clip.SD1Tokenizer,
                      comfy.sd1_clip.SD1ClipModel, {"clip_l": TINY_CLIP_L}, seed)


TINY_CLIP_G = {
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,  # SDXL reads the penultimate layer, which needs more than 2
    "projection_dim": 96,
}

TINY_SDXL_UNET = {
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1],
    "context_dim": TINY_CLIP_L["hidden_size"] + TINY_CLIP_G["hidden_size"],
    "adm_in_channels": TINY_CLIP_G["projection_dim"] + 6 * 256,
    "num_classes": "sequential",
    "num_heads": -1,
    "num_head_channels": 16,
    "use_linear_in_transformer": True,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "in_channels": 4,
    "out_channels": 4,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
}


def tiny_sdxl_in_memory(seed: int = 0):
    """(MODEL, CLIP, VAE) of the SDXL family: two text encoders (64- and 96-wide), a 32-channel UNet."""
    import comfy.sdxl_clip
    import comfy.supported_models

    return _in_memory(comfy.supported_models.SDXL, TINY_SDXL_UNET, comfy.sdxl_clip.SDXLTokenizer,
                      comfy.sdxl_clip.SDXLClipModel,
                      {"clip_l": {**TINY_CLIP_L, "num_hidden_layers": 3}, "clip_g": TINY_CLIP_G}, seed)


def tiny_sd2_in_memory(seed: int = 0):
    """(MODEL, CLIP, VAE) of the SD2.x family: a 64-wide CLIP-H-architecture encoder, a 64-channel UNet."""
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip as sd2_clip

    # SD20 forces 64 channels per head, so the UNet is 64 channels wide (1 and 2 heads)
    unet = {**TINY_IN_MEMORY_UNET, "model_channels": 64, "use_linear_in_transformer": True}
    return _in_memory(comfy.supported_models.SD20, unet, sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel,
                      {"clip_h": {**TINY_CLIP_L, "num_hidden_layers": 3}}, seed, {"model_name": "clip_h"})


def random_concept(model, clip, trigger: str = "sks", class_noun: str = "dog", k: int = 2, scale: float = 0.05,
                   seed: int = 0, family: str = "sd1"):
    """A concept for ``model``/``clip`` with random K/V deltas and token rows (no training needed)."""
    from dci.comfyui.concept import base_fingerprint, base_kv_weights
    from dci.comfyui.tokenizer import text_encoder_widths
    from dci.files.concept import Concept

    g = torch.Generator().manual_seed(seed)
    deltas = {key: torch.randn(w.shape, generator=g) * scale for key, w in base_kv_weights(model).items()}
    tokens = {enc: torch.randn(k, width, generator=g) * 0.02 for enc, width in text_encoder_widths(clip).items()}
    return Concept(
        family=family, trigger=trigger, class_noun=class_noun, kv_deltas=deltas, tokens=tokens,
        base_fingerprint=base_fingerprint(model), method="test", steps=0, training={"note": "random tensors"},
    )


def tiny_clip_vision(folder: str | os.PathLike, seed: int = 0):
    """A CLIP_VISION of ComfyUI's own class (``comfy.clip_vision.ClipVisionModel``) from a tiny config (two layers,
    width 32, 28×28 input, 16-dim embeddings), random weights."""
    import json

    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
              "image_size": 28, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
              "num_channels": 3, "num_hidden_layers": 2, "patch_size": 14, "projection_dim": 16}
    path = Path(folder) / "tiny_clip_vision.json"
    path.write_text(json.dumps(config))
    vision = comfy.clip_vision.ClipVisionModel(str(path))
    _init_random(vision.model, seed)
    return vision


def random_infusion_concept(model, clip, trigger: str = "sks", class_noun: str = "dog", scale: float = 0.5,
                            keys: bool = False, seed: int = 0):
    """An Infusion concept for ``model``/``clip``: random residual vectors (values; keys too with ``keys``) and
    one token row (no training needed)."""
    from dci.comfyui.concept import base_fingerprint
    from dci.comfyui.model import cross_attention_layers
    from dci.comfyui.tokenizer import text_encoder_widths
    from dci.files.concept import Concept

    g = torch.Generator().manual_seed(seed)
    residuals = {}
    for layer in cross_attention_layers(model):
        base = layer.weight_prefix.rstrip(".")
        residuals[f"{base}.to_v"] = torch.randn(layer.inner_dim, generator=g) * scale
        if keys:
            residuals[f"{base}.to_k"] = torch.randn(layer.inner_dim, generator=g) * scale
    tokens = {enc: torch.randn(1, w, generator=g) * 0.02 for enc, w in text_encoder_widths(clip).items()}
    return Concept(family="sd1", trigger=trigger, class_noun=class_noun, kv_deltas={}, tokens=tokens,
                   residuals=residuals, base_fingerprint=base_fingerprint(model), method="infusion", steps=0,
                   training={"note": "random tensors"})


def concepts_folder() -> Path:
    """The in-process ComfyUI's models/concepts folder."""
    from dci.comfyui.folders import concepts_folder as folder

    path = folder()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_concept(concept, name: str) -> str:
    """Save into the in-process concepts folder; returns the name the loader node takes."""
    from dci.files.concept import save_concept

    return save_concept(concept, concepts_folder(), name, overwrite=True).name


class FixedBlend:
    """Stand-in DBIM settings whose blend weight is a constant: w = 1 keeps the concept rows' own attention
    output, w = 0 gives them their auxiliary partner's. Tests force the weight with it."""

    lam = 0.0

    def __init__(self, w: float):
        self.w = w

    def weights(self, p_c, p_a, **_masks):
        return torch.full(p_c.shape[:3], self.w, dtype=torch.float32)

    def plan(self, **_masks):
        return None

    def weights_qk(self, q_c, k_c, q_a, k_a, heads, plan, chunk_size=None):
        return torch.full((q_c.shape[0], heads, q_c.shape[1]), self.w, dtype=torch.float32)


def dci_sample(model, positive, negative, latent: dict, settings, plan, seed: int = 7, steps: int = 6,
               cfg: float = 5.0, sampler: str = "euler", scheduler: str = "normal", denoise: float = 1.0):
    """What DCI KSampler does, with any DBIM settings (e.g. ``FixedBlend``)."""
    import comfy.sample
    import comfy.samplers

    from dci.comfyui.sampling.guider import build_guider

    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler,
                                     scheduler=scheduler, denoise=denoise).sigmas
    guider = build_guider(model, positive, negative, cfg, plan, settings)
    with torch.inference_mode():
        return guider.sample(noise, samples, comfy.samplers.sampler_object(sampler), sigmas, seed=seed)


class BranchProbe:
    """Which model calls of a sampling run carried both DCI branches, and at which noise level.

    ``attach`` gives a clone of a MODEL with an APPLY_MODEL wrapper of the probe's own (owner key
    ``dci_probe``); the wrapper records (sigma, two branches?) for every UNet call: two branches when the DCI
    guider sent its two-branch step with the call. Samplers that call the model once per step (euler, ddim,
    ancestral ones) give one call per step.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[float, bool]] = []

    def attach(self, model):
        import comfy.patcher_extension

        probed = model.clone()
        probed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "dci_probe", self._record)
        return probed

    def _record(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                **kwargs):
        from dci.comfyui.sampling.attention import STEP_KEY

        self.calls.append((float(t.max()), STEP_KEY in (transformer_options or {})))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def sigmas(self, two_branches: bool) -> list[float]:
        """The distinct sigmas of the calls with (True) or without (False) both branches, highest first."""
        return sorted({s for s, two in self.calls if two == two_branches}, reverse=True)


def checkpoint_cli(argv: list[str] | None, description: str, what: str, writer) -> int:
    """The command line shared by the tiny-checkpoint writers (``dev.fixtures``, ``dev.fixtures_sdxl``):
    ``PATH [--seed N]``; PATH must end in ``.safetensors``, and an existing file is kept as it is (said on
    stderr), never replaced. Prints the path written or kept."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("path", help=f"where to write the tiny {what} checkpoint (.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.path.endswith(".safetensors"):
        ap.error("the checkpoint path must end in .safetensors")
    path = Path(args.path)
    if path.exists():
        print(f"{path} exists; leaving it as it is (remove it to write a new one)", file=sys.stderr)
    else:
        writer(path, args.seed)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python3 dev/host.py python -m dev.fixtures PATH``: write the tiny SD1.5 checkpoint to PATH."""
    return checkpoint_cli(argv, __doc__.split("\n\n")[0], "SD1.5", write_tiny_sd15_checkpoint)


if __name__ == "__main__":
    from . import harness

    harness.configure()
    sys.exit(main())
