"""Conditions as tensors: int labels, or a text encoder's token states for captions (MiniLM,
or a teacher's own text encoder); and the null one."""
from __future__ import annotations

import torch

from ..pipelines.text import MINILM, TextEncoder, load_text_encoder
from .base import Dataset


def encode_captions(captions: list[str], encoder: TextEncoder | None = None,
                    batch_size: int = 256) -> torch.Tensor:
    """Token states for each caption, each distinct caption encoded once."""
    unique = sorted(set(captions))
    encoder = encoder or load_text_encoder(MINILM)
    states = torch.cat([encoder(unique[i:i + batch_size])[0]
                        for i in range(0, len(unique), batch_size)])
    index = {c: i for i, c in enumerate(unique)}
    return states[torch.tensor([index[c] for c in captions])]


def condition_tensors(ds: Dataset, encoder: TextEncoder | None = None):
    """(cond for every sample or None, one sample's null condition or None); captions are
    encoded by ``encoder`` (a teacher's own), else MiniLM."""
    if ds.conditioning == "class":
        return ds.y, torch.tensor(ds.num_classes)
    if ds.conditioning == "text":
        encoder = encoder or load_text_encoder(MINILM)
        return encode_captions(ds.captions, encoder), encoder([""])[0][0]
    return None, None


def drop_conditions(cond: torch.Tensor, null_cond: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each condition by the null one with probability p (classifier-free guidance)."""
    if p <= 0:
        return cond
    drop = torch.rand(cond.shape[0], device=cond.device) < p
    null = null_cond.to(cond.device).expand_as(cond)
    return torch.where(drop.view(-1, *([1] * (cond.ndim - 1))), null, cond)
