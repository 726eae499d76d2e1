"""A tiny checkpoint FILE that the stock ``CheckpointLoaderSimple`` detects as SDXL, generated at test time.

ComfyUI recognises SDXL by model_channels 320, linear transformer projections, a context of 2048, an ADM input
of 2816 and the input transformer depths ``[0, 0, 2, 2, 10, 10]``; it does not look at the channel
multipliers, the output depths or the middle block. So this UNet has six levels of one res block each, all
320 channels wide (``channel_mult`` 1), SDXL's input depths and one transformer per output block where SDXL has
them, with heads of 64 channels as SDXL. The text encoders are ComfyUI's full SDXL pair (its config is fixed:
CLIP-L and OpenCLIP-bigG, about 0.8 B parameters), saved in the checkpoint layout by ComfyUI's own
``process_clip_state_dict_for_saving``; the VAE is a TAESD. About 1.7 GB in fp16; never committed (tests take it from the host cache: ``cached_tiny_sdxl_checkpoint``).

``python3 dev/host.py python -m dev.fixtures_sdxl PATH`` writes one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

TINY_SDXL_FILE_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1, 1, 1, 1, 1],
    "channel_mult": [1, 1, 1, 1, 1, 1],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "context_dim": 2048,
    "num_heads": -1,
    "num_head_channels": 64,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def tiny_sdxl_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from .fixtures import _init_random, _small_text_embeddings

    def half(d: dict) -> dict:
        return {k: v.detach().to(dtype).contiguous() for k, v in d.items()}

    sd: dict[str, torch.Tensor] = {}
    unet = UNetModel(**TINY_SDXL_FILE_UNET, operations=comfy.ops.disable_weight_init)
    _init_random(unet, seed)
    sd.update(half({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}))
    del unet

    text = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32)
    _init_random(text, seed + 1)
    _small_text_embeddings(text.clip_l.transformer.text_model, seed + 3)
    _small_text_embeddings(text.clip_g.transformer.text_model, seed + 4)
    clip_sd = {f"clip_{part}.{k}": v for part in ("l", "g")
               for k, v in getattr(text, f"clip_{part}").state_dict().items()}
    del text
    config = comfy.supported_models.SDXL(dict(TINY_SDXL_FILE_UNET))
    sd.update(half(config.process_clip_state_dict_for_saving(clip_sd)))
    del clip_sd

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_random(vae, seed + 2)
    sd.update(half({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}))
    return sd


def write_tiny_sdxl_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the SDXL-detected tiny checkpoint atomically; returns its path (an existing file is kept)."""
    from dci.files.atomic import write_safetensors

    path = Path(path)
    if path.is_file():
        return path
    return write_safetensors(path, tiny_sdxl_state_dict(seed),
                             {"purpose": "tiny random SDXL-architecture test model"})


def cached_tiny_sdxl_checkpoint(seed: int = 0) -> Path:
    """The tiny SDXL checkpoint in the host cache (``dev/host.py``'s cache root, outside any checkout), written
    on first use and shared by later test runs: generating and writing its 1.7 GB takes about a minute on a
    CPU. The file name carries a hash of what decides its bytes (this module, the host's packages, the seed),
    so a change to any of them writes a new file instead of reusing a stale one."""
    import hashlib

    from . import host

    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(f"host={host.host_key()};torch={torch.__version__};seed={seed}".encode())
    folder = host.cache_root() / "test-models"
    folder.mkdir(parents=True, exist_ok=True)
    return write_tiny_sdxl_checkpoint(folder / f"tiny_sdxl-{key.hexdigest()[:12]}.safetensors", seed)


def main(argv: list[str] | None = None) -> int:
    """``python3 dev/host.py python -m dev.fixtures_sdxl PATH``: write the tiny SDXL checkpoint to PATH."""
    from .fixtures import checkpoint_cli

    return checkpoint_cli(argv, __doc__.split("\n\n")[0], "SDXL", write_tiny_sdxl_checkpoint)


if __name__ == "__main__":
    from . import harness

    harness.configure()
    sys.exit(main())
