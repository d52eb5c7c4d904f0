"""Where a sampler's first jump starts: the Gaussian approximation of the data carries the noise
at sigma_max down to it in closed form (``gendistill.diffusion.gaussian``), per class for
class-conditional data and one for all otherwise (text prompts have no moments of their own).
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from ..diffusion.gaussian import gaussian_moments, gaussian_ode
from ..diffusion.sigmas import SIGMA_MAX

# Digits (64 dimensions) keep every eigenvector; beyond this the rest share one variance.
DEFAULT_RANK = 128


class GaussianStart(ModelMixin, ConfigMixin):
    """The data's Gaussian moments, one set per condition, in the network's space; called as
    ``start(x, sigma_from, sigma_to, labels)`` it solves their PF-ODE from x at ``sigma_from``
    to ``sigma_to``, which costs no network call. ``sigma_max``: where a sampler's noise enters
    it, a level at which noise stands for the data's marginal; a student trained below it
    (``ctm.sigma_max``) still draws its noise there."""

    @register_to_config
    def __init__(self, num_conditions: int = 1, dim: int = 1, rank: int = 1,
                 sigma_max: float = SIGMA_MAX):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_conditions, dim))
        self.register_buffer("eigvals", torch.zeros(num_conditions, rank))
        self.register_buffer("eigvecs", torch.zeros(num_conditions, dim, rank))
        self.register_buffer("residual", torch.zeros(num_conditions))

    @classmethod
    def fit(cls, x: torch.Tensor, labels: torch.Tensor | None = None,
            num_classes: int | None = None, rank: int = DEFAULT_RANK) -> "GaussianStart":
        """The moments of samples x [N, ...] in the network's space, per class of ``labels``
        (``num_classes`` of them) or of all samples when ``labels`` is None."""
        groups = [x] if labels is None else [x[labels == c] for c in range(num_classes)]
        for c, group in enumerate(groups):
            if len(group) < 2:
                raise ValueError(f"the Gaussian start needs at least 2 samples per class: "
                                 f"class {c} has {len(group)}")
        moments = [gaussian_moments(group, rank) for group in groups]
        mean, eigvals, eigvecs, residual = (torch.stack(m).float() for m in zip(*moments))
        start = cls(num_conditions=len(groups), dim=mean.shape[1], rank=eigvals.shape[1])
        start.load_state_dict({"mean": mean, "eigvals": eigvals, "eigvecs": eigvecs,
                               "residual": residual})
        return start

    def forward(self, x: torch.Tensor, sigma_from: float, sigma_to: float,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, ...] at ``sigma_from`` carried to ``sigma_to``; ``labels`` pick each sample's
        class (ignored, and may be None, when the moments are one for all)."""
        if self.config.num_conditions == 1:
            index = torch.zeros(len(x), dtype=torch.long, device=self.mean.device)
        elif labels is None:
            raise ValueError("this Gaussian start is per class: pass the class labels")
        else:
            index = labels.to(self.mean.device).long()
        flat = x.flatten(1).to(self.mean)
        if flat.shape[1] != self.config.dim:
            raise ValueError(f"the Gaussian start holds moments of {self.config.dim} values per "
                             f"sample, got samples of shape {tuple(x.shape[1:])}")
        out = torch.empty_like(flat)
        for c in index.unique().tolist():  # one class at a time: no per-sample eigenvectors
            rows = index == c
            out[rows] = gaussian_ode(flat[rows], sigma_from, sigma_to, self.mean[c],
                                     self.eigvals[c], self.eigvecs[c], self.residual[c])
        return out.to(x).reshape(x.shape)  # back to the caller's device and dtype
