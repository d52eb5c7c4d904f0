"""Exact metrics for 2-D (any low-dimensional vector) samples against the true distribution.

- Sliced Wasserstein-2: ``SW2(P, Q) = sqrt(E_θ W2²(θᵀP, θᵀQ))`` over directions θ uniform on the
  unit sphere (Monte Carlo, ``num_projections`` seeded directions); each 1-D W2² is the mean
  squared difference of the sorted projections (quantile functions when the sizes differ).
  For a translation Q = P + m this is ``|m| / sqrt(d)`` (the 1-D W2² is (θ·m)² and
  E(θ·m)² = |m|²/d); ``sliced_wasserstein(..., scale_by_dim=True)`` multiplies by sqrt(d) so
  that a translation reads as its length |m|, the full W2 of a translation.
- RBF-MMD²: Gaussian kernel ``k(a, b) = exp(−|a − b|² / (2 h²))`` with bandwidth h
  (default 0.1, in data units: the toy2d distributions span about [−1.5, 1.5]²), the unbiased
  U-statistic by default (can be slightly negative for identical distributions) or the biased
  V-statistic.
"""
from __future__ import annotations

import torch

DEFAULT_BANDWIDTH = 0.1
DEFAULT_PROJECTIONS = 512


def _quantiles(sorted_x: torch.Tensor, k: int) -> torch.Tensor:
    """(n, P) sorted columns -> (k, P) values of the empirical quantile function at (i+½)/k."""
    n = sorted_x.shape[0]
    if n == k:
        return sorted_x
    pos = ((torch.arange(k, dtype=sorted_x.dtype) + 0.5) / k * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo).unsqueeze(1)
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac


def sliced_wasserstein(x, y, num_projections: int = DEFAULT_PROJECTIONS, seed: int = 0,
                       scale_by_dim: bool = False) -> float:
    """Sliced Wasserstein-2 distance between point sets x (N, D) and y (M, D)."""
    x, y = torch.as_tensor(x).double().cpu(), torch.as_tensor(y).double().cpu()
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced Wasserstein needs (N, D) and (M, D) points, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, num_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = (x @ theta).sort(0)
    py, _ = (y @ theta).sort(0)
    k = max(len(px), len(py))
    w2sq = (_quantiles(px, k) - _quantiles(py, k)).square().mean(0)
    value = w2sq.mean().sqrt()
    return float(value * (d ** 0.5 if scale_by_dim else 1.0))


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidth: float, block: int = 2048) -> float:
    total = 0.0
    for i in range(0, len(a), block):
        d2 = torch.cdist(a[i:i + block], b).square()
        total += float(torch.exp(-d2 / (2 * bandwidth ** 2)).sum())
    return total


def mmd_rbf(x, y, bandwidth: float = DEFAULT_BANDWIDTH, unbiased: bool = True) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel of the given bandwidth."""
    x, y = torch.as_tensor(x).double().cpu(), torch.as_tensor(y).double().cpu()
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise ValueError(f"MMD needs (N, D) and (M, D) points, N, M >= 2, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    n, m = len(x), len(y)
    kxx, kyy, kxy = (_kernel_sum(x, x, bandwidth), _kernel_sum(y, y, bandwidth),
                     _kernel_sum(x, y, bandwidth))
    if unbiased:  # drop the diagonal k(a, a) = 1 terms
        return (kxx - n) / (n * (n - 1)) + (kyy - m) / (m * (m - 1)) - 2 * kxy / (n * m)
    return kxx / n ** 2 + kyy / m ** 2 - 2 * kxy / (n * m)


def score_2d(samples, labels, reference, ref_labels, class_names=None,
             bandwidth: float = DEFAULT_BANDWIDTH, num_projections: int = DEFAULT_PROJECTIONS,
             seed: int = 0) -> dict:
    """SW2 and MMD² of samples vs reference, overall and per class (keys are class names)."""
    samples, reference = torch.as_tensor(samples).cpu(), torch.as_tensor(reference).cpu()
    out = {"SW2": sliced_wasserstein(samples, reference, num_projections, seed),
           "MMD": mmd_rbf(samples, reference, bandwidth), "per_class": {}}
    if labels is not None and ref_labels is not None:
        labels, ref_labels = torch.as_tensor(labels).cpu(), torch.as_tensor(ref_labels).cpu()
        for k in sorted(set(labels.tolist())):
            a, b = samples[labels == k], reference[ref_labels == k]
            if len(a) < 2 or len(b) < 2:
                continue
            name = class_names[k] if class_names else str(k)
            out["per_class"][name] = {"SW2": sliced_wasserstein(a, b, num_projections, seed),
                                      "MMD": mmd_rbf(a, b, bandwidth)}
    return out
