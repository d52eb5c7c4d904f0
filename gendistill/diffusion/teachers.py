"""Teacher adapters: any diffusion network seen as a denoiser D(x_sigma, sigma, cond) -> x0_hat.

The adapters convert sigma space (x_sigma = x_0 + sigma * eps) to each network's native
parameterisation and back (DESIGN.md section 3). A network is anything called like a diffusers
UNet: ``net(sample, timestep, class_labels=... | encoder_hidden_states=...)``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .sigmas import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, append_dims, edm_scalings, \
    flow_t_to_sigma, sigma_to_flow_t, vp_sigmas_from_alphas_cumprod


def is_class_cond(cond) -> bool:
    return cond is not None and not torch.is_floating_point(cond)


def call_network(net: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond=None):
    """Call a diffusers-style network with class labels (int tensor), token states (float,
    B x L x D) or a projected text embedding (float, B x D: AudioLDM's UNet reads it through
    its class embedding and has no cross-attention states). The timestep goes by name:
    transformers take ``encoder_hidden_states`` second."""
    if cond is None:
        out = net(x, timestep=timestep)
    elif is_class_cond(cond):
        out = net(x, timestep=timestep, class_labels=cond)
    elif cond.ndim == 2:
        out = net(x, timestep=timestep, encoder_hidden_states=None, class_labels=cond)
    else:
        out = net(x, timestep=timestep, encoder_hidden_states=cond)
    return out.sample if hasattr(out, "sample") else out


SUPPORTED_NETWORKS = ("UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, "
                      "PixArtTransformer2DModel and gendistill's MLPNet")


def _unknown(net: nn.Module, what: str) -> TypeError:
    return TypeError(f"no {what} known for {type(net).__name__}; supported networks: "
                     f"{SUPPORTED_NETWORKS}")


def feature_modules(net: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the network's features: UNet blocks, transformer blocks
    (each fed the previous one's output) or MLP hidden layers."""
    if hasattr(net, "down_blocks"):
        return [*net.down_blocks, net.mid_block, *net.up_blocks]
    if hasattr(net, "transformer_blocks"):
        return list(net.transformer_blocks)
    if hasattr(net, "hidden_layers"):
        return list(net.hidden_layers)
    raise _unknown(net, "feature taps")


