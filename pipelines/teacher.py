"""TeacherPipeline: a diffusion network + its diffusers scheduler, sampled by an ODE solver.

The folder is an ordinary diffusers folder (``unet``, ``scheduler``, optional ``vocoder``, and
for a latent teacher such as Stable Diffusion or AudioLDM an ``AutoencoderKL`` as ``vae``: the
network works on its latents, and the samples are decoded by it).
Any scheduler the adapters know works: EDM (our own teachers), DDPM/DDIM-style VP with
epsilon / v / sample prediction, and flow matching.
"""
from __future__ import annotations

import torch

from gendistill.diffusion import SAMPLERS, append_zero, denoiser_from_scheduler, karras_sigmas

from .base import ConditionalPipeline, custom_sigmas, timestep_sigmas


class TeacherPipeline(ConditionalPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vocoder", "vae", "text_encoder", "tokenizer"]

    def __init__(self, unet, scheduler, vocoder=None, text_encoder_name: str | None = None,
                 vae=None, text_encoder=None, tokenizer=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vocoder=vocoder, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(text_encoder_name=text_encoder_name)

    def denoiser(self):
        """The teacher as D(x, sigma, cond) in sigma space, with its null condition for CFG."""
        return denoiser_from_scheduler(self.unet, self.scheduler, self.null_condition())

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt=None, batch_size: int = 1,
                 num_per_condition: int = 1, num_inference_steps: int = 18,
                 guidance_scale: float = 1.0, sampler: str = "heun", generator=None,
                 output_type: str = "pil", return_dict: bool = True, sigmas=None,
                 timesteps=None, latents=None):
        """Solve the probability-flow ODE over a Karras grid of ``num_inference_steps`` + 0, or
        over ``sigmas`` (decreasing noise levels; a final 0 is appended when missing), or from
        ``timesteps`` (the network's own time inputs, one per step, e.g. [999, 500, 100] for a
        DDPM network). ``latents``: the unit-variance starting noise, one per sample."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        cond, conditions = self.prepare_conditions(class_labels, prompt, batch_size,
                                                   num_per_condition)
        denoiser = self.denoiser()
        if timesteps is not None:
            sigmas = timestep_sigmas(timesteps, sigmas, denoiser)
        if sigmas is None:
            sigmas = append_zero(karras_sigmas(num_inference_steps, denoiser.sigma_min,
                                               denoiser.sigma_max))
        else:
            sigmas = custom_sigmas(sigmas, denoiser.sigma_max, min_points=1)
            sigmas = sigmas if sigmas[-1] == 0 else append_zero(sigmas)
        sigmas = sigmas.to(self.device)
        x = self.initial_noise(len(conditions), float(sigmas[0]), generator, latents)
        with self.progress_bar(total=len(sigmas) - 1) as bar:
            x = SAMPLERS[sampler](denoiser, x, sigmas, cond, guidance_scale, progress=bar)
        return self.postprocess(x, conditions, output_type, return_dict)
