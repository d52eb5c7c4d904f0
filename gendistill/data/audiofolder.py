"""User audio: a folder of WAV / FLAC files with ``metadata.csv`` (``file_name,caption``), the
Hugging Face audiofolder convention.

Files are read with soundfile, mixed down to mono, resampled with torchaudio to the vocoder's
rate (16 kHz by default), cut or zero-padded to its clip length (~1 s) and turned into
normalised log-mels. A file at a lower rate than the model's is refused: upsampling cannot
bring back the missing band, and the model would learn silence there. Distilling a teacher
with its own vocoder (AudioLDM's HiFi-GAN), the clips are that vocoder's length and log-mels.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, DataError

AUDIO_SUFFIXES = (".wav", ".flac")


def read_metadata(folder: Path) -> list[tuple[str, str]]:
    path = folder / "metadata.csv"
    if not path.is_file():
        raise DataError(f"{folder}: no metadata.csv (columns file_name,caption)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"file_name", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                            f"(found: {', '.join(reader.fieldnames or []) or 'none'})")
        rows = []
        for line, row in enumerate(reader, start=2):
            name, caption = (row["file_name"] or "").strip(), (row["caption"] or "").strip()
            if not name:
                raise DataError(f"{path}, line {line}: empty file_name")
            if not caption:
                raise DataError(f"{path}, line {line}: {name} has no caption")
            rows.append((name, caption))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_clip(path: Path, sample_rate: int, num_samples: int) -> torch.Tensor:
    """One file -> (num_samples,) mono waveform at ``sample_rate``."""
    import soundfile as sf
    import torchaudio

    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise DataError(f"{path}: not a WAV or FLAC file")
    if not path.is_file():
        raise DataError(f"{path}: file not found (listed in metadata.csv)")
    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise DataError(f"{path}: cannot read audio ({e})") from None
    if len(wave) == 0:
        raise DataError(f"{path}: empty audio")
    if rate < sample_rate:
        raise DataError(f"{path}: sample rate {rate} Hz is below the model's {sample_rate} Hz")
    if not np.isfinite(wave).all():
        raise DataError(f"{path}: NaN or inf samples")
    mono = torch.from_numpy(wave.mean(axis=1))
    if rate != sample_rate:
        mono = torchaudio.functional.resample(mono, rate, sample_rate)
    clip = torch.zeros(num_samples)
    clip[:min(num_samples, len(mono))] = mono[:num_samples]
    return clip


def load_audiofolder(folder: str | Path, vocoder=None) -> Dataset:
    """The folder's clips as ``vocoder`` encodes them (a teacher's; default gendistill's
    MelVocoder)."""
    from ..pipelines.audio import MelVocoder

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"audio folder not found: {folder}")
    rows = read_metadata(folder)
    vocoder = MelVocoder() if vocoder is None else vocoder
    cfg = vocoder.config
    waves = torch.stack([read_clip(folder / name, cfg.sample_rate, cfg.num_samples)
                         for name, _ in rows])
    with torch.no_grad():
        x = vocoder.encode(waves)
    return Dataset(folder.name, "audio", x, captions=[caption for _, caption in rows],
                   vocoder=dict(cfg) if isinstance(vocoder, MelVocoder) else None)