def bottleneck_module(net: nn.Module) -> nn.Module:
    """The network's bottleneck: a UNet's mid block, the middle transformer block or MLP hidden
    layer (DMD2's classifier head reads it)."""
    if getattr(net, "mid_block", None) is not None:
        return net.mid_block
    layers = getattr(net, "transformer_blocks", None) or getattr(net, "hidden_layers", None)
    if layers is not None:
        return layers[len(layers) // 2]
    raise _unknown(net, "bottleneck")


def time_embedding_modules(net: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the network's timestep embedding (a CTM student adds its
    s and omega embeddings to them): a UNet's or MLP's ``time_embedding``, PixArt's
    ``adaln_single.emb``, or every DiT block's own timestep + label embedding."""
    if hasattr(net, "time_embedding"):
        return [net.time_embedding]
    if hasattr(net, "adaln_single"):
        return [net.adaln_single.emb]
    if hasattr(net, "transformer_blocks") and getattr(net.transformer_blocks[0].norm1, "emb",
                                                      None) is not None:
        return [block.norm1.emb for block in net.transformer_blocks]
    raise _unknown(net, "timestep embedding")


def time_embedding_dim(net: nn.Module) -> int:
    if hasattr(net, "time_embedding"):
        return net.time_embedding.linear_2.out_features
    if hasattr(net, "inner_dim"):  # transformers: the embedding has the token width
        return net.inner_dim
    raise _unknown(net, "timestep embedding")


def output_layer(net: nn.Module) -> nn.Parameter:
    """The weight of the network's last layer (CTM's adaptive weights are measured on it)."""
    for name in ("conv_out", "proj_out_2", "proj_out"):
        if isinstance(getattr(net, name, None), nn.Module):
            return getattr(net, name).weight
    raise _unknown(net, "output layer")


class Denoiser(nn.Module):
    """D(x, sigma, cond) -> x0_hat in sigma space, with the null condition used for CFG.

    ``null_cond`` is one sample's null condition (the null class index, or the token states of
    the empty prompt); None for an unconditional teacher. ``sigma_data`` is the data scale the
    x0 losses weight by (EDM's lambda(sigma)); only EDM's preconditioning reads its own.
    """

    sigma_data = SIGMA_DATA
    scheduler_config: dict | None = None  # the diffusers scheduler the adapter was read from

    def __init__(self, net: nn.Module, null_cond: torch.Tensor | None = None,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        super().__init__()
        self.net = net
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.register_buffer("null_cond", null_cond, persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.clamp(self.sigma_min, self.sigma_max)
        return self.denoise(x, sigma, cond)

    def denoise(self, x, sigma, cond):  # pragma: no cover - abstract
        raise NotImplementedError

    def timestep_sigma(self, timesteps: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The noise level of a time input of the network (its diffusers scheduler's timesteps),
        the inverse of the map ``denoise`` applies."""
        raise NotImplementedError

    def output_scale(self, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """|dD/dF|: how far the denoised estimate moves per unit of the network's output at
        ``sigma`` (EDM's c_out; sigma itself for epsilon prediction)."""
        raise NotImplementedError

    def around(self, net: nn.Module) -> "Denoiser":
        """The same parameterisation around another network (a student's)."""
        if self.scheduler_config is None and not isinstance(self, EDMDenoiser):
            raise TypeError(f"a {type(self).__name__} built without its scheduler cannot be "
                            f"copied: build it with denoiser_from_scheduler")
        return parameterized(net, self.scheduler_config, self.sigma_data, self.sigma_min,
                             self.sigma_max)

    def null_like(self, cond: torch.Tensor) -> torch.Tensor:
        if self.null_cond is None:
            raise ValueError("this teacher has no null condition, so it cannot use guidance")
        return self.null_cond.to(cond.device).expand(cond.shape[0], *self.null_cond.shape)

    def features(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> list[torch.Tensor]:
        """Activations of the network's blocks (down, mid, up) or hidden layers at (x, sigma)."""
        with tap_features(self.net) as feats:
            self(x, sigma, cond)
        return feats


def full_precision(device: torch.device):
    """A block where autocast is off: the teacher's targets and feature maps are computed in
    fp32 whatever the training loop's mixed precision (SoundCTM keeps its teacher out of it)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


@contextmanager
def tap_features(net: nn.Module, modules: list[nn.Module] | None = None):
    """Collect the outputs of ``modules`` (default ``feature_modules(net)``) during the
    forward passes in the block."""
    feats: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        feats.append(output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_hook(hook) for m in (modules or feature_modules(net))]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


class EDMDenoiser(Denoiser):
    """EDM preconditioning of a raw network F: D = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, net, sigma_data: float = SIGMA_DATA, **kw):
        super().__init__(net, **kw)
        self.sigma_data = float(sigma_data)

    def denoise(self, x, sigma, cond):
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in
                                        edm_scalings(sigma, self.sigma_data))
        return c_skip * x + c_out * call_network(self.net, c_in * x, c_noise.flatten(), cond)

    def timestep_sigma(self, timesteps):
        return (4 * timesteps).exp()  # c_noise = ln(sigma) / 4, EDMEulerScheduler's timesteps

    def output_scale(self, sigma):
        return edm_scalings(sigma, self.sigma_data)[1]


class VPDenoiser(Denoiser):
    """A discrete-time VP network (DDPM/DDIM schedulers) with epsilon, v or sample prediction.

    sigma(t) = sqrt((1 - abar_t) / abar_t); a continuous sigma maps to a fractional timestep by
    interpolating log sigma over the table, and the network sees x_vp = x_sigma / sqrt(1 + sigma^2).
    """

    def __init__(self, net, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", **kw):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        sigmas = vp_sigmas_from_alphas_cumprod(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        # sigma is limited to the table's range
        kw["sigma_min"] = max(kw.get("sigma_min", 0.0), float(sigmas[0]))
        kw["sigma_max"] = min(kw.get("sigma_max", float("inf")), float(sigmas[-1]))
        super().__init__(net, **kw)
        self.prediction_type = prediction_type
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose (log-linearly interpolated) sigma is ``sigma``."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log().clamp(log_sigmas[0], log_sigmas[-1])
        idx = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        w = (log_sigma - lo) / (hi - lo)
        return (idx - 1).to(sigma.dtype) + w

    def timestep_sigma(self, timesteps):
        last = len(self.log_sigmas) - 1
        if (timesteps < 0).any() or (timesteps > last).any():
            raise ValueError(f"timesteps: this VP network knows timesteps 0 ... {last}, got "
                             f"{timesteps.tolist()}")
        lo = timesteps.floor().long().clamp(max=last - 1)
        log_sigmas = self.log_sigmas.to(timesteps.device, timesteps.dtype)
        return torch.lerp(log_sigmas[lo], log_sigmas[lo + 1], timesteps - lo).exp()

    def denoise(self, x, sigma, cond):
        s = append_dims(sigma, x.ndim)
        alpha_bar = 1 / (1 + s ** 2)
        x_vp = x * alpha_bar.sqrt()
        out = call_network(self.net, x_vp, self.sigma_to_t(sigma), cond)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * x_vp - (1 - alpha_bar).sqrt() * out
        return out

    def output_scale(self, sigma):
        if self.prediction_type == "epsilon":
            return sigma
        if self.prediction_type == "v_prediction":
            return sigma / (1 + sigma ** 2).sqrt()  # sqrt(1 - alpha_bar)
        return torch.ones_like(sigma)


class FlowDenoiser(Denoiser):
    """A rectified-flow network: x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0.

    The network receives the diffusers timestep t * num_train_timesteps.
    """

    def __init__(self, net, num_train_timesteps: int = 1000, **kw):
        super().__init__(net, **kw)
        self.num_train_timesteps = num_train_timesteps

    def denoise(self, x, sigma, cond):
        t = sigma_to_flow_t(sigma)
        tt = append_dims(t, x.ndim)
        x_fm = x / (1 + append_dims(sigma, x.ndim))
        v = call_network(self.net, x_fm, t * self.num_train_timesteps, cond)
        return x_fm - tt * v

    def output_scale(self, sigma):
        return sigma_to_flow_t(sigma)

    def timestep_sigma(self, timesteps):
        t = timesteps / self.num_train_timesteps
        if (t < 0).any() or (t > 1).any():
            raise ValueError(f"timesteps: a flow network knows timesteps 0 ... "
                             f"{self.num_train_timesteps}, got {timesteps.tolist()}")
        # pure noise (t = 1, sigma = infinity) is where the adapter's range starts
        return flow_t_to_sigma(t).clamp(max=self.sigma_max)


def cfg_denoise(denoiser: Denoiser, x: torch.Tensor, sigma, cond=None, guidance=1.0):
    """D_w = D(x, s, null) + w (D(x, s, c) - D(x, s, null)); both branches in one forward pass.

    ``guidance`` is a float or a per-sample tensor; w = 1 is the plain conditional denoiser.
    """
    if cond is None or (not torch.is_tensor(guidance) and guidance == 1.0):
        return denoiser(x, sigma, cond)
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                    torch.cat([denoiser.null_like(cond), cond]))
    uncond, cond_out = both.chunk(2)
    w = append_dims(torch.as_tensor(guidance, device=x.device, dtype=x.dtype), x.ndim)
    return uncond + w * (cond_out - uncond)


class NFECounter:
    """Counts real forward calls of a module and the rows they processed."""

    def __init__(self, module: nn.Module):
        self.module, self.calls, self.rows = module, 0, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hook(self, _m, inputs, _out):
        self.calls += 1
        self.rows += inputs[0].shape[0]

    def per_sample(self, batch_size: int) -> int:
        """Network evaluations per sample (CFG's doubled batch counts twice, as papers do)."""
        return int(round(self.rows / batch_size))


SUPPORTED_SCHEDULERS = ("EDM schedulers (EDMEulerScheduler, EDMDPMSolverMultistepScheduler), "
                        "flow matching (FlowMatchEulerDiscreteScheduler, ...) and VP schedulers "
                        "with alphas_cumprod (DDPM, DDIM, PNDM, Euler, DPMSolver, ...)")


def denoiser_from_scheduler(net: nn.Module, scheduler, null_cond=None) -> Denoiser:
    """Pick the adapter from a diffusers scheduler: EDM, flow matching, or discrete VP."""
    name, cfg = type(scheduler).__name__, scheduler.config
    if name.startswith("EDM"):
        denoiser = EDMDenoiser(net, sigma_data=cfg.sigma_data, null_cond=null_cond,
                               sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    elif name.startswith("FlowMatch"):
        denoiser = FlowDenoiser(net, num_train_timesteps=cfg.num_train_timesteps,
                                null_cond=null_cond)
    elif hasattr(scheduler, "alphas_cumprod"):
        denoiser = VPDenoiser(net, scheduler.alphas_cumprod, cfg.prediction_type,
                              null_cond=null_cond)
    else:
        raise TypeError(f"no teacher adapter for scheduler {name}; supported: "
                        f"{SUPPORTED_SCHEDULERS}")
    denoiser.scheduler_config = scheduler_config(scheduler)
    return denoiser


def scheduler_config(scheduler) -> dict:
    """A scheduler's config as saved, with its ``_class_name`` (what a student keeps)."""
    return {**{k: v for k, v in scheduler.config.items() if not k.startswith("_")},
            "_class_name": type(scheduler).__name__}


def scheduler_from_config(config: dict):
    """The diffusers scheduler a ``scheduler_config`` describes."""
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise TypeError(f"unknown scheduler class {name!r}; supported: {SUPPORTED_SCHEDULERS}")
    return cls.from_config(config)


def parameterized(net: nn.Module, teacher_scheduler: dict | None = None,
                  sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                  sigma_max: float = SIGMA_MAX) -> Denoiser:
    """``net`` in its teacher's parameterisation: the adapter of the teacher's scheduler config,
    or EDM's preconditioning (with these sigmas) when there is none."""
    if teacher_scheduler is None:
        return EDMDenoiser(net, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max)
    return denoiser_from_scheduler(net, scheduler_from_config(teacher_scheduler))
