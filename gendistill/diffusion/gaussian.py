"""The Gaussian approximation of the data and its probability-flow ODE in closed form.

For data N(mu, Sigma) the marginal at noise level sigma is N(mu, Sigma + sigma^2 I) and the
optimal denoiser is D(x, sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu). Along an
eigenvector of Sigma (eigenvalue lambda) the PF-ODE dx/dsigma = (x - D) / sigma reads
dy/dsigma = sigma y / (lambda + sigma^2), so y(sigma) is proportional to sqrt(lambda + sigma^2):

    x(sigma_to) = mu + U diag(sqrt((lambda + sigma_to^2) / (lambda + sigma_from^2))) U^T (x - mu).

A trained model's ODE follows this map at high noise (Wang & Vastola 2024, "The unreasonable
effectiveness of Gaussian score approximation for diffusion models"), so a sampler may skip that
part without a network call. Beyond ``rank`` eigenvectors the spectrum is one mean variance.
"""
from __future__ import annotations

import torch


def gaussian_moments(x: torch.Tensor, rank: int | None = None):
    """(mean [D], eigenvalues [k], eigenvectors [D, k], residual variance) of samples x [N, ...],
    the top k = ``rank`` eigenpairs of their covariance (all D when None) and the mean of the
    other eigenvalues (0 when k = D)."""
    x = x.flatten(1).double()
    if len(x) < 2:
        raise ValueError(f"the Gaussian approximation needs at least 2 samples, got {len(x)}")
    dim = x.shape[1]
    k = dim if rank is None else min(int(rank), dim)
    eigvals, eigvecs = torch.linalg.eigh(torch.cov(x.T).reshape(dim, dim))
    eigvals = eigvals.flip(0).clamp_min(0)  # largest first; round-off can dip below zero
    eigvecs = eigvecs.flip(1)
    residual = eigvals[k:].mean() if k < dim else eigvals.new_zeros(())
    return x.mean(0), eigvals[:k], eigvecs[:, :k], residual


def gaussian_ode(x: torch.Tensor, sigma_from: float, sigma_to: float, mean: torch.Tensor,
                 eigvals: torch.Tensor, eigvecs: torch.Tensor,
                 residual: torch.Tensor) -> torch.Tensor:
    """The PF-ODE of N(mean, Sigma) from ``sigma_from`` to ``sigma_to``, exactly, for x [N, D],
    with ``gaussian_moments``' mean [D], eigvals [k], eigvecs [D, k] and residual variance."""
    def ratio(var):
        return ((var + sigma_to ** 2) / (var + sigma_from ** 2)).sqrt()

    y = x - mean
    along = y @ eigvecs  # coordinates in the top eigenvectors
    return (mean + (ratio(eigvals) * along) @ eigvecs.T
            + ratio(residual) * (y - along @ eigvecs.T))
