"""The dataset record every loader returns, and the error for bad user data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


class DataError(ValueError):
    """Bad user data: the message names the file, key, shape or value."""


@dataclass
class Dataset:
    """Training samples ``x`` with their conditions: int labels ``y`` or ``captions``.

    ``kind`` is "vector" (N, D), "image" (N, C, H, W) or "audio" (log-mel images, with the
    config of the ``MelVocoder`` that maps them back to waveforms; None for another vocoder's
    log-mels, a teacher's own). ``sample_true(labels, generator)``
    draws fresh samples of the exact distribution where it is known (toy2d).
    """

    name: str
    kind: str
    x: torch.Tensor
    y: torch.Tensor | None = None
    captions: list[str] | None = None
    class_names: list[str] | None = None
    family: torch.Tensor | None = None  # synthsounds: sound family of each caption
    vocoder: dict | None = None
    sample_true: Callable | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.y is not None and len(self.y) != len(self.x):
            raise DataError(f"{self.name}: {len(self.x)} samples but {len(self.y)} labels")
        if self.captions is not None and len(self.captions) != len(self.x):
            raise DataError(f"{self.name}: {len(self.x)} samples but {len(self.captions)} captions")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int | None:
        if self.y is None:
            return None
        return len(self.class_names) if self.class_names else int(self.y.max()) + 1

    @property
    def conditioning(self) -> str:
        return "class" if self.y is not None else "text" if self.captions is not None else "none"
