"""K one-step students as one diffusers component, with the router in its config (MSD).

Student k is a raw network (a copy of the teacher's, or a narrower one after TSM) in its
teacher's parameterisation at sigma_max: x = D_k(sigma_max z, sigma_max, c) (DESIGN.md
section 5). The
router sends each condition to its student; each sample costs one network call.
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ..diffusion.sigmas import SIGMA_DATA, SIGMA_MAX
from ..diffusion.teachers import Denoiser, parameterized
from ..partition import Router
from .networks import NETWORK_CLASSES


def one_step(denoiser: Denoiser, noise: torch.Tensor, cond=None) -> torch.Tensor:
    """The 1-step generator G(z, c) = D(sigma_max z, sigma_max, c), for ``noise`` =
    sigma_max z."""
    sigma = torch.full((noise.shape[0],), denoiser.sigma_max, device=noise.device,
                       dtype=noise.dtype)
    return denoiser(noise, sigma, cond)


class MSDStudents(ModelMixin, ConfigMixin):
    """``networks[k]`` is student k; ``router`` (a ``gendistill.partition.Router`` state) maps
    class labels or pooled prompt embeddings to k; ``teacher_scheduler`` is the teacher's
    scheduler config, whose parameterisation the students keep (None: EDM)."""

    @register_to_config
    def __init__(self, network_class: str, network_config: dict, router: dict,
                 sigma_data: float = SIGMA_DATA, sigma_max: float = SIGMA_MAX,
                 teacher_scheduler: dict | None = None):
        super().__init__()
        if network_class not in NETWORK_CLASSES:
            raise ValueError(f"unsupported student network {network_class!r} "
                             f"(known: {', '.join(NETWORK_CLASSES)})")
        self.router = Router(router)
        cls = NETWORK_CLASSES[network_class]
        self.networks = nn.ModuleList(cls.from_config(network_config)
                                      for _ in range(self.router.num_students))

    @classmethod
    def from_networks(cls, networks: list[nn.Module], router: Router, teacher: Denoiser
                      ) -> "MSDStudents":
        first = networks[0]
        config = {k: v for k, v in first.config.items() if not k.startswith("_")}
        students = cls(type(first).__name__, config, router.state, teacher.sigma_data,
                       teacher.sigma_max, teacher.scheduler_config)
        if len(networks) != router.num_students:
            raise ValueError(f"{len(networks)} networks for a router of "
                             f"{router.num_students} students")
        for mine, net in zip(students.networks, networks):
            mine.load_state_dict(net.state_dict())
        return students

    @property
    def num_students(self) -> int:
        return len(self.networks)

    @property
    def network(self) -> nn.Module:
        """Student 0, whose config (shape, classes) every student shares."""
        return self.networks[0]

    def denoiser(self, k: int) -> Denoiser:
        """Student k's network in its teacher's parameterisation."""
        c = self.config
        return parameterized(self.networks[k], c.teacher_scheduler, c.sigma_data,
                             sigma_max=c.sigma_max)

    def forward(self, noise: torch.Tensor, cond=None, student: torch.Tensor | None = None):
        """One call per sample: each row of ``noise`` (sigma_max z) through its student
        (``student``, or the router's choice for class labels)."""
        if student is None:
            if self.router.kind == "text":
                raise ValueError("MSDStudents: text conditions need student= (the router reads "
                                 "pooled prompt embeddings, cond holds the encoder's token "
                                 "states); MSDPipeline routes them")
            student = (self.router(cond) if cond is not None else
                       torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device))
        out = torch.empty_like(noise)
        for k in student.unique().tolist():
            rows = (student == k).nonzero().flatten()
            out[rows] = one_step(self.denoiser(k), noise[rows],
                                 None if cond is None else cond[rows])
        return out
