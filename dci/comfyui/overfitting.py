"""The overfitting metrics on ComfyUI's models: the latent Fisher divergence run, and CLIP vision features.

Fisher divergence (``method.overfitting`` has the definition): the *base* MODEL samples clean latents for
prompts without the concept (stock ``common_ksampler``, one batch of seeds per prompt). Each latent is noised at
``noise_levels`` timesteps spread evenly over the schedule (seeded noise), and both MODELs predict the noise from
the conditional prompt only, through ``BaseModel.apply_model`` with each MODEL's own patches and wrappers
(weight patches are applied when ComfyUI loads a MODEL, so two MODELs of one checkpoint share one UNet in memory
and take turns). The model inputs of the prompt (cross-attention context, and e.g. SDXL's pooled and size
conditioning) are built by ComfyUI's own ``encode_model_conds`` from the CLIP Text Encode conditioning, as a
sampler builds them. Sampler-level hooks (CFG functions) play no part: only conditional predictions are
compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import nodes
import torch

from ..method.overfitting import FisherResult, MetricError, fisher_divergence, squared_differences
from .concept import model_architecture
from .model import UnsupportedModelError, config_name, model_family

MAX_NOISE_LEVELS = 100


@dataclass(frozen=True)
class FisherSettings:
    prompts: list[str]
    seeds_per_prompt: int = 2
    seed: int = 0
    noise_levels: int = 5
    sample_steps: int = 20
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "euler"
    scheduler: str = "normal"
    negative: str = ""


def check_same_architecture(base, custom) -> None:
    """Raise MetricError when the two MODELs can't be compared prediction for prediction."""
    try:
        families = model_family(base), model_family(custom)
    except UnsupportedModelError as e:
        raise MetricError(str(e)) from None
    if families[0] != families[1] or config_name(base) != config_name(custom):
        raise MetricError(f"the two MODELs are of different kinds ({config_name(base)} vs {config_name(custom)}); "
                          "compare a customised model with the base model it was made from")
    if model_architecture(base) != model_architecture(custom):
        raise MetricError("the two MODELs have different cross-attention layouts (different architectures); "
                          "compare a customised model with the base model it was made from")
    kinds = [type(m.get_model_object("model_sampling")).__name__ for m in (base, custom)]
    if kinds[0] != kinds[1]:
        raise MetricError(f"the two MODELs predict differently ({kinds[0]} vs {kinds[1]})")


def noise_timesteps(levels: int, num_timesteps: int) -> list[int]:
    """``levels`` timesteps at the middles of equal slices of the schedule."""
    return [min(num_timesteps - 1, int((i + 0.5) * num_timesteps / levels)) for i in range(levels)]


def _model_inputs(model, positive, x_t: torch.Tensor, x0: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """The keyword inputs of ``apply_model`` for a conditioning, built as ComfyUI's samplers build them."""
    conds = comfy.sampler_helpers.convert_cond(positive)[:1]
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, x_t.to(device), device, "positive",
                                              latent_image=x0.to(device))
    return {k: v.process_cond(batch_size=x_t.shape[0], area=None).cond for k, v in conds[0]["model_conds"].items()}


def _predict_eps(model, x_t: torch.Tensor, sigma: torch.Tensor, positive, x0: torch.Tensor) -> torch.Tensor:
    """The noise a MODEL predicts for ``x_t`` at ``sigma`` from a conditional prompt (ε = (x − x̂0)/σ)."""
    mm.load_models_gpu([model])
    device = model.load_device
    topts = dict(model.model_options.get("transformer_options", {}))
    topts.update(cond_or_uncond=[0], sigmas=sigma.to(device))
    x = x_t.to(device)
    s = sigma.to(device)
    with torch.no_grad():
        inputs = _model_inputs(model, positive, x, x0, device)
        denoised = model.model.apply_model(x, s, **inputs, transformer_options=topts)
    return ((x - denoised) / s.view(-1, 1, 1, 1)).float().cpu()


def latent_fisher(base, custom, clip, settings: FisherSettings,
                  progress: Callable[[int, int], None] | None = None) -> FisherResult:
    """Sample with ``base``, noise, predict with both; see the module docstring. Raises MetricError."""
    prompts = [p.strip() for p in settings.prompts if p.strip()]
    if not prompts:
        raise MetricError("no prompts: write one prompt per line, without the concept's trigger word")
    if len(prompts) * settings.seeds_per_prompt < 2:
        raise MetricError("the Fisher divergence needs at least 2 clean latents (prompts × seeds) for a standard "
                          "error")
    if not 1 <= settings.noise_levels <= MAX_NOISE_LEVELS:
        raise MetricError(f"noise_levels must be from 1 to {MAX_NOISE_LEVELS}, got {settings.noise_levels}")
    check_same_architecture(base, custom)
    sampling = base.get_model_object("model_sampling")
    steps = noise_timesteps(settings.noise_levels, int(sampling.sigmas.shape[0]))
    sigmas = torch.stack([sampling.sigma(torch.tensor(float(t))) for t in steps]).float().cpu()
    total = len(prompts) * (1 + 2 * settings.noise_levels)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        mm.throw_exception_if_processing_interrupted()
        if progress is not None:
            progress(done, total)

    channels = base.model.latent_format.latent_channels
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(settings.negative))
    rows: list[torch.Tensor] = []
    for pi, prompt in enumerate(prompts):
        mm.throw_exception_if_processing_interrupted()
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        empty = torch.zeros(settings.seeds_per_prompt, channels, settings.height // 8, settings.width // 8)
        (out,) = nodes.common_ksampler(base, settings.seed + pi, settings.sample_steps, settings.cfg,
                                       settings.sampler, settings.scheduler, positive, negative, {"samples": empty})
        x0 = base.model.process_latent_in(out["samples"]).float().cpu()
        tick()
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + pi)
        noised = []
        for sigma in sigmas:
            noise = torch.randn(x0.shape, generator=g)
            s = sigma.expand(x0.shape[0])
            noised.append((sampling.noise_scaling(s, noise, x0), s))
        base_eps = []
        for x_t, s in noised:
            base_eps.append(_predict_eps(base, x_t, s, positive, x0))
            tick()
        per_level = []
        for (x_t, s), eb in zip(noised, base_eps, strict=True):
            per_level.append(squared_differences(eb, _predict_eps(custom, x_t, s, positive, x0)))
            tick()
        rows.append(torch.stack(per_level, dim=1))  # [seeds, levels]
    return fisher_divergence(torch.cat(rows), sigmas.double())


def progress_bar(total_hint: int = 1) -> Callable[[int, int], None]:
    """A ComfyUI progress bar fed with (done, total)."""
    bar = comfy.utils.ProgressBar(total_hint)

    def update(done: int, total: int) -> None:
        bar.update_absolute(done, total)

    return update


def clip_vision_features(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """CLIP vision image embeddings ``[B, dim]`` (ComfyUI's ``CLIPVision.encode_image``, centre crop)."""
    out = clip_vision.encode_image(images, crop=True)
    return out["image_embeds"].float().cpu()
