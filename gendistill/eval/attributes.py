"""Caption attribute accuracy: does a clip have the pitch and loudness its caption asks for?

The family accuracy (``eval.accuracy``) is near 100 % for the teacher and the students alike, so
it cannot show whether guidance (omega) or nu-interpolation follows a caption more closely. The
synthsounds captions also name a pitch (low / mid / high, an octave apart) and a loudness
(quiet / loud, 9.5 dB apart), which the log-mel spectrogram shows directly:

- pitch: the clip's energy-weighted mean spectral centroid, in mel bins;
- loudness: the clip's mean frame energy, in dB.

Each is read against the real clips of the same family and speed: a clip is given the
attribute value whose real median is nearest (families differ: a noise burst sits above a tone
of the same pitch, a pluck is quieter than a siren of the same loudness; a fast chirp sweeps
higher than a slow one).
"""
from __future__ import annotations

import torch

from ..data.synthsounds import FAMILIES, LOUDNESS, PITCHES, SPEEDS, attributes_of
from .modulation import centroid_and_weight, mel_power


def pitch_and_loudness(features: torch.Tensor, vocoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) mean spectral centroid (mel bins, energy-weighted over frames) and (B,) mean frame
    energy in dB of normalised log-mels (B, 1, n_mels, frames)."""
    power = mel_power(features, vocoder)
    centroid, weight = centroid_and_weight(power)
    loudness = 10 * torch.log10(power.sum(1).mean(-1).clamp_min(1e-30))
    return (weight * centroid).sum(-1).float(), loudness.float()


def _medians(values: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor,
             num_values: int) -> torch.Tensor:
    """(groups, values) median of ``values`` per group (family and speed) and attribute value
    (NaN where the real clips have none)."""
    out = torch.full((len(FAMILIES) * len(SPEEDS), num_values), float("nan"))
    for g in range(len(out)):
        for k in range(num_values):
            chosen = values[(groups == g) & (labels == k)]
            if len(chosen):
                out[g, k] = chosen.median()
    return out


def _nearest(values: torch.Tensor, groups: torch.Tensor, medians: torch.Tensor):
    return (values[:, None] - medians[groups]).abs().nan_to_num(float("inf")).argmin(1)


NO_ATTRIBUTES = {"pitch_acc": None, "loudness_acc": None, "attribute_acc": None,
                 "attribute_acc_real": None, "attribute_n": 0}


def attribute_accuracy(real: torch.Tensor, real_captions: list[str], fake: torch.Tensor,
                       fake_captions: list[str], vocoder) -> dict:
    """Share of ``fake`` clips whose pitch / loudness / both match their captions, read against
    the medians of the ``real`` clips of each family and speed; ``attribute_acc_real``: the
    same of the real clips themselves (the ceiling this reading allows). Only clips whose
    captions name a family, a speed, a pitch and a loudness that the real clips have, with a
    real median for the named pitch and loudness, are read (``attribute_n``); None where no
    clip is."""
    def named(captions):
        """(group, pitch, loudness) each caption names, and which captions name all four."""
        names = torch.tensor([attributes_of(c) for c in captions],
                             dtype=torch.long).reshape(-1, 4)
        family, speed, pitch, loud = names.T
        return (family * len(SPEEDS) + speed, pitch, loud), (names >= 0).all(1)

    def matches(names, measured):
        (group, pitch, loud), (measured_pitch, measured_loud) = names, measured
        return (_nearest(measured_pitch, group, medians[0]) == pitch,
                _nearest(measured_loud, group, medians[1]) == loud)

    (group, pitch, loud), keep = named(real_captions)
    if not keep.any():
        return dict(NO_ATTRIBUTES)
    real_names = (group[keep], pitch[keep], loud[keep])
    real_measured = pitch_and_loudness(real[keep].float().cpu(), vocoder)
    medians = (_medians(real_measured[0], real_names[0], real_names[1], len(PITCHES)),
               _medians(real_measured[1], real_names[0], real_names[2], len(LOUDNESS)))
    (group, pitch, loud), keep = named(fake_captions)
    # read only what the real clips have a median for
    keep &= medians[0][group.clamp_min(0), pitch.clamp_min(0)].isfinite()
    keep &= medians[1][group.clamp_min(0), loud.clamp_min(0)].isfinite()
    if not keep.any():
        return dict(NO_ATTRIBUTES)
    pitch_ok, loud_ok = matches((group[keep], pitch[keep], loud[keep]),
                                pitch_and_loudness(fake[keep].float().cpu(), vocoder))
    real_pitch_ok, real_loud_ok = matches(real_names, real_measured)
    return {"pitch_acc": round(float(pitch_ok.float().mean()), 4),
            "loudness_acc": round(float(loud_ok.float().mean()), 4),
            "attribute_acc": round(float((pitch_ok & loud_ok).float().mean()), 4),
            "attribute_acc_real": round(float((real_pitch_ok & real_loud_ok).float().mean()), 4),
            "attribute_n": len(pitch_ok)}
