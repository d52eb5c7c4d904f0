"""How much a sound moves over time, read from its log-mel spectrogram.

A 1-step student can keep every sound's family and pitch (so domain FAD, precision / recall and
caption accuracy are level with the teacher's) and still flatten what changes within the clip:
a tremolo's loudness swing, a siren's pitch wobble. Two depths see that, each compared with the
real clips of the same captions:

- AM depth: the standard deviation over frames of the frame energy in dB (floored 40 dB below
  the clip's loudest frame, so that how silent a pause is does not count);
- FM depth: the energy-weighted standard deviation over frames of the spectral centroid, in mel
  bins (silent frames weigh nothing).

The first and last ``EDGE`` frames (attack and release) are left out.
"""
from __future__ import annotations

import torch

EDGE = 2
FLOOR_DB = 40.0


def mel_power(features: torch.Tensor, vocoder) -> torch.Tensor:
    """(B, 1, n_mels, frames) normalised log-mels -> (B, n_mels, frames - 2 EDGE) mel power."""
    return vocoder.mel(features)[..., EDGE:-EDGE].double() ** 2


def centroid_and_weight(power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, frames) spectral centroid of each frame (mel bins) and each frame's share of the
    clip's energy (silent frames weigh nothing)."""
    bins = torch.arange(power.shape[1], dtype=power.dtype, device=power.device)[:, None]
    energy = power.sum(1).clamp_min(1e-30)
    return (bins * power).sum(1) / energy, energy / energy.sum(-1, keepdim=True)


def am_depth(features: torch.Tensor, vocoder) -> torch.Tensor:
    """(B,) standard deviation over frames of the frame energy in dB."""
    db = 10 * torch.log10(mel_power(features, vocoder).sum(1).clamp_min(1e-30))
    db = torch.maximum(db, db.amax(-1, keepdim=True) - FLOOR_DB)
    return db.std(-1).float()


def fm_depth(features: torch.Tensor, vocoder) -> torch.Tensor:
    """(B,) energy-weighted standard deviation over frames of the spectral centroid (mel
    bins)."""
    centroid, weight = centroid_and_weight(mel_power(features, vocoder))
    mean = (weight * centroid).sum(-1, keepdim=True)
    return (weight * (centroid - mean) ** 2).sum(-1).sqrt().float()


def modulation_depths(real: torch.Tensor, real_families: torch.Tensor, fake: torch.Tensor,
                      fake_families: torch.Tensor, vocoder, family_names: list[str],
                      modulated: dict[str, list[str]]) -> dict:
    """Mean AM / FM depth of ``fake`` over that of ``real`` (1 = as deep as the data; below 1
    = flattened), for each family that ``modulated`` names as moving that way ({"am": [...],
    "fm": [...]}: a ratio over a family that does not move would divide by ~0), and their mean
    per kind (``am_depth_ratio``, ``fm_depth_ratio``)."""
    measures = {"am": am_depth, "fm": fm_depth}
    per_family, means = {}, {}
    for kind, families in modulated.items():
        d_real, d_fake = measures[kind](real, vocoder), measures[kind](fake, vocoder)
        ratios = []
        for family in families:
            f = family_names.index(family)
            r, g = real_families == f, fake_families == f
            if r.any() and g.any():
                ratios.append(float(d_fake[g].mean() / d_real[r].mean()))
                per_family.setdefault(family, {})[kind] = round(ratios[-1], 4)
        means[f"{kind}_depth_ratio"] = round(sum(ratios) / len(ratios), 4) if ratios else None
    return {**means, "modulation_per_family": per_family}
