"""Noise levels in sigma space: the Karras grid, training-time sigma samplers and EDM scalings.

Convention (DESIGN.md section 3): x_sigma = x_0 + sigma * eps. Every other parameterisation
(VP, flow matching) is converted to this one by the teacher adapters.
"""
from __future__ import annotations


import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO, device=None) -> torch.Tensor:
    """Karras et al. (2022) grid of n points, index 0 = sigma_max, index n-1 = sigma_min."""
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1, got {n}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64, device=device).float()
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((max_inv + ramp * (min_inv - max_inv)) ** rho).float()


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_lognormal(n: int, p_mean: float = -1.2, p_std: float = 1.2, device=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM training distribution: ln(sigma) ~ N(p_mean, p_std^2)."""
    return (p_mean + p_std * torch.randn(n, device=device, generator=generator)).exp()


def sample_karras_map(n: int, u_max: float = 0.7, sigma_min: float = SIGMA_MIN,
                      sigma_max: float = SIGMA_MAX, rho: float = RHO, device=None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """sigma = Karras map of u ~ U[0, u_max] (u = 0 is sigma_max): favours large sigma."""
    u = torch.rand(n, device=device, generator=generator) * u_max
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + u * (min_inv - max_inv)) ** rho


def sample_half_lognormal(n: int, device=None, generator: torch.Generator | None = None,
                          sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                          rho: float = RHO) -> torch.Tensor:
    """CTM's DSM sampler: half the batch lognormal(-1.2, 1.2), half the Karras map on U[0, 0.7]."""
    n_log = n // 2
    return torch.cat([
        sample_lognormal(n_log, device=device, generator=generator),
        sample_karras_map(n - n_log, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                          device=device, generator=generator),
    ])


def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise."""
    s2 = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma * sigma_d)^2: unit-variance loss per sigma."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample vector broadcasts against a batch."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def vp_sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sqrt((1 - abar_t) / abar_t): the VP table seen in sigma space."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_flow_t(sigma: torch.Tensor) -> torch.Tensor:
    """Flow matching time for a sigma: x_fm = x_sigma / (1 + sigma) has t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def flow_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``sigma_to_flow_t``: sigma = t / (1 - t)."""
    return t / (1 - t)


__all__ = [
    "SIGMA_MIN", "SIGMA_MAX", "RHO", "SIGMA_DATA", "karras_sigmas", "append_zero",
    "sample_lognormal", "sample_karras_map", "sample_half_lognormal", "edm_scalings",
    "edm_loss_weight", "append_dims", "vp_sigmas_from_alphas_cumprod", "sigma_to_flow_t",
    "flow_t_to_sigma",
]
