"""The CTM student G(x_t, t, s): a teacher network with extra embeddings for s and omega.

G(x_t, t, s) = (s / t) x_t + (1 - s / t) g(x_t, t, s), where g is the teacher's adapter (EDM,
VP epsilon / v / x0, flow matching) around the student's network at noise level t; s (and, with
CFG distillation, the guidance scale omega) enter through their own embedding MLPs added to the
network's time embedding (DESIGN.md section 4). Their last layers start at zero, so a student
built from a teacher is exactly that teacher at step 0: g(x, t, s) = D_teacher(x, t).
"""
from __future__ import annotations

from functools import cached_property

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..diffusion.sigmas import SIGMA_DATA, SIGMA_MIN, append_dims, edm_scalings
from ..diffusion.teachers import (Denoiser, feature_modules, output_layer, parameterized,
                                  time_embedding_dim, time_embedding_modules)
from .networks import NETWORK_CLASSES


def zero_init_embedding(dim_in: int, dim: int) -> TimestepEmbedding:
    emb = TimestepEmbedding(dim_in, dim)
    nn.init.zeros_(emb.linear_2.weight)
    nn.init.zeros_(emb.linear_2.bias)
    return emb


def guidance_text_width(network: nn.Module, embed_guidance: bool) -> int:
    """The width of the token states that ``guidance_in_text`` adds omega's embedding to: the
    states a network's cross-attention reads. A ValueError where there are none (a
    class-conditional network, or AudioLDM's UNet, whose text embedding is a class embedding)
    or no omega to add."""
    config = network.config
    width = config.get("caption_channels")  # PixArt projects the states first
    if width is None and config.get("class_embed_type") is None:
        width = config.get("cross_attention_dim")
    if not isinstance(width, int) or not embed_guidance:
        raise ValueError(f"guidance_in_text needs CFG distillation and a network with "
                         f"cross-attention on text token states, got {type(network).__name__}"
                         f"{'' if embed_guidance else ' without CFG distillation'}")
    return width


def trajectory_jump(x: torch.Tensor, t, s, denoised: torch.Tensor) -> torch.Tensor:
    """G(x_t, t, s) = (s/t) x_t + (1 - s/t) g: from x at t to s, given the estimate g."""
    ratio = s / t
    if torch.is_tensor(ratio):
        ratio = append_dims(ratio, x.ndim)
    return ratio * x + (1 - ratio) * denoised


