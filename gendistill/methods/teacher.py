"""Teacher training in four parameterisations (``diffusion.parameterization``), each with its
diffusers scheduler, saved as an ordinary diffusers folder (network + scheduler):

- edm: EDM denoising score matching (Karras et al. 2022, eq. 2 with lambda = 1/c_out^2),
  L = E [ lambda(sigma) ||D(x0 + sigma eps, sigma, c) - x0||^2 ], ln sigma ~ N(P_mean, P_std^2),
  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2; EDMEulerScheduler.
- vp-eps / vp-v: DDPM's simple loss ||F(x_t, t, c) - y||^2, t ~ U{0..T-1},
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (the scheduler's ``add_noise``), y = eps or
  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (its ``get_velocity``); DDPMScheduler.
- flow: rectified flow ||F(x_t, 1000 t, c) - (eps - x0)||^2, x_t = (1 - t) x0 + t eps (the
  scheduler's ``scale_noise``) on its training timesteps; FlowMatchEulerDiscreteScheduler.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from ..config import Config
from ..data import Dataset
from ..data.conditioning import drop_conditions
from ..diffusion import (EDMDenoiser, append_dims, call_network, denoiser_from_scheduler,
                         edm_loss_weight, sample_lognormal)
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


def vp_loss(net, scheduler: DDPMScheduler, x0: torch.Tensor, cond=None) -> torch.Tensor:
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    epsilon = scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else scheduler.get_velocity(x0, noise, t)
    return ((call_network(net, x_t, t, cond) - target) ** 2).mean()


def flow_loss(net, scheduler: FlowMatchEulerDiscreteScheduler, x0: torch.Tensor,
              cond=None) -> torch.Tensor:
    index = torch.randint(0, len(scheduler.timesteps), (x0.shape[0],))
    t = scheduler.timesteps[index].to(x0.device)
    noise = torch.randn_like(x0)
    x_t = scheduler.scale_noise(x0, t, noise)
    return ((call_network(net, x_t, t, cond) - (noise - x0)) ** 2).mean()


def teacher_scheduler(cfg: Config):
    """The diffusers scheduler of ``diffusion.parameterization``, saved with the teacher."""
    d, e = cfg.diffusion, cfg.edm
    if d.parameterization == "edm":
        return EDMEulerScheduler(sigma_min=e.sigma_min, sigma_max=e.sigma_max,
                                 sigma_data=e.sigma_data, prediction_type="epsilon")
    if d.parameterization == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=d.num_train_timesteps)
    prediction_type = "epsilon" if d.parameterization == "vp-eps" else "v_prediction"
    return DDPMScheduler(num_train_timesteps=d.num_train_timesteps,
                         beta_schedule=d.beta_schedule, prediction_type=prediction_type)


def network_for(cfg: Config, ds: Dataset, text_dim: int | None = None):
    n = cfg.network
    classes = ds.num_classes if ds.conditioning == "class" else None
    return build_network(ds.shape, num_classes=classes,
                         cross_attention_dim=text_dim if ds.conditioning == "text" else None,
                         channels=n.channels, layers_per_block=n.layers_per_block,
                         attention=n.attention, width=n.width, depth=n.depth,
                         network_type=n.type, heads=n.heads, patch_size=n.patch_size)


class TeacherTraining:
    """The parameterisation's loss on the dataset, with CFG condition dropout; exports a
    ``TeacherPipeline``."""

    def __init__(self, cfg: Config, ds: Dataset, null_cond: torch.Tensor | None):
        self.cfg, self.ds, self.null_cond = cfg, ds, null_cond
        text_dim = null_cond.shape[-1] if ds.conditioning == "text" else None
        self.model = network_for(cfg, ds, text_dim)
        self.scheduler = teacher_scheduler(cfg)

    def loss(self, batch, step):
        x0, cond = batch if len(batch) == 2 else (batch[0], None)
        if cond is not None:
            cond = drop_conditions(cond, self.null_cond, self.cfg.train.cond_dropout)
        parameterization = self.cfg.diffusion.parameterization
        if parameterization == "edm":
            loss = edm_dsm_loss(denoiser_from_scheduler(self.model, self.scheduler), x0, cond,
                                self.cfg.edm.p_mean, self.cfg.edm.p_std)
        elif parameterization == "flow":
            loss = flow_loss(self.model, self.scheduler, x0, cond)
        else:
            loss = vp_loss(self.model, self.scheduler, x0, cond)
        return loss, {}

    def export(self, net, folder: Path):
        vocoder = MelVocoder.from_config(self.ds.vocoder) if self.ds.kind == "audio" else None
        pipe = TeacherPipeline(unet=net, scheduler=self.scheduler, vocoder=vocoder,
                               text_encoder_name=MINILM if self.ds.conditioning == "text" else None)
        pipe.save_pretrained(folder)
