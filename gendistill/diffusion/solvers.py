"""Deterministic probability-flow ODE solvers: dx/dsigma = (x - D_w(x, sigma, c)) / sigma.

Euler and Heun (EDM Algorithm 1) over any decreasing sigma grid; a final sigma of 0 takes an
Euler step, as in EDM (so N grid points + 0 cost 2N - 1 network evaluations with Heun).
"""
from __future__ import annotations

import torch

from .sigmas import append_dims
from .teachers import Denoiser, cfg_denoise


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def _sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(device=x.device, dtype=x.dtype).expand(x.shape[0])


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond=None,
                 guidance=1.0, progress=None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = _sigma_batch(sigmas[i], x), _sigma_batch(sigmas[i + 1], x)
        d = to_d(x, sigma, cfg_denoise(denoiser, x, sigma, cond, guidance))
        x = x + append_dims(sigma_next - sigma, x.ndim) * d
        if progress is not None:
            progress.update(1)
    return x


def heun_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              cond=None, guidance=1.0) -> torch.Tensor:
    """One Heun step from sigma to sigma_next (per-sample tensors); Euler where sigma_next = 0."""
    d = to_d(x, sigma, cfg_denoise(denoiser, x, sigma, cond, guidance))
    dt = append_dims(sigma_next - sigma, x.ndim)
    x_euler = x + dt * d
    if bool((sigma_next == 0).all()):
        return x_euler
    d_next = to_d(x_euler, sigma_next, cfg_denoise(denoiser, x_euler, sigma_next, cond, guidance))
    return x + dt * (d + d_next) / 2


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond=None,
                guidance=1.0, progress=None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        x = heun_step(denoiser, x, _sigma_batch(sigmas[i], x), _sigma_batch(sigmas[i + 1], x),
                      cond, guidance)
        if progress is not None:
            progress.update(1)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}
