"""synthsounds: procedurally generated, captioned sound events at 16 kHz.

Eight families (tone, chirp, noise burst, beeps, tremolo, harmonic, pluck, siren), each with
pitch (low / mid / high), speed (slow / fast) and loudness (quiet / loud), small random jitter
per clip, and captions drawn from paraphrase templates. Deterministic for a seed.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from .base import Dataset

SAMPLE_RATE = 16000
NUM_SAMPLES = 15872  # 32 log-mel frames at hop 512 (see MelVocoder)
FAMILIES = ["tone", "chirp", "noise burst", "beeps", "tremolo", "harmonic", "pluck", "siren"]
PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}
SPEEDS = {"slow": 2.0, "fast": 6.0}
LOUDNESS = {"quiet": 0.2, "loud": 0.6}
# the families whose clips move by construction (synthesize): loudness (gates, tremolo,
# decays) and pitch (sweeps, wobble), read by eval.modulation
MODULATED = {"am": ["noise burst", "beeps", "tremolo", "pluck"], "fm": ["chirp", "siren"]}
TEMPLATES = [
    "a {loud} {pitch} {family}, {speed}",
    "{family} sound, {pitch} pitch, {loud} and {speed}",
    "the sound of a {speed} {loud} {family} at a {pitch} pitch",
    "{loud} {speed} {family} in a {pitch} register",
]


def _envelope(t, attack=0.02, release=0.05):
    dur = t[-1]
    return np.clip(t / attack, 0, 1) * np.clip((dur - t) / release, 0, 1)


def synthesize(family: str, pitch: float, speed: float, loudness: float,
               rng: np.random.Generator) -> np.ndarray:
    """One clip of NUM_SAMPLES samples in [-1, 1]."""
    t = np.arange(NUM_SAMPLES) / SAMPLE_RATE
    f0 = pitch * rng.uniform(0.95, 1.05)
    phase = rng.uniform(0, 2 * np.pi)
    if family == "tone":
        wave = np.sin(2 * np.pi * f0 * t + phase)
    elif family == "chirp":  # exponential sweep up two octaves, faster when fast
        rate = np.log(4.0) * speed / 4
        wave = np.sin(2 * np.pi * f0 * (np.exp(rate * t) - 1) / rate + phase)
    elif family == "noise burst":  # band-passed noise bursts
        spec = np.fft.rfft(rng.standard_normal(NUM_SAMPLES))
        freqs = np.fft.rfftfreq(NUM_SAMPLES, 1 / SAMPLE_RATE)
        spec *= np.exp(-0.5 * ((freqs - 2 * f0) / (0.5 * f0)) ** 2)
        wave = np.fft.irfft(spec, NUM_SAMPLES)
        wave /= np.abs(wave).max() + 1e-8
        wave *= (np.sin(2 * np.pi * speed / 2 * t) > 0)
    elif family == "beeps":
        wave = np.sin(2 * np.pi * f0 * t + phase) * (np.sin(2 * np.pi * speed * t) > 0.3)
    elif family == "tremolo":
        wave = np.sin(2 * np.pi * f0 * t + phase) * (0.55 + 0.45 * np.sin(2 * np.pi * speed * t))
    elif family == "harmonic":
        wave = sum(np.sin(2 * np.pi * k * f0 * t + k * phase) / k for k in range(1, 6)) / 2.3
        wave = wave * (0.8 + 0.2 * np.sin(2 * np.pi * speed / 4 * t))
    elif family == "pluck":  # repeated exponentially decaying plucks
        period = 1.0 / (speed / 2)
        local = np.mod(t, period)
        wave = np.sin(2 * np.pi * f0 * t + phase) * np.exp(-local * 8 * speed / 2)
    elif family == "siren":
        wave = np.sin(2 * np.pi * f0 * t + 0.25 * f0 / speed * np.sin(2 * np.pi * speed / 2 * t))
    else:
        raise ValueError(f"unknown sound family {family!r}")
    return (loudness * rng.uniform(0.9, 1.1) * wave * _envelope(t)).astype(np.float32)


def caption(family: str, pitch: str, speed: str, loud: str, rng: np.random.Generator) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(family=family, pitch=pitch, speed=speed, loud=loud)


def generate_synthsounds(n_per_combo: int, seed: int):
    """(waves (N, T), captions, family index per clip), every attribute combination equally."""
    rng = np.random.default_rng(seed)
    waves, captions, families = [], [], []
    for fam_idx, family in enumerate(FAMILIES):
        for pitch, f0 in PITCHES.items():
            for speed, rate in SPEEDS.items():
                for loud, amp in LOUDNESS.items():
                    for _ in range(n_per_combo):
                        waves.append(synthesize(family, f0, rate, amp, rng))
                        captions.append(caption(family, pitch, speed, loud, rng))
                        families.append(fam_idx)
    return np.stack(waves), captions, np.array(families)


def family_of(caption_text: str) -> int:
    """The sound family a caption names (the longest family name found in it), or -1."""
    hits = [i for i, f in enumerate(FAMILIES) if f in caption_text.lower()]
    return max(hits, key=lambda i: len(FAMILIES[i])) if hits else -1


def attributes_of(caption_text: str) -> tuple[int, int, int, int]:
    """(family, speed, pitch, loudness) indices a caption names (into FAMILIES, SPEEDS,
    PITCHES, LOUDNESS), -1 for each it does not name."""
    words = set(re.findall(r"[a-z]+", caption_text.lower()))
    speed, pitch, loud = (next((k for k, name in enumerate(names) if name in words), -1)
                          for names in (SPEEDS, PITCHES, LOUDNESS))
    return family_of(caption_text), speed, pitch, loud


def load_synthsounds(split: str = "train", seed: int = 0, n_per_combo: int | None = None) -> Dataset:
    from ..pipelines.audio import MelVocoder

    n = n_per_combo or (16 if split == "train" else 4)
    waves, captions, families = generate_synthsounds(n, seed + (0 if split == "train" else 1))
    vocoder = MelVocoder(sample_rate=SAMPLE_RATE, num_samples=NUM_SAMPLES)
    with torch.no_grad():
        x = vocoder.encode(torch.from_numpy(waves))
    return Dataset("synthsounds", "audio", x, captions=captions,
                   family=torch.from_numpy(families).long(), class_names=list(FAMILIES),
                   vocoder=dict(vocoder.config))
