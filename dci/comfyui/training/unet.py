"""The UNet side of training: the trainable K/V deltas on a clone of the MODEL, and the loss target.

* **One UNet.** A *clone* of the MODEL's ModelPatcher gets a weight wrapper per attn2 K/V weight
  (``add_weight_wrapper``, the mechanism ComfyUI's own LoRA trainer uses): when ComfyUI casts the weight for a
  forward pass it adds the small trainable delta. The modules are shared with the input MODEL, never copied.
* **Start token detached.** The clone also gets an attn2 replace patch per layer that detaches the
  start-of-text rows of the projected keys and values before the usual attention (chaining to a replace patch
  the input MODEL may already carry), so those rows give the K/V deltas no gradient.
* **Infusion** (``infusion_patcher``): no weight changes; an attn2 replace patch per layer adds the layer's
  trainable residual vector to the projected values (and keys, when unlocked) at the trigger's token rows,
  which each model call names in ``transformer_options[ROWS_KEY]``.
* **Loss in the model's own terms.** The raw UNet output (ε or v) is taken with a DIFFUSION_MODEL wrapper
  around ``BaseModel.apply_model``, so patches, wrappers and dtype handling are ComfyUI's.
"""

from __future__ import annotations

from contextlib import contextmanager

import comfy.model_sampling as ms
import torch
from comfy.ldm.modules import attention
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from ...method import ico, infusion
from ..model import cross_attention_layers
from .settings import TrainingError

WRAPPER_KEY = "dci_train_concept"
ROWS_KEY = "dci_train_infusion_rows"  # [B, T] bool: the trigger's token rows of the current call's context


class AddDelta:
    """Weight wrapper: the cast K/V weight plus its trainable delta."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)


class StartRowsDetached:
    """attn2 replace patch: detach the start-token rows of K and V, then attend as ComfyUI would."""

    def __init__(self, chunk: int, previous=None):
        self.chunk = chunk
        self.previous = previous

    def __call__(self, q, k, v, extra_options):
        k = ico.detach_start_rows(k, self.chunk)
        v = ico.detach_start_rows(v, self.chunk)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                             attn_precision=extra_options.get("attn_precision"),
                                             transformer_options=extra_options)


class Capture:
    """DIFFUSION_MODEL wrapper that keeps the raw UNet output (ε or v) of the latest call."""

    def __init__(self):
        self.output = None

    def __call__(self, executor, *args, **kwargs):
        self.output = executor(*args, **kwargs)
        return self.output

    def take(self) -> torch.Tensor:
        out, self.output = self.output, None
        return out


def training_patcher(model, deltas: dict[str, torch.Tensor], chunk: int):
    """A clone of ``model`` whose K/V weights carry ``deltas`` and whose attn2 layers detach start rows."""
    patcher = model.clone()
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in cross_attention_layers(model):
        for proj in ("to_k", "to_v"):
            key = f"{layer.weight_prefix}{proj}.weight"
            patcher.add_weight_wrapper(key, AddDelta(deltas[key]))
        previous = replaced.get(layer.patch_key) or replaced.get(layer.patch_key[:2])
        patcher.set_model_attn2_replace(StartRowsDetached(chunk, previous), *layer.patch_key)
    return patcher


class TrainingResidual:
    """attn2 replace patch of Infusion training: the residual vectors at the call's trigger rows."""

    def __init__(self, value: torch.Tensor, key: torch.Tensor | None, previous=None):
        self.value, self.key, self.previous = value, key, previous

    def __call__(self, q, k, v, extra_options):
        mask = extra_options.get(ROWS_KEY)
        if mask is not None:
            mask = mask.to(v.device)
            if mask.shape[1] != v.shape[1]:
                mask = mask.repeat(1, v.shape[1] // mask.shape[1])
            v = infusion.add_at(v, mask, self.value)
            if self.key is not None:
                k = infusion.add_at(k, mask, self.key)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                             attn_precision=extra_options.get("attn_precision"),
                                             transformer_options=extra_options)


def residual_keys(model, unlock_keys: bool) -> dict[str, int]:
    """The residual vectors Infusion trains for ``model``: concept-file key → width."""
    out = {}
    for layer in cross_attention_layers(model):
        base = layer.weight_prefix.rstrip(".")
        out[f"{base}.to_v"] = layer.inner_dim
        if unlock_keys:
            out[f"{base}.to_k"] = layer.inner_dim
    return out


def infusion_patcher(model, residuals: dict[str, torch.Tensor]):
    """A clone of ``model`` whose attn2 layers add ``residuals`` at the rows each call names."""
    patcher = model.clone()
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in cross_attention_layers(model):
        base = layer.weight_prefix.rstrip(".")
        previous = replaced.get(layer.patch_key) or replaced.get(layer.patch_key[:2])
        patcher.set_model_attn2_replace(TrainingResidual(residuals[f"{base}.to_v"], residuals.get(f"{base}.to_k"),
                                                         previous), *layer.patch_key)
    return patcher


def prediction_kind(model) -> str:
    """``eps`` or ``v``; refuses schedules the loss below does not handle."""
    sampling = model.get_model_object("model_sampling")
    if getattr(sampling, "sigma_data", 1.0) != 1.0 or not hasattr(sampling, "sigmas"):
        raise TrainingError("this MODEL's noise schedule is not a discrete DDPM schedule; training supports "
                            "the ε- and v-prediction schedules of SD1.x/SD2.x")
    if isinstance(sampling, ms.EDM) or not isinstance(sampling, ms.EPS) or isinstance(sampling, ms.X0):
        raise TrainingError(f"this MODEL predicts with {type(sampling).__name__}; training supports ε- and "
                            "v-prediction")
    return "v" if isinstance(sampling, ms.V_PREDICTION) else "eps"


def target(prediction: str, noise: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the UNet should output: the noise (ε-prediction) or v = (ε − σ·x0) / √(σ² + 1)."""
    if prediction == "eps":
        return noise
    s = sigma.view(-1, 1, 1, 1)
    return (noise - s * x0) / (s ** 2 + 1).sqrt()


def autograd_safe(module: torch.nn.Module) -> None:
    """Replace inference-mode parameters and buffers, and parameters that ask for gradients, by equal ordinary
    frozen tensors, one at a time (no copy kept).

    ComfyUI runs nodes under ``torch.inference_mode``, so weights loaded there are inference tensors, which
    autograd refuses to save for backward. On a CUDA device the UNet's weights, once ComfyUI had moved them
    there for an earlier sampling, were not flagged as inference tensors but still asked for gradients, and the
    first training step failed with "Inference tensors do not track version counter"; so every parameter that
    asks for gradients is re-created too (the base weights are never trained). Sampling results are unchanged.
    """
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_inference() or p.requires_grad:
                setattr(sub, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
        for name, b in list(sub.named_buffers(recurse=False)):
            if b.is_inference():
                setattr(sub, name, b.clone())


@contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool):
    """Recompute each res block and transformer in the backward pass instead of keeping its activations."""
    if not enabled:
        yield
        return
    patched = []

    def checkpointed(forward):
        def run(*args, **kwargs):
            # the UNet mutates one transformer_options dict as it goes; the recomputation must see this call's
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    try:
        for m in diffusion_model.modules():
            if isinstance(m, (ResBlock, SpatialTransformer)) and "forward" not in vars(m):
                m.forward = checkpointed(m.forward)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