class CTMStudent(ModelMixin, ConfigMixin):
    """G(x_t, t, s, cond, omega) around a diffusers UNet or DiT or an MLPNet (``network``), in
    the parameterisation of the teacher whose scheduler config is ``teacher_scheduler`` (None:
    EDM with ``sigma_data``)."""

    @register_to_config
    def __init__(self, network_class: str, network_config: dict, sigma_data: float = SIGMA_DATA,
                 sigma_min: float = SIGMA_MIN, embed_guidance: bool = False,
                 embedding_channels: int = 64, s_log_scale: float = 0.25,
                 guidance_embed_scale: float = 1000.0, teacher_scheduler: dict | None = None,
                 guidance_in_text: bool = False, text_tokens: int = 0):
        super().__init__()
        if network_class not in NETWORK_CLASSES:
            raise ValueError(f"unsupported student network {network_class!r} "
                             f"(known: {', '.join(NETWORK_CLASSES)})")
        self.network = NETWORK_CLASSES[network_class].from_config(network_config)
        dim = time_embedding_dim(self.network)
        self.s_proj = Timesteps(embedding_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.s_embedding = zero_init_embedding(embedding_channels, dim)
        if embed_guidance:
            self.guidance_proj = Timesteps(embedding_channels, flip_sin_to_cos=True,
                                           downscale_freq_shift=0)
            self.guidance_embedding = zero_init_embedding(embedding_channels, dim)
        if guidance_in_text:
            # omega also scales each caption's departure from the empty prompt, channel by
            # channel, as CFG scales cond - uncond: the time embedding only shifts every
            # position alike, the same for every caption, and barely moves a text UNet's output
            width = guidance_text_width(self.network, embed_guidance)
            self.guidance_text_gain = zero_init_embedding(embedding_channels, width)
            self.register_buffer("null_text", torch.zeros(text_tokens, width))
        self._extra_embedding = None
        # the extra embeddings join the network's own time embedding, wherever it is used
        for module in time_embedding_modules(self.network):
            module.register_forward_hook(self._add_extra_embedding)

    @classmethod
    def from_teacher(cls, network: nn.Module, sigma_data: float, sigma_min: float,
                     embed_guidance: bool, s_log_scale: float = 0.25,
                     guidance_embed_scale: float = 1000.0,
                     teacher_scheduler: dict | None = None,
                     null_text: torch.Tensor | None = None) -> "CTMStudent":
        """A student whose network starts as a copy of the teacher network's weights;
        ``null_text``, the empty prompt's token states, switches ``guidance_in_text`` on."""
        null_text = None if null_text is None else null_text.reshape(-1, null_text.shape[-1])
        student = cls(type(network).__name__, dict(network.config), sigma_data, sigma_min,
                      embed_guidance, s_log_scale=s_log_scale,
                      guidance_embed_scale=guidance_embed_scale,
                      teacher_scheduler=teacher_scheduler, guidance_in_text=null_text is not None,
                      text_tokens=0 if null_text is None else null_text.shape[0])
        student.network.load_state_dict(network.state_dict())
        if null_text is not None:
            student.null_text.copy_(null_text)
        return student

    @cached_property
    def parameterization(self) -> Denoiser:
        """The teacher's adapter around this student's network. Not a submodule (the network
        is one already); a deep copy (the EMA) gets one around its own network."""
        c = self.config
        return parameterized(self.network, c.teacher_scheduler, c.sigma_data, c.sigma_min)

    def output_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(c_out / |dg/dF|)^2 at t, with c_out EDM's: a loss on G multiplied by it trains the
        network's output in EDM's units whatever the parameterisation (1 for EDM; for epsilon
        prediction g = x - t F, so without it the largest t dominate every batch)."""
        scale = self.parameterization.output_scale(t)
        return (edm_scalings(t, self.config.sigma_data)[1] / scale) ** 2

    def embedding_parameters(self):
        """The parameters of the s (and omega) embeddings, the student's only new weights."""
        yield from self.s_embedding.parameters()
        if self.has_guidance:
            yield from self.guidance_embedding.parameters()
        if self.config.guidance_in_text:
            yield from self.guidance_text_gain.parameters()

    def _add_extra_embedding(self, _module, _inputs, output):
        return output if self._extra_embedding is None else output + self._extra_embedding

    @property
    def embedding_dtype(self) -> torch.dtype:
        # read off one weight: ModelMixin.dtype walks every module, on every jump
        return self.s_embedding.linear_1.weight.dtype

    @property
    def has_guidance(self) -> bool:
        return self.config.embed_guidance

    def extra_embedding(self, s: torch.Tensor, guidance=None) -> torch.Tensor:
        # s = 0 (the final jump) shares the embedding of sigma_min; the sinusoid sees
        # s_log_scale * ln s (EDM's c_noise 0.25 by default, CTM's 250 spreads it over all
        # frequencies)
        s_noise = self.config.s_log_scale * s.clamp_min(self.config.sigma_min).log()
        emb = self.s_embedding(self.s_proj(s_noise).to(self.embedding_dtype))
        if self.has_guidance:
            emb = emb + self.guidance_embedding(self.guidance_features(guidance, s))
        return emb

    def guidance_features(self, guidance, s: torch.Tensor) -> torch.Tensor:
        """The sinusoids of each sample's omega (None: 1, unguided), one row per s."""
        w = torch.as_tensor(1.0 if guidance is None else guidance, device=s.device,
                            dtype=s.dtype).expand(s.shape[0])
        # LCM / SoundCTM embed 1000 omega; over omega in [1, 5] its fast sinusoids wrap
        # around many times and the slow ones barely move
        return self.guidance_proj(self.config.guidance_embed_scale * w).to(self.embedding_dtype)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond=None,
                guidance=None) -> torch.Tensor:
        """g(x_t, t, s): the teacher's denoiser form at noise level t; ``s`` (and ``guidance``)
        one per sample, or one row for the whole batch."""
        self._extra_embedding = self.extra_embedding(s, guidance)
        if self.config.guidance_in_text and cond is not None:
            # token states (B x L x D): c_null + (1 + a(omega)) (c - c_null); the empty prompt
            # (the unconditional student) stays as it is at every omega
            gain = self.guidance_text_gain(self.guidance_features(guidance, s))[:, None]
            null = self.null_text.to(cond.dtype)
            cond = null + (1 + gain) * (cond - null)
        try:
            return self.parameterization(x, t, cond)
        finally:
            self._extra_embedding = None

    def forward(self, x: torch.Tensor, t, s, cond=None, guidance=None,
                return_denoised: bool = False) -> torch.Tensor:
        """G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s); G(x, t, t) = x.

        ``return_denoised`` gives g itself (for the DSM term), still through ``forward`` so that
        wrappers such as DDP see every call.
        """
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0])
        s = torch.as_tensor(s, device=x.device, dtype=x.dtype)
        # a sampler's s and omega are one value for the whole batch: embedded once, the one
        # row broadcast onto every sample's time embedding
        shared = s.ndim == 0 and not (torch.is_tensor(guidance) and guidance.ndim > 0)
        s = s.expand(1 if shared else x.shape[0])
        denoised = self.denoise(x, t, s, cond, guidance)
        if return_denoised:
            return denoised
        return trajectory_jump(x, t, s, denoised)

    def feature_modules(self) -> list[nn.Module]:
        return feature_modules(self.network)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight of the network's output layer (for CTM's adaptive DSM weight)."""
        return output_layer(self.network)
