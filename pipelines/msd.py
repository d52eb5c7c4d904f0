"""MSDPipeline: K one-step students behind a router (multi-student distillation).

A batch may mix conditions: the router splits it among the students and the results come back
in the batch's order; each sample costs one network call. The students of a latent teacher
generate its VAE's latents, and the pipeline decodes them with that VAE (``vae``).
"""
from __future__ import annotations

import torch

from .base import ConditionalPipeline


class MSDPipeline(ConditionalPipeline):
    network_name = "students"
    model_cpu_offload_seq = "text_encoder->students->vae"
    _optional_components = ["vocoder", "vae", "text_encoder", "tokenizer"]

    def __init__(self, students, vocoder=None, text_encoder_name: str | None = None, vae=None,
                 text_encoder=None, tokenizer=None):
        super().__init__()
        self.register_modules(students=students, vocoder=vocoder, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(text_encoder_name=text_encoder_name)

    def route(self, cond, conditions: list) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the students' cond, the student index of each sample): by class label, or by the
        prompt's pooled states (``cond`` is then the pair prepare_conditions gave)."""
        if self.conditioning == "text":
            states, pooled = cond
            return states, self.students.router(pooled).to(self.device)
        if cond is None:
            return None, torch.zeros(len(conditions), dtype=torch.long, device=self.device)
        return cond, self.students.router(cond)

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt=None, batch_size: int = 1,
                 num_per_condition: int = 1, num_inference_steps: int = 1, generator=None,
                 output_type: str = "pil", return_dict: bool = True, latents=None):
        """One step from sigma_max; ``.students`` of the output says which student made each
        sample. ``latents``: the unit-variance starting noise, one per sample."""
        if num_inference_steps != 1:
            raise ValueError(f"MSD students are 1-step generators: num_inference_steps must be "
                             f"1, got {num_inference_steps}")
        cond, conditions = self.prepare_conditions(class_labels, prompt, batch_size,
                                                   num_per_condition, return_pooled=True)
        cond, student = self.route(cond, conditions)
        noise = self.initial_noise(len(conditions), self.students.config.sigma_max, generator,
                                   latents)
        x = self.students(noise, cond, student)
        return self.postprocess(x, conditions, output_type, return_dict, student.tolist())
