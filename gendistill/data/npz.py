"""User data from an .npz file: ``x`` plus optional ``y`` (int labels) or ``captions``.

``x`` is (N, C, H, W) images in [-1, 1], (N, D) vectors, or (N, T) waveforms when
``kind="audio"`` (turned into normalised log-mels with the default MelVocoder).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import Dataset, DataError


def load_npz(path: str | Path, kind: str | None = None) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's data problem
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if "x" not in archive.files:
        raise DataError(f"{path}: missing array 'x' (found: {', '.join(archive.files) or 'none'})")
    x = archive["x"]
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: 'x' must be numeric, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or inf values")
    kind = kind or {2: "vector", 4: "image"}.get(x.ndim)
    if kind is None or (kind == "image" and x.ndim != 4) or (kind in ("vector", "audio") and x.ndim != 2):
        raise DataError(f"{path}: 'x' has shape {x.shape}; expected (N, C, H, W) images, "
                        "(N, D) vectors or (N, T) waveforms with data.kind=audio")
    y = captions = None
    if "y" in archive.files:
        y = archive["y"]
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or y.min(initial=0) < 0:
            raise DataError(f"{path}: 'y' must be non-negative integer labels of shape (N,), "
                            f"got dtype {y.dtype} shape {y.shape}")
        y = torch.from_numpy(y.astype(np.int64))
    if "captions" in archive.files:
        captions = [str(c) for c in archive["captions"]]
    if y is not None and captions is not None:
        raise DataError(f"{path}: give either 'y' or 'captions', not both")
    x_t = torch.from_numpy(x.astype(np.float32))
    vocoder = None
    if kind == "audio":
        from ..pipelines.audio import MelVocoder

        voc = MelVocoder(num_samples=x.shape[1])
        with torch.no_grad():
            x_t = voc.encode(x_t)
        vocoder = dict(voc.config)
    class_names = [str(i) for i in range(int(y.max()) + 1)] if y is not None else None
    return Dataset(path.stem, kind, x_t, y=y, captions=captions, class_names=class_names,
                   vocoder=vocoder)
