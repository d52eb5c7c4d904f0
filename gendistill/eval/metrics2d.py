"""Exact metrics for 2-D (any low-dimensional vector) samples against the true distribution.

- Sliced Wasserstein-2: ``SW2(P, Q) = sqrt(E_θ W2²(θᵀP, θᵀQ))`` over directions θ uniform on the
  unit sphere (Monte Carlo, ``num_projections`` seeded directions); each 1-D W2² is the mean
  squared difference of the sorted projections (quantile functions when the sizes differ).
  For a translation Q = P + m this is ``|m| / sqrt(d)`` (the 1-D W2² is (θ·m)² and
  E(θ·m)² = |m|²/d); ``sliced_wasserstein(..., scale_by_dim=True)`` multiplies by sqrt(d) so
  that a translation reads as its length |m|, the full W2 of a translation.
- RBF-MMD²: Gaussian kernel ``k(a, b) = exp(−|a − b|² / (2 h²))`` with bandwidth h, the
  unbiased U-statistic by default (can be slightly negative for identical distributions) or the
  biased V-statistic. The default h = 0.05 is toy2d's own length scale, the width of its modes
  (ring std 0.08, spiral 0.04, pinwheel arms 0.05 across): at that scale a model that smears
  the modes together scores far from one that keeps them, where SW2 barely moves (a 0.12 blur
  of the true samples: SW2 +33 %, MMD² 0 → 0.0045, precision 0.99 → 0.79).

``score_2d`` scores a conditional model per class (the four toy2d classes overlap in the plane,
so a label-blind score would not see a sample of the wrong class) and reports the mean over
classes next to SW2 of all points; precision / recall come from ``knn``.
"""
from __future__ import annotations

import torch

from .knn import DEFAULT_K, precision_recall

DEFAULT_BANDWIDTH = 0.05
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
             seed: int = 0, k: int = DEFAULT_K) -> dict:
    """SW2 of all points; MMD², precision, recall, density and coverage per class and their
    means over classes (over all points when there are no labels)."""
    samples, reference = torch.as_tensor(samples).cpu(), torch.as_tensor(reference).cpu()

    def scores(a, b):
        return {"MMD": mmd_rbf(a, b, bandwidth), **precision_recall(b, a, k, seed)}

    out = {"SW2": sliced_wasserstein(samples, reference, num_projections, seed), "per_class": {}}
    if labels is None or ref_labels is None:
        return {**out, **scores(samples, reference)}
    labels, ref_labels = torch.as_tensor(labels).cpu(), torch.as_tensor(ref_labels).cpu()
    for c in sorted(set(labels.tolist())):
        a, b = samples[labels == c], reference[ref_labels == c]
        if len(a) <= k or len(b) <= k:
            raise ValueError(f"class {c}: {len(a)} samples and {len(b)} reference points; "
                             f"per-class scores need more than {k} of each")
        name = class_names[c] if class_names else str(c)
        out["per_class"][name] = {"SW2": sliced_wasserstein(a, b, num_projections, seed),
                                  **scores(a, b)}
    for key in ("MMD", "precision", "recall", "density", "coverage"):
        out[key] = sum(v[key] for v in out["per_class"].values()) / len(out["per_class"])
    return out
