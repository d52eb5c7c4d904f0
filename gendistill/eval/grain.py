"""Grain: how much a sample flickers where it should be dark.

Domain FID / FAD and precision / recall read a classifier's features, which ignore low-level
speckle in a digit's background or in the silent bins of a log-mel; a 1-step student can add
it while those scores improve (README: the sound student jumping from sigma = 5). Measured as
the mean absolute change between vertically neighbouring pixels (mel bins) that are both dark,
below ``DARK`` in the data's [-1, 1] units: a smooth background scores near 0, noise on it its
mean absolute difference.
"""
from __future__ import annotations

import torch

DARK = -0.8


def grain(x: torch.Tensor, dark: float = DARK) -> float | None:
    """Mean |x[..., i + 1, :] - x[..., i, :]| over the neighbouring pairs that are both below
    ``dark``, for images or log-mels (N, C, H, W); None where no such pair exists (nothing to
    measure: a grey or NaN batch is not smooth)."""
    x = x.float().clamp(-1, 1)
    below, above = x[..., 1:, :], x[..., :-1, :]
    both = (below < dark) & (above < dark)
    if not both.any():
        return None
    return float(((below - above).abs() * both).sum() / both.sum())
