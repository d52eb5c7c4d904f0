"""What every gendistill pipeline shares: conditions in, images / audio / vectors out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from filelock import FileLock

from .text import text_encoder_of


@dataclass
class SamplesOutput(BaseOutput):
    """``samples``: images (PIL list / array / tensor), waveforms (with ``sample_rate``) or vectors.

    The same samples are also ``images`` (image pipelines) or ``audios`` (audio pipelines), the
    names diffusers users know. ``latents`` are the raw samples in the data's space (images in
    [-1, 1], mel spectrograms, vectors: what the metrics read); a latent pipeline's have been
    decoded by its VAE, and ``vae_latents`` holds them undecoded. ``conditions``: the class
    label or prompt of each; ``students`` (MSD): the index of the student that made each.
    """

    samples: object
    latents: torch.Tensor
    conditions: list
    sample_rate: int | None = None
    students: list | None = None
    images: object = None
    audios: object = None
    vae_latents: torch.Tensor | None = None


def base_network(net):
    """The diffusers-style network itself (a CTM student wraps one; of MSD students, the
    first)."""
    inner = getattr(net, "network", None)
    return net if inner is None else inner


def base_config(net):
    return base_network(net).config


def network_sample_shape(net) -> tuple[int, ...]:
    cfg = base_config(net)
    if hasattr(cfg, "in_dim"):
        return (cfg.in_dim,)
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (cfg.in_channels, h, w)


def data_shape(pipe) -> tuple[int, ...]:
    """The shape of one sample in the data's space: the network's, or for a latent pipeline
    what its VAE decodes the network's latents to."""
    shape = network_sample_shape(pipe.network)
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return shape
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.out_channels, shape[1] * factor, shape[2] * factor)


def teacher_components(pipe) -> dict:
    """What a student's pipeline takes over from its teacher's as it is: the vocoder, a latent
    teacher's VAE, the teacher's own text encoder and tokenizer (None where it has none)."""
    return {name: getattr(pipe, name, None)
            for name in ("vocoder", "vae", "text_encoder", "tokenizer")}


def mismatch(pipe, ds) -> str | None:
    """Why a pipeline's samples do not fit a dataset (shape, conditioning, classes), or None."""
    net = pipe.network
    shape = tuple(data_shape(pipe))
    if shape != tuple(ds.shape):
        return f"makes samples of shape {shape}, dataset {ds.name} has {tuple(ds.shape)}"
    if pipe.conditioning != ds.conditioning:
        return (f"is {pipe.conditioning}-conditional, dataset {ds.name} is "
                f"{ds.conditioning}-conditional")
    if ds.conditioning == "class" and null_class(net) != ds.num_classes:
        return f"has {null_class(net)} classes, dataset {ds.name} has {ds.num_classes}"
    return None


def custom_sigmas(sigmas, sigma_max: float, min_points: int = 2) -> torch.Tensor:
    """A user's noise schedule: finite, non-negative, strictly decreasing, and within the
    model's sigma_max."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
    if len(sigmas) < min_points:
        raise ValueError(f"sigmas: give at least {min_points} noise levels, got "
                         f"{sigmas.tolist()}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any() or (sigmas.diff() >= 0).any():
        raise ValueError(f"sigmas: expected finite, non-negative, strictly decreasing noise "
                         f"levels, got {sigmas.tolist()}")
    if sigmas[0] > sigma_max * (1 + 1e-6):
        raise ValueError(f"sigmas: the model knows noise levels up to sigma_max = "
                         f"{float(sigma_max)}, got {float(sigmas[0])}")
    return sigmas


def timestep_sigmas(timesteps, sigmas, denoiser) -> torch.Tensor:
    """The noise levels of a user's ``timesteps``, one per step: the network's own time inputs in
    its diffusers scheduler's units (999 ... for a DDPM network, 0.25 ln sigma for EDM, 1000 t
    for flow matching), as diffusers' consistency and LCM pipelines take them."""
    if sigmas is not None:
        raise ValueError("give timesteps or sigmas, not both")
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    if len(t) == 0 or not torch.isfinite(t).all():
        raise ValueError(f"timesteps: expected finite time inputs, got {t.tolist()}")
    return denoiser.timestep_sigma(t).float()


def null_class(net) -> int | None:
    """Class-conditional networks carry one extra embedding, the null class, at the end (a
    DiT's label table has ``num_embeds_ada_norm`` classes and the null row after them)."""
    cfg = base_config(net)
    if type(base_network(net)).__name__ == "DiTTransformer2DModel":
        return cfg.num_embeds_ada_norm
    n = getattr(cfg, "num_class_embeds", None)
    return n - 1 if n else None


def shim_lock_path() -> Path:
    """The lock every gendistill process takes while diffusers copies and imports shims."""
    from diffusers.utils.constants import HF_MODULES_CACHE

    Path(HF_MODULES_CACHE).mkdir(parents=True, exist_ok=True)
    return Path(HF_MODULES_CACHE) / "gendistill-shims.lock"


