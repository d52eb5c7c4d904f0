"""Exponential moving average of a model's parameters (buffers copied as they are)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """theta_ema <- d * theta_ema + (1 - d) * theta, after every optimiser step.

    With ``warmup`` the rate ramps up as d_n = min(decay, (1 + n) / (10 + n)), so that a short
    run's average is not dominated by the initial weights (for a fine-tuned student those are
    the teacher's: with a constant 0.999, 1000 steps still leave it 37 % of the average).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module):
        decay = self.current_decay()
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1
