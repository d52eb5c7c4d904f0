"""Teacher training: EDM denoising score matching (Karras et al. 2022, eq. 2 with lambda = 1/c_out^2).

L = E_{sigma, x0, eps} [ lambda(sigma) ||D(x0 + sigma eps, sigma, c) - x0||^2 ],
ln sigma ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import EDMEulerScheduler

from ..config import Config
from ..data import Dataset
from ..data.conditioning import drop_conditions
from ..diffusion import EDMDenoiser, append_dims, edm_loss_weight, sample_lognormal
from ..models.networks import build_network
from ..pipelines import MelVocoder, TeacherPipeline
from ..pipelines.text import MINILM


def edm_dsm_loss(denoiser: EDMDenoiser, x0: torch.Tensor, cond=None, p_mean: float = -1.2,
                 p_std: float = 1.2) -> torch.Tensor:
    sigma = sample_lognormal(x0.shape[0], p_mean, p_std, device=x0.device)
    x = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
    err = (denoiser(x, sigma, cond) - x0) ** 2
    weight = edm_loss_weight(sigma, denoiser.sigma_data)
    return (weight * err.flatten(1).mean(1)).mean()


def network_for(cfg: Config, ds: Dataset, text_dim: int | None = None):
    n = cfg.network
    return build_network(ds.shape, num_classes=ds.num_classes if ds.conditioning == "class" else None,
                         cross_attention_dim=text_dim if ds.conditioning == "text" else None,
                         channels=n.channels, layers_per_block=n.layers_per_block,
                         attention=n.attention, width=n.width, depth=n.depth)


class TeacherTraining:
    """EDM DSM on the dataset, with CFG condition dropout; exports a ``TeacherPipeline``."""

    def __init__(self, cfg: Config, ds: Dataset, null_cond: torch.Tensor | None):
        self.cfg, self.ds, self.null_cond = cfg, ds, null_cond
        text_dim = null_cond.shape[-1] if ds.conditioning == "text" else None
        self.model = network_for(cfg, ds, text_dim)

    def denoiser(self, net) -> EDMDenoiser:
        e = self.cfg.edm
        return EDMDenoiser(net, sigma_data=e.sigma_data, sigma_min=e.sigma_min, sigma_max=e.sigma_max)

    def loss(self, batch, step):
        x0, cond = batch if len(batch) == 2 else (batch[0], None)
        if cond is not None:
            cond = drop_conditions(cond, self.null_cond, self.cfg.train.cond_dropout)
        loss = edm_dsm_loss(self.denoiser(self.model), x0, cond, self.cfg.edm.p_mean,
                            self.cfg.edm.p_std)
        return loss, {}

    def export(self, net, folder: Path):
        e = self.cfg.edm
        scheduler = EDMEulerScheduler(sigma_min=e.sigma_min, sigma_max=e.sigma_max,
                                      sigma_data=e.sigma_data, prediction_type="epsilon")
        vocoder = MelVocoder.from_config(self.ds.vocoder) if self.ds.kind == "audio" else None
        pipe = TeacherPipeline(unet=net, scheduler=scheduler, vocoder=vocoder,
                               text_encoder_name=MINILM if self.ds.conditioning == "text" else None)
        pipe.save_pretrained(folder)
