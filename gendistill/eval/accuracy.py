"""Conditional accuracy: the share of generated samples the domain classifier assigns to the
condition they were generated for (the class label, or the sound family a caption names)."""
from __future__ import annotations

import torch

from .classifier import DomainClassifier, load_classifier


def caption_families(captions: list[str]) -> torch.Tensor:
    """The synthsounds family index each caption names (−1 where it names none)."""
    from ..data.synthsounds import family_of

    return torch.tensor([family_of(c) for c in captions], dtype=torch.long)


def conditional_accuracy(x: torch.Tensor, targets, classifier: str | DomainClassifier) -> float:
    """Share of samples ``x`` (model space) classified as their target class. Targets are int
    labels, or captions (mapped to sound families); targets of −1 (a caption naming no family)
    are left out."""
    clf = load_classifier(classifier) if isinstance(classifier, str) else classifier
    if isinstance(targets, (list, tuple)) and targets and isinstance(targets[0], str):
        targets = caption_families(list(targets))
    targets = torch.as_tensor(targets).long().cpu()
    if len(targets) != len(x):
        raise ValueError(f"{len(x)} samples but {len(targets)} targets")
    keep = targets >= 0
    if not keep.any():
        raise ValueError("no sample has a known target class (captions name no sound family)")
    preds = clf.predict(torch.as_tensor(x)[keep].float().cpu())
    return float((preds == targets[keep]).double().mean())
