"""The Fréchet distance between two Gaussians, in one place (FAD uses it; FID goes through
torchmetrics, which computes the same quantity).

``d² = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)``. The trace of the matrix square root is computed
as ``Tr (Σ₁^½ Σ₂ Σ₁^½)^½`` (a similar matrix, symmetric positive semi-definite), from symmetric
eigendecompositions in float64, so singular covariances (fewer samples than dimensions, dead
features) give no complex parts and no NaNs.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_double(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).detach().cpu().double()


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    sym = (sigma + sigma.T) / 2
    w, v = torch.linalg.eigh(sym)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2, sigma1, sigma2 = map(_as_double, (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape,) * 2:
        raise ValueError(f"Fréchet distance needs means (D,) and covariances (D, D) of one size, "
                         f"got {tuple(mu1.shape)}, {tuple(sigma1.shape)}, {tuple(mu2.shape)}, "
                         f"{tuple(sigma2.shape)}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    value = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(float(value), 0.0)


def gaussian_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (N − 1) of (N, D) features, in float64."""
    f = _as_double(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance_of_features(features1, features2) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of (N, D) features."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
