"""DMD2 (Yin et al. 2024) for one student of multi-student distillation (DESIGN.md section 5).

Generator x = G(z, c) = D_G(sigma_max z, sigma_max, c). With x_sigma = x + sigma eps, sigma from
the Karras grid between 2 % and 98 % of its range:

  p_real = x - D^omega_teacher(x_sigma, sigma, c),   p_fake = x - mu_fake(x_sigma, sigma, c)
  grad   = (p_real - p_fake) / mean|p_real|           (mean per sample)
  L_DM   = 0.5 ||x - sg(x - grad)||^2                 (its gradient in x: grad, averaged)

mu_fake starts as the teacher and learns the generator's distribution by denoising sg(x) every
iteration; the generator steps every ``gen_update_ratio`` iterations (two time-scale rule). A
regression term pulls G(z_pair, c_pair) to the teacher's ODE sample from the same noise (pairs
from the whole conditioning space). Stage 2 adds a classifier head on mu_fake's bottleneck
(non-saturating GAN). Smaller students first learn the teacher's denoiser (TSM).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..diffusion import (SIGMA_DATA, Denoiser, append_dims, append_zero,
                         bottleneck_module, cfg_denoise, edm_loss_weight, full_precision,
                         karras_sigmas, sample_heun, sample_lognormal, tap_features)
from ..models.discriminator import FeatureDiscriminator
from ..models.msd import one_step
from ..models.networks import MLPNet
from ..training.loop import frozen, unwrap

DM_GRID_POINTS = 1000


def dm_sigmas(n: int, grid: torch.Tensor, low: float = 0.02, high: float = 0.98,
              generator=None) -> torch.Tensor:
    """sigma uniform over the grid's indices between ``low`` and ``high`` of its range."""
    last = len(grid) - 1
    lo, hi = int(round(low * last)), int(round(high * last))
    idx = torch.randint(lo, hi + 1, (n,), generator=generator)
    return grid[idx.to(grid.device)]


def distribution_matching_loss(x: torch.Tensor, teacher: Denoiser, fake: Denoiser | FakeScore,
                               sigma: torch.Tensor, cond=None, guidance: float = 1.0,
                               noise: torch.Tensor | None = None):
    """(L_DM, grad): the teacher under CFG at ``guidance``, the fake score unguided (a
    FakeScore is called whole: sharded, it gathers its weights in its own forward)."""
    noise = torch.randn_like(x) if noise is None else noise
    with torch.no_grad(), full_precision(x.device):
        x_sigma = x.detach().float() + append_dims(sigma, x.ndim) * noise.float()
        p_real = x.detach().float() - cfg_denoise(teacher, x_sigma, sigma, cond, guidance)
        p_fake = x.detach().float() - fake(x_sigma, sigma, cond)
        scale = p_real.abs().flatten(1).mean(1).clamp_min(1e-8)
        grad = (p_real - p_fake) / append_dims(scale, x.ndim)
    loss = 0.5 * ((x.float() - (x.detach().float() - grad)) ** 2).mean()
    return loss, grad


