"""The maths of diffusion in sigma space: grids, scalings, teacher adapters and ODE solvers."""
from .sigmas import *  # noqa: F401,F403
from .solvers import SAMPLERS, heun_step, sample_euler, sample_heun, to_d  # noqa: F401
from .teachers import (Denoiser, EDMDenoiser, FlowDenoiser, NFECounter, VPDenoiser,  # noqa: F401
                       bottleneck_module, call_network, cfg_denoise, denoiser_from_scheduler,
                       feature_modules, full_precision, parameterized,
                       scheduler_config, scheduler_from_config, tap_features)