class ConditionalPipeline(DiffusionPipeline):
    """Base for pipelines whose network takes class labels or prompt token states."""

    network_name = "unet"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Folders saved with their import shims (see ``remote.py``) load without
        ``trust_remote_code`` when every shim is exactly ours; anything else must opt in."""
        from .remote import shims_are_ours

        folder = Path(pretrained_model_name_or_path)
        if not ((folder / "model_index.json").is_file() and shims_are_ours(folder)):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.setdefault("trust_remote_code", True)
        # diffusers copies each shim to one shared file per name (HF_MODULES_CACHE/.../local/
        # unet_module.py), truncating it first, and imports it from there: a second process
        # loading at that moment imports an empty module. One load at a time on this machine.
        with FileLock(shim_lock_path()):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def network(self):
        return getattr(self, self.network_name)

    @property
    def device(self) -> torch.device:
        """Where the network computes, so where samples are made. diffusers' own property asks
        every component, each walking all its modules for offloading hooks (about 1 ms on the
        digits UNet, several times a call: a tenth of a 1-step student's call)."""
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def conditioning(self) -> str:
        if null_class(self.network) is not None:
            return "class"
        return "text" if text_encoder_of(self) is not None else "none"

    def encode_prompt(self, prompts: list[str], return_pooled: bool = False):
        """The prompts' token states for the network; with ``return_pooled`` also their pooled
        states (what MSD's router reads), from the same encoder call."""
        states, pooled = text_encoder_of(self)(prompts)
        states = states.to(self.device, self.dtype)
        return (states, pooled.to(self.device)) if return_pooled else states

    def null_condition(self):
        """One sample's null condition: the null class index or the empty prompt's states."""
        if self.conditioning == "class":
            return torch.tensor(null_class(self.network), device=self.device)
        if self.conditioning == "text":
            return self.encode_prompt([""])[0]
        return None

    def prepare_conditions(self, class_labels=None, prompt=None, batch_size: int = 1,
                           num_per_condition: int = 1, return_pooled: bool = False):
        """(cond tensor or None, list of condition descriptions), repeated per condition; with
        ``return_pooled``, a text pipeline's cond is (token states, pooled states)."""
        kind = self.conditioning
        if kind == "class":
            if class_labels is None:
                raise ValueError("this pipeline is class-conditional: pass class_labels")
            labels = torch.as_tensor(class_labels).reshape(-1).long()
            num_classes = null_class(self.network)
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"class labels must be in [0, {num_classes - 1}], got "
                                 f"{labels.tolist()}")
            labels = labels.repeat_interleave(num_per_condition)
            return labels.to(self.device), labels.tolist()
        if kind == "text":
            if prompt is None:
                raise ValueError("this pipeline is text-conditional: pass prompt")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts = [p for p in prompts for _ in range(num_per_condition)]
            return self.encode_prompt(prompts, return_pooled), prompts
        if class_labels is not None or prompt is not None:
            raise ValueError("this pipeline is unconditional: pass neither class_labels nor prompt")
        return None, [None] * (batch_size * num_per_condition)

    def initial_noise(self, n: int, sigma: float, generator=None, latents=None) -> torch.Tensor:
        """sigma z for the first step; ``latents`` is z given by the user (unit variance, as
        diffusers pipelines take it), else z is drawn."""
        shape = (n, *network_sample_shape(self.network))
        if latents is None:
            z = randn_tensor(shape, generator=generator, device=self.device,
                             dtype=self.dtype)
        else:
            z = torch.as_tensor(latents)
            if tuple(z.shape) != shape:
                raise ValueError(f"latents: expected shape {shape} (one per sample), got "
                                 f"{tuple(z.shape)}")
            if not torch.isfinite(z).all():
                raise ValueError("latents: contains NaN or Inf")
            z = z.to(self.device, self.dtype)
        return sigma * z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Data space -> the network's space: a latent pipeline's VAE latents (a sample of the
        posterior, shifted and scaled as the VAE's config says); the data itself otherwise."""
        vae = getattr(self, "vae", None)
        if vae is None:
            return x
        vae.to(x.device)
        with torch.no_grad():
            z = vae.encode(x.to(vae.dtype)).latent_dist.sample()
            shift = vae.config.get("shift_factor") or 0.0
            return ((z - shift) * vae.config.scaling_factor).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The network's space -> data space (a latent pipeline's VAE decoder)."""
        vae = getattr(self, "vae", None)
        if vae is None:
            return z
        shift = vae.config.get("shift_factor") or 0.0
        with torch.no_grad():
            return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor + shift).sample

    def postprocess(self, z: torch.Tensor, conditions: list, output_type: str = "pil",
                    return_dict: bool = True, students: list | None = None):
        """Model space -> user space: a latent pipeline's VAE decoding, then images in [0, 1] /
        PIL, waveforms via the vocoder, vectors. ``output_type="latent"`` stops before the
        user space (before the VAE, as in diffusers)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        x = self.decode(z)
        vae_latents = z if getattr(self, "vae", None) is not None else None
        vocoder = getattr(self, "vocoder", None)
        sample_rate, kind = None, None
        if output_type == "latent":
            samples = z
        elif x.ndim == 2:
            samples = x if output_type == "pt" else x.float().cpu().numpy()
        elif vocoder is not None:
            waves = vocoder(x.float())
            sample_rate, kind = vocoder.config.sample_rate, "audios"
            samples = waves if output_type == "pt" else waves.cpu().numpy()
        else:
            kind = "images"
            images = ((x.float() + 1) / 2).clamp(0, 1)
            if output_type == "pt":
                samples = images
            else:
                arr = images.permute(0, 2, 3, 1).cpu().numpy()
                samples = arr if output_type == "np" else self.numpy_to_pil(arr)
        if not return_dict:
            return (samples,)
        named = {kind: samples} if kind else {}
        return SamplesOutput(samples=samples, latents=x, conditions=conditions,
                             sample_rate=sample_rate, students=students, vae_latents=vae_latents,
                             **named)


