"""CTMScheduler (Karras grid + gamma-sampling) and CTMPipeline (1-step and few-step sampling).

gamma-sampling (Kim et al. 2024, Algorithm 2) over a grid t_0 > ... > t_n of n + 1 points:
  s_k = sqrt(1 - gamma^2) (t_{k+1} - sigma_min) + sigma_min;  x <- G(x, t_k, s_k);
  and before the next jump, x <- x + sqrt(t_{k+1}^2 - s_k^2) z.
gamma = 0 is deterministic (pure jumps along the ODE); gamma = 1 is consistency-model multistep.
"""
from __future__ import annotations

import math

import torch
from diffusers import SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.torch_utils import randn_tensor

from gendistill.diffusion.sigmas import RHO, SIGMA_MAX, SIGMA_MIN, karras_sigmas
from gendistill.models.student import trajectory_jump

from .base import ConditionalPipeline, custom_sigmas, timestep_sigmas
from .control import control_unsupported, guide, optimise_noise


DEFAULT_ONE_STEP_SIGMA = 10.0


class CTMScheduler(SchedulerMixin, ConfigMixin):
    """Owns the Karras grid of the sampler and the gamma-step.

    ``one_step_sigma``: where a single jump starts (None: sigma_max). A briefly distilled
    student's jump G(x, 80, 0) loses variety that its jump from 10 keeps (digits: domain FID
    1.48 from 80, 0.90 from 10), while its teacher's ODE from 10 scores as from 80 (0.74): at
    sigma = 10 = 20 sigma_data the data is drowned and the ODE above only rescales the noise.
    Grids of two or more jumps start at sigma_max, where they score best (README, Results).
    """

    order = 1

    @register_to_config
    def __init__(self, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO, gamma: float = 0.0,
                 one_step_sigma: float | None = DEFAULT_ONE_STEP_SIGMA):
        if one_step_sigma is not None and not one_step_sigma > sigma_min:
            raise ValueError(f"one_step_sigma must be above sigma_min = {sigma_min} (or None "
                             f"for sigma_max), got {one_step_sigma}")
        self.sigmas = karras_sigmas(2, sigma_min, self.grid_top(1), rho)
        self.gamma = gamma

    def grid_top(self, num_inference_steps: int) -> float:
        """The noise level the default grid of ``num_inference_steps`` jumps starts at."""
        cfg = self.config
        if num_inference_steps == 1 and cfg.one_step_sigma is not None:
            return min(cfg.one_step_sigma, cfg.sigma_max)
        return cfg.sigma_max

    def set_timesteps(self, num_inference_steps: int = 1, gamma: float | None = None,
                      device=None, sigmas=None):
        """A Karras grid of ``num_inference_steps`` + 1 points, or the user's ``sigmas``
        (n + 1 decreasing noise levels for n jumps, within the student's range)."""
        gamma = self.config.gamma if gamma is None else gamma
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        cfg = self.config
        self.gamma = gamma
        if sigmas is not None:
            self.sigmas = custom_sigmas(sigmas, cfg.sigma_max).to(device)
        elif num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        else:
            self.sigmas = karras_sigmas(num_inference_steps + 1, cfg.sigma_min,
                                        self.grid_top(num_inference_steps), cfg.rho,
                                        device=device)
        self.timesteps = torch.arange(len(self.sigmas) - 1, device=device)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas[0])

    def jump(self, k: int) -> tuple[float, float]:
        """(t_k, s_k): where the k-th jump starts and where it lands."""
        sigma_min = self.config.sigma_min
        t, t_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        s = math.sqrt(1 - self.gamma ** 2) * (t_next - sigma_min) + sigma_min
        return t, s

    def step(self, jumped: torch.Tensor, k: int, generator=None) -> torch.Tensor:
        """Renoise the jump's result x_{s_k} up to t_{k+1} (nothing after the last jump)."""
        if k + 1 >= len(self.sigmas) - 1:
            return jumped
        _t, s = self.jump(k)
        t_next = float(self.sigmas[k + 1])
        noise_std = math.sqrt(max(t_next ** 2 - s ** 2, 0.0))
        if noise_std == 0:
            return jumped
        z = randn_tensor(jumped.shape, generator=generator, device=jumped.device,
                         dtype=jumped.dtype)
        return jumped + noise_std * z


