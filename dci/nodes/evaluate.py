"""Evaluation nodes: how much a customised model overfits (Infusion's two metrics, as this project
reconstructs them: ``method.overfitting``)."""

from __future__ import annotations

from ..comfyui.overfitting import (
    MAX_NOISE_LEVELS,
    FisherSettings,
    clip_vision_features,
    latent_fisher,
    progress_bar,
)
from ..method.overfitting import SHRINKAGES, MetricError, wasserstein
from ..toyworld.descriptors import FEATURES, scene_descriptors
from .common import SEED_MAX, check_clip, check_model, register, reported, shown, spec

SAMPLERS = ("euler", "euler_ancestral", "ddim", "dpmpp_2m")
SCHEDULERS = ("normal", "karras", "simple", "ddim_uniform")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


class DCIFisherDivergence:
    """Concept-agnostic overfitting: how far the customised MODEL's noise predictions drift from the base
    MODEL's on prompts without the concept."""

    NODE_ID = "DCIFisherDivergence"
    DISPLAY_NAME = "DCI Fisher Divergence"
    CATEGORY = "concept/evaluate"
    DESCRIPTION = (
        "Concept-agnostic overfitting (Infusion's latent Fisher divergence, as this pack reconstructs it): the "
        "base MODEL samples clean latents for prompts WITHOUT the concept; each is noised at several noise "
        "levels and both MODELs predict the noise from the conditional prompt. Reports the mean squared "
        "difference per latent element (ε space) and the same weighted by 1/σ² (score space), each ± its "
        "standard error over the latents. 0 means the customisation left everything else alone."
    )
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("fisher_eps", "fisher_score", "report")
    OUTPUT_TOOLTIPS = (
        "Mean (ε_base − ε_custom)² per latent element.",
        "The same weighted by 1/σ² (the score-space Fisher divergence).",
        "A readable report with standard errors and settings.",
    )
    FUNCTION = "evaluate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        d = FisherSettings(prompts=[])
        return {
            "required": {
                "base_model": spec("MODEL", "The base model (e.g. from Load Checkpoint)."),
                "custom_model": spec("MODEL", "The customised model made from it (DCI Load Concept, a LoRA, ...)."),
                "clip": spec("CLIP", "The text encoder used for the prompts of both models."),
                "prompts": spec("STRING", "One prompt per line, none of them naming the concept.", multiline=True,
                                default="a photo of a cat\na photo of a house"),
                "seeds_per_prompt": spec("INT", "Clean latents per prompt (one seed each).",
                                         default=d.seeds_per_prompt, min=1, max=64),
                "seed": spec("INT", "Seed of the sampling and of the added noise.", default=d.seed, min=0,
                             max=SEED_MAX),
                "noise_levels": spec("INT", "Timesteps per latent, spread evenly over the schedule.",
                                     default=d.noise_levels, min=1, max=MAX_NOISE_LEVELS),
                "sample_steps": spec("INT", "Steps of the base model's sampling of the clean latents.",
                                     default=d.sample_steps, min=1, max=200),
                "cfg": spec("FLOAT", "Guidance of that sampling.", default=d.cfg, min=0.0, max=30.0, step=0.1),
                "width": spec("INT", "Image width of the clean latents.", default=d.width, min=64, max=2048,
                              step=8),
                "height": spec("INT", "Image height of the clean latents.", default=d.height, min=64, max=2048,
                               step=8),
                "sampler_name": spec(list(SAMPLERS), "Sampler of the clean latents.", default=d.sampler),
                "scheduler": spec(list(SCHEDULERS), "Scheduler of the clean latents.", default=d.scheduler),
            }
        }

    def evaluate(self, base_model, custom_model, clip, prompts, seeds_per_prompt, seed, noise_levels, sample_steps,
                 cfg, width, height, sampler_name, scheduler):
        node = self.DISPLAY_NAME
        check_model(node, base_model, "base_model")
        check_model(node, custom_model, "custom_model")
        check_clip(node, clip)
        if width % 8 or height % 8:
            raise ValueError(f"{node}: width and height must be multiples of 8, got {width}×{height}")
        settings = FisherSettings(prompts=_lines(prompts), seeds_per_prompt=seeds_per_prompt, seed=seed,
                                  noise_levels=noise_levels, sample_steps=sample_steps, cfg=cfg, width=width,
                                  height=height, sampler=sampler_name, scheduler=scheduler)
        with reported(node, MetricError):
            result = latent_fisher(base_model, custom_model, clip, settings, progress_bar())
        report = (f"latent Fisher divergence (conditional predictions, {result.latents} latents × "
                  f"{result.noise_levels} noise levels, {len(settings.prompts)} prompts)\n"
                  f"ε space:     {result.eps:.6g} ± {result.eps_se:.2g}\n"
                  f"score space: {result.score:.6g} ± {result.score_se:.2g}\n"
                  f"fisher={result.eps:.6g} fisher_score={result.score:.6g}")
        return shown(report, result.eps, result.score, report)


