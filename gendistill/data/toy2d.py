"""toy2d: four conditional 2-D distributions whose exact samplers are known.

Class 0 ring of 8 Gaussians, 1 pinwheel, 2 checkerboard, 3 two-arm spiral; each roughly within
[-1.5, 1.5]^2, so sigma_data = 0.5 fits.
"""
from __future__ import annotations

import math

import torch

from .base import Dataset

CLASS_NAMES = ["ring", "pinwheel", "checkerboard", "spiral"]


def _ring(n, g):
    angle = torch.randint(0, 8, (n,), generator=g) * (2 * math.pi / 8)
    centres = torch.stack([angle.cos(), angle.sin()], 1)
    return centres + 0.08 * torch.randn(n, 2, generator=g)


def _pinwheel(n, g, arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    arm = torch.randint(0, arms, (n,), generator=g)
    feats = torch.randn(n, 2, generator=g) * torch.tensor([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angle = arm * (2 * math.pi / arms) + rate * feats[:, 0].exp()
    rot = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(n, 2, 2)
    return 0.5 * torch.einsum("ni,nji->nj", feats, rot)


def _checkerboard(n, g):
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + (x1.floor() % 2)
    return 0.6 * torch.stack([x1, x2], 1)


def _spiral(n, g):
    t = torch.rand(n, generator=g).sqrt() * 3 * math.pi
    arm = torch.randint(0, 2, (n,), generator=g) * math.pi
    r = t / (3 * math.pi) * 1.3
    pts = torch.stack([r * (t + arm).cos(), r * (t + arm).sin()], 1)
    return pts + 0.04 * torch.randn(n, 2, generator=g)


_SAMPLERS = [_ring, _pinwheel, _checkerboard, _spiral]


def sample_toy2d(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact samples of the class-conditional distributions for the given labels."""
    labels = torch.as_tensor(labels).cpu()
    out = torch.empty(len(labels), 2)
    for k, sampler in enumerate(_SAMPLERS):
        idx = (labels == k).nonzero().flatten()
        if len(idx):
            out[idx] = sampler(len(idx), generator)
    return out


def load_toy2d(split: str = "train", n_per_class: int = 4000, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    y = torch.arange(len(CLASS_NAMES)).repeat_interleave(n_per_class)
    return Dataset("toy2d", "vector", sample_toy2d(y, g), y=y, class_names=list(CLASS_NAMES),
                   sample_true=sample_toy2d)
