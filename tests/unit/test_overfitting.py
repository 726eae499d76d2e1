"""The overfitting metrics against closed forms and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from dci.method.overfitting import (
    Gaussian,
    MetricError,
    fisher_divergence,
    fit_gaussian,
    gaussian_w2_squared,
    ledoit_wolf,
    psd_sqrt,
    squared_differences,
    wasserstein,
)


def _gaussian_eps(x: torch.Tensor, mu: torch.Tensor, var: float, sigma: float) -> torch.Tensor:
    """ε prediction of the exact denoiser for data N(mu, s²I) noised as x = x0 + σ·ε (total variance ``var``):
    the score is −(x − μ)/var and ε̂ = −σ·score."""
    return sigma * (x - mu) / var


def test_fisher_of_two_gaussians_is_the_closed_form():
    """Score models of N(μ1, v·I) and N(μ2, v·I): ‖s1 − s2‖² = ‖μ1 − μ2‖²/v² at every x (σ⁴ in the issue's
    notation, v = σ² there); the per-element mean is that over the dimension."""
    g = torch.Generator().manual_seed(0)
    d, v = 16, 0.7
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    sigmas = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    x = torch.randn(5, 3, d, generator=g, dtype=torch.float64)
    sq = torch.stack([squared_differences(_gaussian_eps(x[:, j], mu1, v, float(s)),
                                          _gaussian_eps(x[:, j], mu2, v, float(s))) for j, s in enumerate(sigmas)],
                     dim=1)
    result = fisher_divergence(sq, sigmas)
    expected_score = float((mu1 - mu2).pow(2).sum()) / v**2
    assert result.score * d == pytest.approx(expected_score, rel=1e-12)
    assert result.score_se == pytest.approx(0.0, abs=1e-12)  # the divergence is the same at every x
    expected_eps = float((sigmas**2).mean()) * expected_score / d
    assert result.eps == pytest.approx(expected_eps, rel=1e-12)


def test_fisher_of_identical_models_is_zero():
    eps = torch.randn(4, 4, 8, 8)
    sq = torch.stack([squared_differences(eps, eps.clone()) for _ in range(3)], dim=1)
    r = fisher_divergence(sq, torch.tensor([0.5, 1.0, 2.0]))
    assert (r.eps, r.eps_se, r.score, r.score_se) == (0.0, 0.0, 0.0, 0.0)


def test_fisher_standard_error_is_over_latents():
    sq = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 1.0]])
    r = fisher_divergence(sq, torch.tensor([1.0, 1.0]))
    per_latent = np.array([2.0, 2.0, 3.0])
    assert r.eps == pytest.approx(per_latent.mean())
    assert r.eps_se == pytest.approx(per_latent.std(ddof=1) / math.sqrt(3))


def test_fisher_errors():
    with pytest.raises(MetricError, match="at least 2 clean latents"):
        fisher_divergence(torch.ones(1, 3), torch.ones(3))
    with pytest.raises(MetricError, match="same architecture"):
        squared_differences(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, 4))
    with pytest.raises(MetricError, match="positive"):
        fisher_divergence(torch.ones(2, 2), torch.tensor([1.0, 0.0]))


def test_w2_equal_covariances_is_the_mean_distance():
    g = torch.Generator().manual_seed(1)
    d = 6
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T + torch.eye(d, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    w2sq = gaussian_w2_squared(Gaussian(mu1, cov, 10, 0.0), Gaussian(mu2, cov, 10, 0.0))
    assert math.sqrt(w2sq) == pytest.approx(float((mu1 - mu2).norm()), rel=1e-6)


def test_w2_diagonal_closed_form():
    a = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    b = torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64)
    mu = torch.zeros(3, dtype=torch.float64)
    w2sq = gaussian_w2_squared(Gaussian(mu, torch.diag(a), 2, 0.0), Gaussian(mu + 1, torch.diag(b), 2, 0.0))
    assert w2sq == pytest.approx(3.0 + float((a.sqrt() - b.sqrt()).pow(2).sum()), rel=1e-12)


def test_w2_sqrtm_path_against_scipy():
    """Tr((Σ_b^½ Σ_a Σ_b^½)^½) (eigen-decompositions here) = Tr((Σ_a Σ_b)^½) (scipy's general sqrtm)."""
    g = torch.Generator().manual_seed(2)
    d = 8
    xa, xb = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, 3, generator=g, dtype=torch.float64)
    ca, cb = xa @ xa.T, xb @ xb.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu = torch.zeros(d, dtype=torch.float64)
    ours = gaussian_w2_squared(Gaussian(mu, ca, 2, 0.0), Gaussian(mu, cb, 2, 0.0))
    root = scipy.linalg.sqrtm(ca.numpy() @ cb.numpy())
    theirs = float(np.trace(ca.numpy()) + np.trace(cb.numpy()) - 2 * np.trace(root).real)
    assert ours == pytest.approx(theirs, rel=1e-8, abs=1e-10)
    r = psd_sqrt(ca)
    assert torch.allclose(r @ r, ca, atol=1e-9)


def test_ledoit_wolf_against_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    n, d = 5, 9
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, d, dtype=torch.float64)
    cov, w = ledoit_wolf(x)
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    delta2 = float(((s - mu * torch.eye(d, dtype=torch.float64)) ** 2).sum() / d)
    beta_bar2 = sum(float(((torch.outer(r, r) - s) ** 2).sum()) for r in xc) / (n * n * d)
    w_direct = min(beta_bar2, delta2) / delta2
    assert w == pytest.approx(w_direct, rel=1e-10)
    assert torch.allclose(cov, w_direct * mu * torch.eye(d, dtype=torch.float64) + (1 - w_direct) * s)
    assert 0 < w <= 1
    assert torch.linalg.eigvalsh(cov).min() > 0  # full rank although n < d


def test_fit_gaussian_shrinks_only_when_samples_do_not_exceed_dims():
    g = torch.Generator().manual_seed(4)
    assert fit_gaussian(torch.randn(50, 4, generator=g)).shrinkage == 0.0
    assert fit_gaussian(torch.randn(3, 4, generator=g)).shrinkage > 0.0
    with pytest.raises(MetricError, match="at least 2 samples"):
        fit_gaussian(torch.randn(1, 4))


def test_wasserstein_identical_sets_and_per_prompt():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(12, 5, generator=g)
    prompts = [f"p{i % 3}" for i in range(12)]
    r = wasserstein(f, f.clone(), prompts, prompts)
    assert r.w2_squared == pytest.approx(0.0, abs=1e-9)
    assert len(r.per_prompt) == 3 and max(r.per_prompt) == pytest.approx(0.0, abs=1e-9)
    shifted = wasserstein(f, f + 2.0, prompts, prompts)
    assert shifted.w2 == pytest.approx(math.sqrt(5 * 4.0), rel=1e-6)  # a pure shift: W2 = ‖shift‖
    assert all(v == pytest.approx(20.0, rel=1e-6) for v in shifted.per_prompt)
    with pytest.raises(MetricError, match="one dimension"):
        wasserstein(f, torch.randn(12, 4))