class DCIWasserstein:
    """Concept-specific overfitting: how far the concept's images sit from the base model's class images."""

    NODE_ID = "DCIWasserstein"
    DISPLAY_NAME = "DCI Wasserstein"
    CATEGORY = "concept/evaluate"
    DESCRIPTION = (
        "Concept-specific overfitting (Infusion's Wasserstein metric, as this pack reconstructs it): W2 between "
        "Gaussians fitted to image features of the customised concept's samples and of the base model's class-"
        "noun samples, over the same context-varying prompts and seeds. Features: the CLIP vision model's image "
        "embeddings when connected, otherwise toy-world scene descriptors (background, object colour, size, "
        "position). With no more samples than feature dimensions the covariances use Ledoit-Wolf shrinkage. "
        "Also reports the per-prompt variant."
    )
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("w2", "w2_per_prompt", "report")
    OUTPUT_TOOLTIPS = (
        "W2 between the two Gaussians (the square root of W2²).",
        "Mean over prompts of the per-prompt W2² (NaN when no prompt has 2 images on each side).",
        "A readable report.",
    )
    FUNCTION = "evaluate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "concept_images": spec("IMAGE", "The customised model's images of the concept, over the prompts."),
                "class_images": spec("IMAGE", "The base model's images of the class noun, same prompts and seeds."),
                "shrinkage": spec(list(SHRINKAGES), "auto: Ledoit-Wolf shrinkage when samples <= feature "
                                  "dimensions, the sample covariance otherwise.", default="auto"),
            },
            "optional": {
                "clip_vision": spec("CLIP_VISION", "A CLIP vision model for the features (real models). "
                                    "Unconnected: toy-world scene descriptors."),
                "prompts": spec("STRING", "For the per-prompt W2: one line per prompt; the images of each side are "
                                "in prompt order, the same number per prompt. Empty: no per-prompt value.",
                                multiline=True, default=""),
            },
        }

    def evaluate(self, concept_images, class_images, shrinkage, clip_vision=None, prompts=""):
        node = self.DISPLAY_NAME
        for name, images in (("concept_images", concept_images), ("class_images", class_images)):
            if not hasattr(images, "dim") or images.dim() != 4 or images.shape[-1] < 3:
                raise ValueError(f"{node}: '{name}' must be an IMAGE batch")
            if images.shape[0] < 2:
                raise ValueError(f"{node}: '{name}' holds {images.shape[0]} image(s); a Gaussian needs at least 2")
        if clip_vision is not None and not hasattr(clip_vision, "encode_image"):
            raise ValueError(f"{node}: 'clip_vision' must be a CLIP_VISION output (Load CLIP Vision)")
        lines = _lines(prompts)
        groups = []
        for name, images in (("concept_images", concept_images), ("class_images", class_images)):
            if lines:
                n = images.shape[0]
                if n % len(lines):
                    raise ValueError(f"{node}: {n} {name} can't be split evenly over {len(lines)} prompts")
                groups.append([lines[i // (n // len(lines))] for i in range(n)])
        if clip_vision is not None:
            fa, fb = clip_vision_features(clip_vision, concept_images), clip_vision_features(clip_vision, class_images)
            kind = f"CLIP vision embeddings ({fa.shape[1]} dims)"
        else:
            fa, fb = scene_descriptors(concept_images), scene_descriptors(class_images)
            kind = f"toy-world scene descriptors ({len(FEATURES)} dims)"
        with reported(node, MetricError):
            r = wasserstein(fa, fb, *(groups if groups else (None, None)), shrinkage=shrinkage)
        per = f"{r.per_prompt_mean:.6g} over {len(r.per_prompt)} prompts" if r.per_prompt else "n/a"
        report = (f"Gaussian W2 on {kind}\n"
                  f"W2² = {r.w2_squared:.6g}, W2 = {r.w2:.6g}\n"
                  f"per-prompt W2² (mean): {per}\n"
                  f"samples {r.samples[0]} concept + {r.samples[1]} class; Ledoit-Wolf shrinkage "
                  f"{r.shrinkage[0]:.3g} / {r.shrinkage[1]:.3g}\n"
                  f"w2={r.w2:.6g}")
        return shown(report, r.w2, r.per_prompt_mean, report)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = register(DCIFisherDivergence, DCIWasserstein)
