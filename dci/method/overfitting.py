"""Overfitting metrics of a customised model, in plain torch: a latent Fisher divergence and a Gaussian W2.

Infusion (arXiv 2404.14007) names two kinds of overfitting and a metric for each; the paper's equations could
not be read, so both definitions here are this project's reconstruction from the abstract and the reviews:

* **Concept-agnostic** (the model forgets things other than the concept): a *latent Fisher divergence*.
  Clean latents sampled by the base model on prompts *without* the concept are noised at several noise
  levels; both models predict the noise from the *conditional* prompt only. The divergence is the mean of
  ``(ε_base − ε_custom)²`` per latent element (ε space) and the same weighted by ``1/σ²`` (score space,
  because ComfyUI's noised latent is ``x = x0 + σ·ε`` and the score is ``−ε/σ``). Standard errors are over
  the clean latents (the noise levels of one latent are not independent samples).
* **Concept-specific** (the concept only appears in its training photos' settings): the 2-Wasserstein
  distance between Gaussians fitted to image features of the customised concept's samples and of the base
  model's class-noun samples over the same context-varying prompts and seeds:
  ``W2² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_b^½ Σ_a Σ_b^½)^½)``. With no more samples than feature
  dimensions the sample covariance is singular and noisy, so it is replaced by the Ledoit-Wolf (2004)
  shrinkage estimate towards a scaled identity (the shrinkage this project states; the paper's choice is not
  known). The per-prompt variant fits one pair of Gaussians per prompt and averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SHRINKAGES = ("auto", "ledoit_wolf", "none")


class MetricError(ValueError):
    """The samples can't give the metric (too few, mismatched shapes, non-finite values)."""