class CTMPipeline(ConditionalPipeline):
    """One network call per step: x <- G(x, t, s) with gamma-sampling and nu-interpolation."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vocoder", "vae", "text_encoder", "tokenizer", "start"]

    def __init__(self, unet, scheduler: CTMScheduler, vocoder=None,
                 text_encoder_name: str | None = None, vae=None, text_encoder=None,
                 tokenizer=None, start=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vocoder=vocoder, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, start=start)
        self.register_to_config(text_encoder_name=text_encoder_name)

    def jump(self, x, t, s, cond, guidance, nu: float, uncond=None, return_estimate=False):
        """G(x, t, s); with nu != 1, G_uncond + nu (G_c - G_uncond) in one batched call
        (``uncond``: the negative prompt's condition, else the null condition).
        ``return_estimate`` also gives the clean estimate g, combined the same way."""
        if cond is None or nu == 1.0:
            g = self.unet(x, t, s, cond, guidance, return_denoised=True)
        else:
            if uncond is None:
                uncond = self.null_condition().expand(cond.shape[0], *cond.shape[1:])
            g_uncond, g_cond = self.unet(torch.cat([x, x]), t, s, torch.cat([uncond, cond]),
                                         guidance, return_denoised=True).chunk(2)
            g = g_uncond + nu * (g_cond - g_uncond)
        jumped = trajectory_jump(x, t, s, g)  # linear in g: nu combines the estimates
        return (jumped, g) if return_estimate else jumped

    def start_point(self, cond, n: int, generator=None, latents=None) -> torch.Tensor:
        """x where the first jump starts, t_0: t_0 z; or, with a Gaussian ``start``
        (``gendistill calibrate`` fits it to the data), the noise at the start's own sigma_max
        carried down to t_0 by the data's Gaussian approximation, no network call."""
        t0 = self.scheduler.init_noise_sigma
        if self.start is None:
            return self.initial_noise(n, t0, generator, latents)
        top = max(self.start.config.sigma_max, t0)
        x = self.initial_noise(n, top, generator, latents)
        return self.start(x, top, t0, cond if self.conditioning == "class" else None)

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt=None, batch_size: int = 1,
                 num_per_condition: int = 1, num_inference_steps: int = 1, gamma: float = 0.0,
                 guidance_scale: float | None = None, nu: float = 1.0, negative_prompt=None,
                 control=None, generator=None, output_type: str = "pil",
                 return_dict: bool = True, sigmas=None, timesteps=None, latents=None):
        """``guidance_scale`` (omega) is a student input; default 3.5 for CFG-distilled students.
        ``negative_prompt`` replaces the empty prompt that nu interpolates from. ``control``: a
        ``gendistill.pipelines.control`` object (training-free control of audio). ``sigmas``:
        n + 1 decreasing noise levels for n jumps instead of the Karras grid; ``timesteps``: where
        the n jumps start, as the network's own time inputs (e.g. [999, 500] for a student of a
        DDPM teacher), the last jump landing at sigma_min; ``latents``: the unit-variance
        starting noise, one per sample."""
        if guidance_scale is None:
            guidance_scale = 3.5 if self.unet.has_guidance else 1.0
        elif not self.unet.has_guidance and guidance_scale != 1.0:
            raise ValueError("this student was not CFG-distilled: guidance_scale must be 1")
        cond, conditions = self.prepare_conditions(class_labels, prompt, batch_size,
                                                   num_per_condition)
        if nu != 1.0 and cond is None:
            raise ValueError("nu-interpolation needs a conditional student")
        uncond = self.negative_condition(negative_prompt, len(conditions), nu)
        if control is not None and (why := control_unsupported(self)) is not None:
            raise ValueError(why)
        if timesteps is not None:
            starts = timestep_sigmas(timesteps, sigmas, self.unet.parameterization)
            sigmas = torch.cat([starts, starts.new_tensor([self.scheduler.config.sigma_min])])
        self.scheduler.set_timesteps(num_inference_steps, gamma, device=self.device,
                                     sigmas=sigmas)
        num_inference_steps = len(self.scheduler.timesteps)
        guided = control is not None and control.method == "guided"
        if guided and num_inference_steps < 2:
            raise ValueError("guided control acts between jumps: num_inference_steps must be "
                             ">= 2 (or use control method 'noise')")
        x = self.start_point(cond, len(conditions), generator, latents)
        if control is not None and control.method == "noise":
            t, s_min = float(self.scheduler.sigmas[0]), float(self.scheduler.sigmas[-1])
            x = optimise_noise(lambda z: self.jump(z, t, s_min, cond, guidance_scale, nu, uncond),
                               x, control, self.vocoder)
        for k in self.progress_bar(range(num_inference_steps)):
            t, s = self.scheduler.jump(k)
            jumped, g = self.jump(x, t, s, cond, guidance_scale, nu, uncond, return_estimate=True)
            if guided and k + 1 < num_inference_steps:  # the jump from the edited estimate
                jumped = trajectory_jump(x, t, s, guide(g, control, self.vocoder))
            x = self.scheduler.step(jumped, k, generator)
        return self.postprocess(x, conditions, output_type, return_dict)

    def negative_condition(self, negative_prompt, n: int, nu: float):
        """The negative prompt's states, one per sample (None without one)."""
        if negative_prompt is None:
            return None
        if self.conditioning != "text":
            raise ValueError("negative_prompt needs a text-conditional pipeline")
        if nu == 1.0:
            raise ValueError("negative_prompt acts through nu-interpolation (the guidance scale "
                             "is distilled into the student): give nu != 1, e.g. nu=2")
        prompts = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(prompts) == 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise ValueError(f"negative_prompt: give one, or one per sample ({n}), got "
                             f"{len(prompts)}")
        return self.encode_prompt(prompts)


class SoundCTMPipeline(CTMPipeline):
    """Text-to-sound with a SoundCTM student: prompts in, waveforms out, with diffusers' audio
    pipeline arguments (``num_waveforms_per_prompt``, ``negative_prompt``, ``audios`` out).
    Defaults: 1 step, omega = 3.5."""

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, num_waveforms_per_prompt: int = 1,
                 num_inference_steps: int = 1, gamma: float = 0.0,
                 guidance_scale: float | None = None, nu: float = 1.0, control=None,
                 generator=None, output_type: str = "np", return_dict: bool = True,
                 latents=None, *,
                 num_per_condition: int | None = None, **kwargs):
        """``num_per_condition`` is the name every gendistill pipeline takes; it wins over
        ``num_waveforms_per_prompt`` when given."""
        per = num_waveforms_per_prompt if num_per_condition is None else num_per_condition
        return super().__call__(prompt=prompt, num_per_condition=per,
                                num_inference_steps=num_inference_steps, gamma=gamma,
                                guidance_scale=guidance_scale, nu=nu,
                                negative_prompt=negative_prompt, control=control,
                                generator=generator, output_type=output_type,
                                return_dict=return_dict, latents=latents, **kwargs)
