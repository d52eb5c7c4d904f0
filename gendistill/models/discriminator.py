"""A discriminator made of small heads on a frozen network's feature maps.

CTM's GAN term (and DMD2's classifier head) judge samples through a pretrained network's
features rather than training a discriminator from pixels: each tapped feature map (a UNet
block's (B, C, H, W) output, a transformer block's (B, tokens, D), or an MLP hidden layer's
(B, D)) gets a head of its own, 1x1 conv / linear per token / linear -> GroupNorm -> SiLU ->
mean over positions -> linear, and the logits of all heads are summed. Only the heads train; the feature network is the frozen teacher.
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_CHANNELS = 64


class FeatureHead(nn.Module):
    """One feature map's head; ``shape`` is its per-sample shape: (C, H, W), (tokens, D) or
    (D,)."""

    def __init__(self, shape: tuple[int, ...], width: int = HEAD_CHANNELS):
        super().__init__()
        self.positions = len(shape) - 1  # spatial dims, a token axis, or none
        channels = shape[-1] if self.positions == 1 else shape[0]
        self.proj = nn.Conv2d(channels, width, 1) if self.positions == 2 else \
            nn.Linear(channels, width)
        self.norm = nn.GroupNorm(8, width)
        self.out = nn.Linear(width, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.proj(h)
        if self.positions == 1:  # (B, tokens, width) -> (B, width, tokens)
            h = h.transpose(1, 2)
        h = nn.functional.silu(self.norm(h))
        if self.positions:
            h = h.flatten(2).mean(2)
        return self.out(h).squeeze(1)


class FeatureDiscriminator(nn.Module):
    """Sum of one head's logit per feature map; ``feature_shapes`` are the maps' per-sample
    shapes, (C, H, W), (tokens, D) or (D,)."""

    def __init__(self, feature_shapes: list[tuple[int, ...]]):
        super().__init__()
        self.heads = nn.ModuleList(FeatureHead(tuple(shape)) for shape in feature_shapes)

    @classmethod
    def for_features(cls, features: list[torch.Tensor]) -> "FeatureDiscriminator":
        return cls([tuple(f.shape[1:]) for f in features])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        return sum(head(f.float()) for head, f in zip(self.heads, features))
