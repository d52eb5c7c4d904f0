"""k-nearest-neighbour fidelity and diversity of samples against real data, in any feature space.

Each real point x_i gets a ball of radius NND_k(x_i), the distance to its k-th nearest real
neighbour (itself excluded); likewise each generated point y_j among the generated points.

- precision (Kynkäänniemi et al. 2019): the share of generated points inside some real ball —
  a blurred model puts samples between the modes, outside every ball;
- recall: the share of real points inside some generated ball — a dropped mode loses its reals;
- density (Naeem et al. 2020): ``1/(kM) Σ_j #{i: y_j ∈ B(x_i)}``, how many real balls hold a
  generated point on average, divided by k (≈ 1 when the distributions agree; robust to outliers
  in the real set, unlike precision);
- coverage: the share of real balls that hold at least one generated point.

Both sets are cut to the same size (the smaller one, a seeded random subset) since the radii
shrink with the set's size; values are then comparable between models scored the same way.
"""
from __future__ import annotations

import torch

DEFAULT_K = 5


def _distances(a: torch.Tensor, b: torch.Tensor, block: int = 4096) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + block], b) for i in range(0, len(a), block)])


def knn_radii(x: torch.Tensor, k: int = DEFAULT_K) -> torch.Tensor:
    """Distance from each point of ``x`` to its k-th nearest other point of ``x``."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} points, got {len(x)}")
    return _distances(x, x).kthvalue(k + 1, dim=1).values  # the 1st is the point itself


def precision_recall(real, fake, k: int = DEFAULT_K, seed: int = 0) -> dict:
    """Precision, recall, density and coverage of ``fake`` (M, D) against ``real`` (N, D)."""
    real = torch.as_tensor(real).double().cpu().flatten(1)
    fake = torch.as_tensor(fake).double().cpu().flatten(1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall needs points of one dimension, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    n = min(len(real), len(fake))
    g = torch.Generator().manual_seed(seed)
    real = real[torch.randperm(len(real), generator=g)[:n]]
    fake = fake[torch.randperm(len(fake), generator=g)[:n]]
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    inside_real = _distances(fake, real) <= real_radii.unsqueeze(0)   # (fake, real)
    inside_fake = _distances(real, fake) <= fake_radii.unsqueeze(0)   # (real, fake)
    return {"precision": float(inside_real.any(1).double().mean()),
            "recall": float(inside_fake.any(1).double().mean()),
            "density": float(inside_real.double().sum() / (k * n)),
            "coverage": float(inside_real.any(0).double().mean()),
            "knn_k": k, "knn_points": n}