# -- latent Fisher divergence -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FisherResult:
    """Mean squared noise-prediction difference per latent element, with standard errors over latents."""

    eps: float
    eps_se: float
    score: float
    score_se: float
    latents: int
    noise_levels: int

    def line(self) -> str:
        return (f"eps={self.eps:.6g}±{self.eps_se:.2g} score={self.score:.6g}±{self.score_se:.2g} "
                f"latents={self.latents} noise_levels={self.noise_levels}")


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    n = values.shape[0]
    mean = float(values.mean())
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def squared_differences(eps_base: torch.Tensor, eps_custom: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` predictions → ``[N]``: the mean of ``(ε_base − ε_custom)²`` over each sample's elements."""
    if eps_base.shape != eps_custom.shape:
        raise MetricError(f"the two models' noise predictions differ in shape: {tuple(eps_base.shape)} vs "
                          f"{tuple(eps_custom.shape)} (are they the same architecture?)")
    d = (eps_base.double() - eps_custom.double()).pow(2).flatten(1).mean(dim=1)
    if not torch.isfinite(d).all():
        raise MetricError("a noise prediction is NaN or infinite")
    return d


def fisher_divergence(sq_diff: torch.Tensor, sigmas: torch.Tensor) -> FisherResult:
    """``sq_diff[latent, level]``: per-element mean squared ε difference; ``sigmas[level]`` (or the same shape):
    the noise level of each entry. Needs at least two latents for a standard error."""
    if sq_diff.dim() != 2 or sq_diff.shape[0] < 1 or sq_diff.shape[1] < 1:
        raise MetricError(f"expected squared differences [latents, noise levels], got {tuple(sq_diff.shape)}")
    if sq_diff.shape[0] < 2:
        raise MetricError("the Fisher divergence needs at least 2 clean latents for a standard error; use more "
                          "prompts or seeds")
    sig = sigmas.double()
    if sig.dim() == 1:
        sig = sig.unsqueeze(0).expand_as(sq_diff)
    if sig.shape != sq_diff.shape or not (sig > 0).all():
        raise MetricError("the noise levels must be positive, one per entry or one per column")
    d = sq_diff.double()
    eps, eps_se = _mean_se(d.mean(dim=1))
    score, score_se = _mean_se((d / sig.pow(2)).mean(dim=1))
    return FisherResult(eps, eps_se, score, score_se, int(d.shape[0]), int(d.shape[1]))


# -- Gaussian W2 ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gaussian:
    mean: torch.Tensor  # [d], float64
    cov: torch.Tensor  # [d, d], float64, symmetric positive semi-definite
    samples: int
    shrinkage: float  # the weight of the scaled identity (0: the sample covariance)


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf (2004) shrinkage of the (1/n) sample covariance of ``x [n, d]`` towards ``tr(S)/d · I``.

    Returns the shrunk covariance and the shrinkage weight in [0, 1].
    """
    n, d = x.shape
    xc = x - x.mean(dim=0, keepdim=True)
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    target = mu * torch.eye(d, dtype=x.dtype, device=x.device)
    delta2 = (s - target).pow(2).sum() / d
    if float(delta2) <= 0.0:
        return target, 1.0
    # mean over samples of ‖x_k x_kᵀ − S‖_F², without forming the n outer products
    sq = xc.pow(2).sum(dim=1)
    beta_bar2 = (sq.pow(2).sum() - 2 * ((xc @ s) * xc).sum() + n * s.pow(2).sum()) / (n * n * d)
    beta2 = torch.minimum(beta_bar2, delta2)
    w = float((beta2 / delta2).clamp(0.0, 1.0))
    return w * target + (1 - w) * s, w


def fit_gaussian(features: torch.Tensor, shrinkage: str = "auto") -> Gaussian:
    """Mean and covariance of ``features [n, d]``. ``auto``: Ledoit-Wolf when ``n <= d``, else the unbiased
    sample covariance; ``ledoit_wolf`` always; ``none`` never."""
    if shrinkage not in SHRINKAGES:
        raise MetricError(f"shrinkage must be one of {', '.join(SHRINKAGES)}, got {shrinkage!r}")
    if features.dim() != 2:
        raise MetricError(f"features must be [samples, dims], got {tuple(features.shape)}")
    n, d = features.shape
    if n < 2:
        raise MetricError(f"a Gaussian needs at least 2 samples, got {n}")
    x = features.double()
    if not torch.isfinite(x).all():
        raise MetricError("the features contain NaN or infinite values")
    if shrinkage == "ledoit_wolf" or (shrinkage == "auto" and n <= d):
        cov, w = ledoit_wolf(x)
    else:
        xc = x - x.mean(dim=0, keepdim=True)
        cov, w = xc.T @ xc / (n - 1), 0.0
    return Gaussian(x.mean(dim=0), (cov + cov.T) / 2, n, w)


def psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues below zero, from rounding, → 0)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def gaussian_w2_squared(a: Gaussian, b: Gaussian) -> float:
    """``‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_b^½ Σ_a Σ_b^½)^½)``, clamped at 0 against rounding."""
    if a.mean.shape != b.mean.shape:
        raise MetricError(f"the two feature sets differ in dimension: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    root_b = psd_sqrt(b.cov)
    cross = psd_sqrt(root_b @ a.cov @ root_b)
    value = (a.mean - b.mean).pow(2).sum() + torch.trace(a.cov) + torch.trace(b.cov) - 2 * torch.trace(cross)
    return max(float(value), 0.0)


@dataclass(frozen=True)
class W2Result:
    """W2² over all samples, the per-prompt mean (and each prompt's), and how the Gaussians were estimated."""

    w2_squared: float
    per_prompt: list[float] = field(default_factory=list)
    samples: tuple[int, int] = (0, 0)
    dims: int = 0
    shrinkage: tuple[float, float] = (0.0, 0.0)

    @property
    def w2(self) -> float:
        return math.sqrt(self.w2_squared)

    @property
    def per_prompt_mean(self) -> float:
        return sum(self.per_prompt) / len(self.per_prompt) if self.per_prompt else float("nan")

    def line(self) -> str:
        return (f"w2_squared={self.w2_squared:.6g} w2={self.w2:.6g} per_prompt_w2_squared={self.per_prompt_mean:.6g} "
                f"samples={self.samples[0]}+{self.samples[1]} dims={self.dims} "
                f"shrinkage={self.shrinkage[0]:.3g}/{self.shrinkage[1]:.3g}")


def wasserstein(features_a: torch.Tensor, features_b: torch.Tensor, prompts_a: list | None = None,
                prompts_b: list | None = None, shrinkage: str = "auto") -> W2Result:
    """W2² between Gaussians fitted to ``features_a`` and ``features_b`` ([n, d] each), and, when each sample's
    prompt is given, the mean over prompts of the W2² between that prompt's two Gaussians (prompts with fewer
    than 2 samples on either side are left out; the shrinkage then nearly always applies)."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise MetricError(f"the two feature sets must be [samples, dims] of one dimension, got "
                          f"{tuple(features_a.shape)} and {tuple(features_b.shape)}")
    ga, gb = fit_gaussian(features_a, shrinkage), fit_gaussian(features_b, shrinkage)
    per_prompt: list[float] = []
    if prompts_a is not None and prompts_b is not None:
        if len(prompts_a) != features_a.shape[0] or len(prompts_b) != features_b.shape[0]:
            raise MetricError("one prompt per sample is needed for the per-prompt W2")
        for p in dict.fromkeys(prompts_a):
            ia = [i for i, q in enumerate(prompts_a) if q == p]
            ib = [i for i, q in enumerate(prompts_b) if q == p]
            if len(ia) >= 2 and len(ib) >= 2:
                per_prompt.append(gaussian_w2_squared(fit_gaussian(features_a[ia], shrinkage),
                                                      fit_gaussian(features_b[ib], shrinkage)))
    return W2Result(gaussian_w2_squared(ga, gb), per_prompt, (ga.samples, gb.samples), int(features_a.shape[1]),
                    (ga.shrinkage, gb.shrinkage))