def denoising_loss(denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, cond=None,
                   target: Denoiser | None = None, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) ||D(x0 + sigma eps) - y||^2 with y = x0 (the fake score's DSM on generated
    samples) or y = target(x_sigma) (TSM: a student learns the teacher's denoiser)."""
    x = noised(x0, sigma)
    y = x0
    if target is not None:
        with torch.no_grad(), full_precision(x.device):
            y = target(x.float(), sigma, cond)
    return weighted_error(denoiser(x, sigma, cond), y, sigma, sigma_data)


def noised(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x + append_dims(sigma, x.ndim) * torch.randn_like(x)


def weighted_error(denoised, y, sigma, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM's lambda(sigma)-weighted squared error, averaged."""
    err = ((denoised - y) ** 2).flatten(1).mean(1)
    return (edm_loss_weight(sigma, sigma_data) * err).mean()


class FakeScore(nn.Module):
    """mu_fake (a copy of the teacher's network, in the teacher's parameterisation) and, for
    the adversarial stage, a classifier head on its bottleneck."""

    def __init__(self, network: nn.Module, teacher: Denoiser, head: bool, example=None):
        super().__init__()
        self.denoiser = teacher.around(network)
        self.head = None
        if head:
            with torch.no_grad():
                feats = self.bottleneck(*example)[1]
            self.head = FeatureDiscriminator.for_features(feats)

    def bottleneck(self, x, sigma, cond=None):
        net = self.denoiser.net
        with tap_features(net, [bottleneck_module(net)]) as feats:
            out = self.denoiser(x, sigma, cond)
        return out, list(feats)

    def forward(self, x, sigma, cond=None, head: bool = False):
        """mu_fake(x, sigma, c) of a noised x; with ``head`` also the head's logit of each row
        (gradients reach x, the head and mu_fake). One forward gives both, so that a
        data-parallel wrapper sees the fake score's whole update in one call."""
        if not head:
            return self.denoiser(x, sigma, cond)
        out, feats = self.bottleneck(x, sigma, cond)
        return out, self.head(feats)


def narrow_network(network: nn.Module, width: float) -> nn.Module:
    """A fresh network of the teacher's architecture with its channels (UNet), attention heads
    (DiT) or hidden width (MLP) scaled by ``width`` (TSM students); 1.0 is a copy of the
    teacher."""
    if width == 1.0:
        return copy.deepcopy(network)
    config = dict(network.config)
    if isinstance(network, MLPNet):
        config["width"] = max(1, round(config["width"] * width))
    elif hasattr(network, "transformer_blocks"):  # DiT / PixArt
        heads = max(1, round(config["num_attention_heads"] * width))
        if config.get("cross_attention_dim"):  # PixArt attends to captions at the token width
            config["cross_attention_dim"] = heads * config["attention_head_dim"]
        config["num_attention_heads"] = heads
    else:
        groups = config.get("norm_num_groups") or 1
        channels = [max(groups, round(c * width / groups) * groups)
                    for c in config["block_out_channels"]]
        config["block_out_channels"] = channels
    return type(network).from_config(config)


@torch.no_grad()
def select_weights(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """Initialise a narrow student from its teacher by weight selection (Xu et al. 2024,
    "Initializing models with larger ones"): every tensor takes the teacher's leading entries
    along each dimension, the same channels in every layer, so the kept units stay connected
    as they were in the teacher."""
    weights = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        tensor.copy_(weights[name][tuple(slice(0, n) for n in tensor.shape)])
    return student


@torch.no_grad()
def teacher_pairs(teacher: Denoiser, conds: torch.Tensor | None, shape: tuple, guidance: float,
                  num_steps: int, seed: int, batch_size: int = 256,
                  progress: bool = False) -> dict:
    """Teacher ODE samples x_pair = Heun(sigma_max z, c) for the given conditions, with their
    noise ``noise`` = sigma_max z: regression targets from the same noise and condition."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    n = len(conds) if conds is not None else batch_size
    noise = teacher.sigma_max * torch.randn(n, *shape, generator=g)
    sigmas = append_zero(karras_sigmas(num_steps, teacher.sigma_min, teacher.sigma_max))
    starts = range(0, n, batch_size)
    out = []
    with tqdm(total=len(starts) * num_steps, desc="teacher pairs", disable=not progress,
              dynamic_ncols=True) as bar:
        for i in starts:
            c = None if conds is None else conds[i:i + batch_size]
            out.append(sample_heun(teacher, noise[i:i + batch_size], sigmas, c, guidance, bar))
    return {"noise": noise, "cond": conds, "x": torch.cat(out)}


def fingerprint(named_tensors) -> str:
    """A hash of (name, tensor) pairs, e.g. a network's state_dict().items(): a cache made from
    one teacher (or condition set) is not reused for another saved at the same path."""
    digest = hashlib.sha256()
    for name, value in named_tensors:
        digest.update(name.encode())
        digest.update(memoryview(value.detach().cpu().contiguous().view(-1)
                                 .view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]


def cached_pairs(path: Path, key: dict, make) -> dict:
    """The pairs saved at ``path`` when they were made with ``key``; else made and saved
    (written whole, then renamed: students running in parallel never read half a file)."""
    key = json.dumps(key, sort_keys=True)  # compared as text: tuples == lists
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == key:
            return saved
    pairs = make()
    pairs["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(pairs, tmp)
    tmp.replace(path)
    return pairs


class DMD2Training:
    """One student on its part of the conditioning space: TSM (narrow students), DM with the
    two time-scale rule and the regression term, then the optional adversarial stage."""

    def __init__(self, cfg: Config, teacher: Denoiser, pairs: dict, encode=None):
        m = cfg.msd
        self.cfg, self.pairs = cfg, pairs
        # data space -> the teacher network's space (a latent teacher's VAE); None: the data
        self.encode = encode or (lambda x: x)
        self.teacher = teacher.eval().requires_grad_(False)
        self.model = narrow_network(teacher.net, m.student_width).requires_grad_(True)
        if m.student_width < 1 and m.student_init == "select":
            select_weights(self.model, teacher.net)
        # on the teacher's device: an earlier student's training may have moved it there
        device = next(teacher.net.parameters()).device
        example = (pairs["x"][:2].to(device), torch.ones(2, device=device),
                   None if pairs["cond"] is None else pairs["cond"][:2].to(device))
        fake = FakeScore(copy.deepcopy(teacher.net).requires_grad_(True), teacher,
                         head=m.adversarial, example=example)
        self.unused_parameters = m.adversarial  # the head sits out the steps before stage 2
        self.auxiliary = (fake, torch.optim.AdamW(fake.parameters(), lr=cfg.train.lr,
                                                  weight_decay=cfg.train.weight_decay))
        self.grid = karras_sigmas(DM_GRID_POINTS, teacher.sigma_min, teacher.sigma_max)
        self.generated = None  # the generator step's samples, reused by the fake score's step

    @property
    def fake(self) -> FakeScore:
        """mu_fake as the loop prepared it (data-parallel wrapped): the fake score's own
        updates go through it; the generator's loss may read it unwrapped."""
        return self.auxiliary[0]

    @property
    def tsm_steps(self) -> int:
        """TSM runs for narrow students only (a full-width one starts as the teacher)."""
        m = self.cfg.msd
        return m.tsm_steps if m.student_width < 1 else 0

    def stage(self, step: int) -> str:
        m = self.cfg.msd
        if step < self.tsm_steps:
            return "tsm"
        if m.adversarial and step >= m.gan_start:
            return "adversarial"
        return "dm"

    def student_denoiser(self) -> Denoiser:
        """The student's network as a denoiser at every sigma, in the teacher's
        parameterisation (TSM; at sigma_max, the generator)."""
        return self.teacher.around(self.model)

    def dm_sigmas(self, n: int, device) -> torch.Tensor:
        low, high = self.cfg.msd.dm_range
        return dm_sigmas(n, self.grid, low, high).to(device)

    def noise(self, n: int, device) -> torch.Tensor:
        """sigma_max z for n samples in the network's space (a latent teacher's latents)."""
        shape = self.pairs["noise"].shape[1:]
        return self.teacher.sigma_max * torch.randn(n, *shape, device=device)

    def generate(self, noise, cond):
        return one_step(self.student_denoiser(), noise, cond)

    def loss(self, batch, step):
        m = self.cfg.msd
        x0, cond = batch if len(batch) == 2 else (batch[0], None)
        device, n = x0.device, x0.shape[0]
        self.teacher.to(device)
        stage = self.stage(step)
        if stage == "tsm":
            sigma = sample_lognormal(n, self.cfg.edm.p_mean, self.cfg.edm.p_std, device=device)
            loss = denoising_loss(self.student_denoiser(), self.encode(x0), sigma, cond,
                                  target=self.teacher, sigma_data=self.teacher.sigma_data)
            return loss, {"tsm": loss.detach()}
        if (step - self.tsm_steps) % m.gen_update_ratio != 0:
            return None, {}  # the fake score steps alone
        x = self.generate(self.noise(n, device), cond)
        sigma = self.dm_sigmas(n, device)
        loss_dm, _grad = distribution_matching_loss(x, self.teacher, unwrap(self.fake),
                                                    sigma, cond, m.guidance)
        loss, logs = loss_dm, {"dm": loss_dm.detach()}
        if m.regression_weight > 0:
            idx = torch.randint(len(self.pairs["x"]), (n,))
            pair_cond = None if self.pairs["cond"] is None else self.pairs["cond"][idx].to(device)
            estimate = self.generate(self.pairs["noise"][idx].to(device), pair_cond)
            loss_reg = ((estimate - self.pairs["x"][idx].to(device)) ** 2).flatten(1).mean(1)
            loss_reg = loss_reg.mean()
            loss = loss + m.regression_weight * loss_reg
            logs["regression"] = loss_reg.detach()
        if stage == "adversarial":
            # the non-saturating generator loss through the head on mu_fake's bottleneck
            sigma = self.dm_sigmas(n, device)
            with frozen(unwrap(self.fake)):  # its gradient reaches x only
                logits = unwrap(self.fake)(noised(x, sigma), sigma, cond, head=True)[1]
            loss_gan = nn.functional.softplus(-logits).mean()
            loss = loss + m.gan_generator_weight * loss_gan
            logs["gan"] = loss_gan.detach()
        self.generated = x.detach()
        return loss, logs

    def auxiliary_loss(self, batch, step):
        """The fake score's denoising loss on the generator's samples (and the head's)."""
        stage = self.stage(step)
        if stage == "tsm":
            return None, {}
        x0, cond = batch if len(batch) == 2 else (batch[0], None)
        fake = self.fake
        x = self.generated
        if x is None:
            with torch.no_grad():
                x = self.generate(self.noise(x0.shape[0], x0.device), cond)
        self.generated = None
        n, sigma_data = x.shape[0], self.teacher.sigma_data
        sigma = self.dm_sigmas(n, x.device)
        if stage != "adversarial":
            loss = denoising_loss(fake, x, sigma, cond, sigma_data=sigma_data)
            return loss, {"fake_dsm": loss.detach()}
        # the generated samples (the fake score's DSM, the head's "fake") and the real ones
        # (the head's "real") in one forward
        sigmas = torch.cat([sigma, self.dm_sigmas(n, x.device)])
        both = torch.cat([x, self.encode(x0)])
        denoised, logits = fake(noised(both, sigmas), sigmas, None if cond is None
                                else torch.cat([cond, cond]), head=True)
        loss = weighted_error(denoised[:n], x, sigma, sigma_data)
        logs = {"fake_dsm": loss.detach()}
        generated, real = logits[:n], logits[n:]
        loss_head = (nn.functional.softplus(-real) + nn.functional.softplus(generated)).mean()
        loss = loss + self.cfg.msd.gan_head_weight * loss_head
        logs.update(head=loss_head.detach(), d_real=real.mean().detach(),
                    d_fake=generated.mean().detach())
        return loss, logs

    def export(self, network, folder: Path):
        network.save_pretrained(folder)
