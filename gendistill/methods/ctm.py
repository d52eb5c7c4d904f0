"""Consistency Trajectory Models (Kim et al. 2024) with SoundCTM's choices (Saito et al. 2025).

The student G(x_t, t, s) learns to jump along the teacher's probability-flow ODE:

  L_CTM = d( G_theta(x_t, t, s),  G_sg(Heun_k(x_t: t -> u), u, s) ),  t = s_i, u = s_{i+k}, s = s_j
  L     = L_CTM + w * lambda_DSM * lambda(sigma) ||g_theta(x_sigma, sigma, sigma) - x_0||^2

with G_sg the EMA theta- of theta (``ctm.target_inner=ema``) or theta itself without gradient
(``online``, CTM's choice), k ~ P(k) ∝ k, the distance d measured in the teacher's feature space
(SoundCTM, default) or in l2, at time s ("zs", SoundCTM) or after mapping both to sigma_min with
the EMA student ("z0", CTM). Two optional terms act on the 1-step samples a user draws:
CTM's GAN (``ctm.gan_weight``: heads on the teacher's feature maps, or on a classifier's,
``ctm.gan_classifier``) or DMD's distribution matching against a fake score that learns
those samples (``ctm.dm_weight``, the gradient of methods/dmd2.py). See DESIGN.md section 4.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError
from ..data.conditioning import drop_conditions
from ..diffusion import (SIGMA_MAX, SIGMA_MIN, Denoiser, append_dims,
                         full_precision, heun_step, karras_sigmas, sample_half_lognormal,
                         sample_lognormal)
from ..models.discriminator import FeatureDiscriminator
from ..models.networks import widen_network
from ..models.student import CTMStudent, guidance_text_width
from ..training.ema import EMA
from ..training.loop import frozen, is_first_process, unwrap
from .dmd2 import (DM_GRID_POINTS, FakeScore, denoising_loss, distribution_matching_loss,
                   dm_sigmas, noised, weighted_error)

log = logging.getLogger(__name__)


@dataclass
class CTMTimes:
    i: torch.Tensor  # t = grid[i]
    k: torch.Tensor  # u = grid[i + k]: k teacher Heun steps
    j: torch.Tensor  # s = grid[j], j >= i + k


def sample_ctm_times(n: int, num_grid: int, max_jump: int | None = None, device=None,
                     generator: torch.Generator | None = None,
                     final_jump_prob: float = 0.0, start_sampling: str = "jump") -> CTMTimes:
    """k in {1..K} with P(k) ∝ k; i ~ U{0..N-1-k}; j ~ U{i+k..N-1}, or j = N-1 (s = sigma_min,
    the jump a 1-step sample makes) with probability ``final_jump_prob``.

    ``start_sampling="uniform"`` draws t first, i ~ U{0..N-2}, then k ∝ k among the jumps that
    fit below it (k <= min(K, N-1-i)): every start is trained as often, where drawing k first
    puts 29 % of the starts at sigma_max and 4 % below sigma = 1 (N = 18)."""
    max_jump = num_grid - 1 if max_jump is None else max_jump
    if not 1 <= max_jump <= num_grid - 1:
        raise ValueError(f"max_jump must be in [1, {num_grid - 1}], got {max_jump}")
    if start_sampling == "jump":
        weights = torch.arange(1, max_jump + 1, dtype=torch.float)
        k = torch.multinomial(weights, n, replacement=True, generator=generator) + 1
        i = (torch.rand(n, generator=generator) * (num_grid - k)).long()
    elif start_sampling == "uniform":
        i = (torch.rand(n, generator=generator) * (num_grid - 1)).long()
        fit = (num_grid - 1 - i).clamp(max=max_jump).double()
        # inverse CDF of P(k) ∝ k on {1..m}: P(K <= k) = k (k + 1) / (m (m + 1))
        r = torch.rand(n, generator=generator, dtype=torch.double)
        k = ((torch.sqrt(1 + 4 * r * fit * (fit + 1)) - 1) / 2).ceil().long()
        k = torch.minimum(k.clamp(min=1), fit.long())
    else:
        raise ValueError(f"start_sampling must be jump or uniform, got {start_sampling!r}")
    j = i + k + (torch.rand(n, generator=generator) * (num_grid - i - k)).long()
    if final_jump_prob > 0:  # no extra draw otherwise: the default's times stay as they were
        j = torch.where(torch.rand(n, generator=generator) < final_jump_prob, num_grid - 1, j)
    return CTMTimes(i.to(device), k.to(device), j.to(device))


@torch.no_grad()
def teacher_solve(teacher: Denoiser, x: torch.Tensor, grid: torch.Tensor, start: torch.Tensor,
                  steps: torch.Tensor, cond=None, guidance=1.0) -> torch.Tensor:
    """Heun from grid[start] down to grid[start + steps], per sample, in fp32; only rows still
    moving are sent through the teacher."""
    x = x.float().clone()
    grid = grid.float()
    per_sample_guidance = torch.is_tensor(guidance)
    with full_precision(x.device):
        for m in range(int(steps.max())):
            rows = (steps > m).nonzero().flatten()
            idx = start[rows] + m
            x[rows] = heun_step(teacher, x[rows], grid[idx], grid[idx + 1],
                                None if cond is None else cond[rows],
                                guidance[rows] if per_sample_guidance else guidance)
    return x


def normalized_feature_distance(feats_a, feats_b) -> torch.Tensor:
    """Sum over layers of the mean squared difference of channel-normalised features, per sample
    (channels: dim 1 of a (B, C, H, W) map or a (B, D) vector, the last dim of (B, tokens, D))."""
    total = 0.0
    for a, b in zip(feats_a, feats_b):
        channels = -1 if a.ndim == 3 else 1
        a = a / (a.norm(dim=channels, keepdim=True) + 1e-8)
        b = b / (b.norm(dim=channels, keepdim=True) + 1e-8)
        total = total + ((a - b) ** 2).flatten(1).mean(1)
    return total


def teacher_feature_distance(teacher: Denoiser, estimate, target, sigma, cond=None):
    """SoundCTM's distance: both inputs through the frozen teacher at noise level sigma, in
    fp32 (gradients flow through the teacher into ``estimate``)."""
    sigma = sigma.float()
    with full_precision(estimate.device):
        with torch.no_grad():
            target_feats = teacher.features(target.float(), sigma, cond)
        return normalized_feature_distance(teacher.features(estimate.float(), sigma, cond),
                                           target_feats)


def l2_distance(estimate, target) -> torch.Tensor:
    return ((estimate - target) ** 2).flatten(1).mean(1)


LPIPS_SIZE = 224


@lru_cache(maxsize=1)
def lpips_network():
    """The LPIPS (VGG) network of torchmetrics, built once. torchmetrics' functional form is
    not used: it rejects inputs outside [-1, 1], and a student's output is not clamped."""
    try:
        import torchvision  # noqa: F401
        from torchmetrics.functional.image.lpips import _NoTrainLpips
    except ImportError:
        raise ConfigError("ctm.distance=lpips needs torchvision: pip install torchvision") \
            from None
    try:
        return _NoTrainLpips(net="vgg").eval().requires_grad_(False)
    except OSError as e:  # urllib's URLError: the weights are not on disk
        raise ConfigError("ctm.distance=lpips needs torchvision's VGG16 weights in the torch "
                          f"hub cache ({torch.hub.get_dir()}); none are downloaded") from e


def lpips_inputs(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) model-space images -> (B*C, 3, 224, 224) as CTM feeds LPIPS: bilinear
    resize to 224, values left as they are (no clamp); each channel of a non-RGB image (grey,
    a mel spectrogram, latents) is a grey image of its own."""
    x = nn.functional.interpolate(x.float(), size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear",
                                  align_corners=False)
    return x if x.shape[1] == 3 else x.flatten(0, 1).unsqueeze(1).expand(-1, 3, -1, -1)


def lpips_distance(estimate, target) -> torch.Tensor:
    """LPIPS (VGG) per sample, the mean over channels for non-RGB images."""
    net = lpips_network().to(estimate.device)
    channels = 1 if estimate.shape[1] == 3 else estimate.shape[1]
    with full_precision(estimate.device):
        d = net(lpips_inputs(estimate), lpips_inputs(target), normalize=False)
    return d.view(estimate.shape[0], channels).mean(1)


def adaptive_weight(loss_main: torch.Tensor, loss_aux: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e3, min_weight: float = 0.0) -> torch.Tensor:
    """||grad_last L_main|| / (||grad_last L_aux|| + 1e-4), clamped to [min, max], no
    gradient."""
    g_main = torch.autograd.grad(loss_main, last_layer, retain_graph=True)[0]
    g_aux = torch.autograd.grad(loss_aux, last_layer, retain_graph=True)[0]
    return (g_main.norm() / (g_aux.norm() + 1e-4)).clamp(min_weight, max_weight).detach()


def discriminator_logits(features, discriminator, x, cond=None,
                         sigma: float | None = None) -> torch.Tensor:
    """D(x): the heads on a frozen network's feature maps ``features(x, sigma, cond)`` (the
    teacher's, or a classifier's) of x noised at ``sigma``, or at a random sigma of EDM's
    training distribution when None, in fp32; gradients reach x but never that network."""
    sigma = (sample_lognormal(x.shape[0], device=x.device) if sigma is None
             else torch.full((x.shape[0],), float(sigma), device=x.device))
    x = x.float() + append_dims(sigma, x.ndim) * torch.randn_like(x, dtype=torch.float)
    with full_precision(x.device):
        return discriminator(features(x, sigma, cond))


def load_gan_classifier(folder: str, teacher_pipe) -> nn.Module:
    """The frozen classifier whose feature maps the GAN term's heads read (``ctm.gan_classifier``,
    a folder of ``gendistill train-classifier --out``); it takes the teacher's samples, so a
    latent teacher (whose samples are latents) is refused. A shipped domain classifier is
    allowed with a warning: the domain FID reads its features, and a GAN on the scoring
    network's features can game the score."""
    from ..eval.classifier import RECIPES, classifier_dir, load_classifier_from
    from ..pipelines.base import network_sample_shape

    if getattr(teacher_pipe, "vae", None) is not None:
        raise ConfigError(f"ctm.gan_classifier: {folder} would judge the latent teacher's "
                          f"latents, not images; use the teacher's features (unset it)")
    try:
        classifier = load_classifier_from(folder)
    except Exception as error:  # a missing, foreign or corrupt folder: the user's input
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"ctm.gan_classifier: {folder}: {first_line}") from None
    shape = tuple(classifier.config["input_shape"])
    expected = network_sample_shape(teacher_pipe.network)
    if shape != tuple(expected):
        raise ConfigError(f"ctm.gan_classifier: {folder} takes inputs of shape {shape}, the "
                          f"teacher's samples have shape {tuple(expected)}")
    if any(Path(folder).resolve() == classifier_dir(name).resolve() for name in RECIPES) \
            and is_first_process():
        log.warning("ctm.gan_classifier %s is a shipped domain classifier: the domain FID reads "
                    "its features, so that score no longer judges this student independently",
                    folder)
    return classifier


def hinge_discriminator_loss(real_logits, fake_logits) -> torch.Tensor:
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def dsm_loss(student, x0, cond=None, sigma_data: float = 0.5, guidance=None,
             sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """lambda(sigma) ||g(x_sigma, sigma, sigma, omega) - x_0||^2, sigma from the half-lognormal
    sampler over the teacher's range; a CFG-distilled student is fed the batch's sampled omega,
    as in SoundCTM."""
    sigma = sample_half_lognormal(x0.shape[0], device=x0.device, sigma_min=sigma_min,
                                  sigma_max=sigma_max)
    denoised = student(noised(x0, sigma), sigma, sigma, cond, guidance, return_denoised=True)
    return weighted_error(denoised, x0, sigma, sigma_data)


class CTMTraining:
    """Builds the student from the teacher and computes the CTM + DSM loss for the loop."""

    def __init__(self, cfg: Config, teacher_pipe, null_cond):
        from ..pipelines import CTMScheduler

        c = cfg.ctm  # values and ranges are checked by config.validate
        self.cfg, self.teacher_pipe, self.null_cond = cfg, teacher_pipe, null_cond
        teacher = teacher_pipe.denoiser()
        self.teacher = teacher.eval().requires_grad_(False)
        self.distill_guidance = c.guidance_max > 1.0
        if c.guidance_in_text:
            try:  # a user's config error, before anything is built
                guidance_text_width(teacher.net, self.distill_guidance)
            except ValueError as error:
                raise ConfigError(f"ctm.{error} (ctm.guidance_max {c.guidance_max}); set "
                                  f"ctm.guidance_in_text=false") from None
            if null_cond is None:
                raise ConfigError("ctm.guidance_in_text needs captions: the data has none")
        try:  # a wider student starts as the teacher's function with more units to learn with
            network = (teacher.net if c.student_width == 1
                       else widen_network(teacher.net, c.student_width))
        except ValueError as error:
            raise ConfigError(f"ctm.student_width={c.student_width}: {error}") from None
        self.model = CTMStudent.from_teacher(network, teacher.sigma_data, teacher.sigma_min,
                                             embed_guidance=self.distill_guidance,
                                             s_log_scale=c.s_log_scale,
                                             guidance_embed_scale=c.guidance_embed_scale,
                                             teacher_scheduler=teacher.scheduler_config,
                                             null_text=null_cond if c.guidance_in_text
                                             else None)
        self.sigma_max = teacher.sigma_max if c.sigma_max is None else c.sigma_max
        if not teacher.sigma_min < self.sigma_max <= teacher.sigma_max:
            raise ConfigError(f"ctm.sigma_max must be in ({teacher.sigma_min:g}, "
                              f"{teacher.sigma_max:g}], the teacher's range, got {c.sigma_max}")
        self.grid = karras_sigmas(c.num_grid, teacher.sigma_min, self.sigma_max)
        self.scheduler = CTMScheduler(sigma_min=teacher.sigma_min, sigma_max=self.sigma_max)
        embeddings = list(self.model.embedding_parameters())
        new = {id(p) for p in embeddings}
        self.optimizer = torch.optim.RAdam(
            [{"params": [p for p in self.model.parameters() if id(p) not in new]},
             {"params": embeddings, "lr": cfg.train.lr * c.embedding_lr_scale}],
            lr=cfg.train.lr)
        # theta-: the target network, its own EMA (the loop's EMA is what gets exported)
        self.target = EMA(self.model, c.target_ema, warmup=False)  # constant, as in CTM
        self.checkpointed = (self.target,)
        for term, weight, start in (("gan", c.gan_weight, c.gan_start),
                                    ("dm", c.dm_weight, c.dm_start)):
            # a short toy run of a config is allowed, but said
            if weight > 0 and start >= cfg.train.max_steps and is_first_process():
                log.warning("ctm.%s_start (%d) is not below train.max_steps (%d): this run "
                            "trains without the %s term", term, start, cfg.train.max_steps,
                            term.upper())
        self.gan_classifier = None
        if c.gan_weight > 0:
            self.gan_features, self.gan_sigma = teacher.features, c.gan_sigma
            if c.gan_classifier:
                self.gan_classifier = load_gan_classifier(c.gan_classifier, teacher_pipe)
                self.gan_features = lambda x, _sigma, _cond: self.gan_classifier.feature_maps(x)
                self.gan_sigma = 0.0 if c.gan_sigma is None else c.gan_sigma  # as it trained
            self.discriminator = self.build_discriminator(teacher)
            self.auxiliary = (self.discriminator,
                              torch.optim.Adam(self.discriminator.parameters(), lr=cfg.train.lr,
                                               betas=(0.0, 0.99)))
        if c.dm_weight > 0:
            # DMD's fake score starts as the teacher (a zero DM gradient) and learns the
            # student's 1-step samples
            fake_score = FakeScore(copy.deepcopy(teacher.net).requires_grad_(True), teacher,
                                   head=False)
            self.auxiliary = (fake_score, torch.optim.AdamW(
                fake_score.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay))
            self.dm_grid = karras_sigmas(DM_GRID_POINTS, teacher.sigma_min, teacher.sigma_max)
        self.generated = None  # the latest 1-step samples, for the auxiliary network's step

    def build_discriminator(self, teacher) -> FeatureDiscriminator:
        from ..pipelines.base import network_sample_shape

        x = torch.zeros(2, *network_sample_shape(teacher.net))
        cond = None if self.null_cond is None else self.null_cond.expand(2, *self.null_cond.shape)
        with torch.no_grad():
            return FeatureDiscriminator.for_features(self.gan_features(x, torch.ones(2), cond))

    def gan_active(self, step: int) -> bool:
        return self.cfg.ctm.gan_weight > 0 and step >= self.cfg.ctm.gan_start

    def dm_active(self, step: int) -> bool:
        return self.cfg.ctm.dm_weight > 0 and step >= self.cfg.ctm.dm_start

    @property
    def fake_score(self) -> FakeScore:
        return unwrap(self.auxiliary[0])

    def student_steps(self, step: int) -> bool:
        """False on the iterations where DMD2's two time-scale rule has the fake score step
        alone."""
        return not self.dm_active(step) or (step - self.cfg.ctm.dm_start) \
            % self.cfg.ctm.gen_update_ratio == 0

    def after_step(self, step: int):
        if self.student_steps(step):
            self.target.update(unwrap(self.model))

    def distance(self, estimate, target, sigma, cond):
        name = self.cfg.ctm.distance
        if name == "teacher_feature":
            return teacher_feature_distance(self.teacher, estimate, target, sigma, cond)
        if name == "l2":
            return l2_distance(estimate, target)
        return lpips_distance(estimate, target)

    def loss(self, batch, step):
        c = self.cfg.ctm
        from ..pipelines.base import network_sample_shape

        x0, cond = batch if len(batch) == 2 else (batch[0], None)
        device, n = x0.device, x0.shape[0]
        self.teacher.to(device)
        self.target.to(device)
        if self.gan_classifier is not None:
            self.gan_classifier.to(device)
        grid = self.grid.to(device)
        if cond is not None:
            cond = drop_conditions(cond, self.null_cond, self.cfg.train.cond_dropout)
        if not self.student_steps(step):  # the fake score learns fresh samples alone
            like = x0.new_empty(n, *network_sample_shape(self.teacher.net))  # no VAE call
            with torch.no_grad():
                self.generated, self.generated_cond = self.one_step_samples(like, cond), cond
            return None, {}
        x0 = self.teacher_pipe.encode(x0)  # a latent teacher's space
        guidance = None
        if self.distill_guidance:
            guidance = torch.empty(n, device=device).uniform_(c.guidance_min, c.guidance_max)

        times = sample_ctm_times(n, c.num_grid, c.max_jump, device=device,
                                 final_jump_prob=c.final_jump_prob,
                                 start_sampling=c.start_sampling)
        t, u, s = grid[times.i], grid[times.i + times.k], grid[times.j]
        x_t = x0 + append_dims(t, x0.ndim) * torch.randn_like(x0)
        target_net = self.target.model
        inner_net = target_net if c.target_inner == "ema" else self.model
        with torch.no_grad():
            x_u = teacher_solve(self.teacher, x_t, grid, times.i, times.k, cond,
                                1.0 if guidance is None else guidance)
            target = inner_net(x_u, u, s, cond, guidance)
        estimate = self.model(x_t, t, s, cond, guidance)
        level = s
        if c.match_point == "z0":
            level = torch.full_like(s, self.teacher.sigma_min)
            estimate = target_net(estimate, s, level, cond, guidance)  # grads through input only
            with torch.no_grad():
                target = target_net(target, s, level, cond, guidance)
        student = unwrap(self.model)
        loss_ctm = self.distance(estimate, target, level, cond)
        if c.output_weighting:
            loss_ctm = loss_ctm * student.output_weight(t)
        loss_ctm = loss_ctm.mean()
        logs = {"ctm": loss_ctm.detach()}
        loss = loss_ctm
        if c.denoising_weight > 0:
            t = self.teacher
            loss_dsm = dsm_loss(self.model, x0, cond, t.sigma_data, guidance, t.sigma_min,
                                self.sigma_max)
            weight = adaptive_weight(loss_ctm, loss_dsm, student.last_layer)
            logs.update(dsm=loss_dsm.detach(), dsm_weight=weight)
            loss = loss + c.denoising_weight * weight * loss_dsm
        if self.gan_active(step) or self.dm_active(step):
            # both terms act on the samples a user's 1-step call makes
            generated = self.one_step_samples(x0, cond)
            if self.gan_active(step):
                with frozen(self.discriminator):  # its gradient reaches the student only
                    loss_aux = -discriminator_logits(self.gan_features, self.discriminator,
                                                     generated, cond, self.gan_sigma).mean()
                name, aux_weight = "gan", c.gan_weight
            else:
                sigma = dm_sigmas(n, self.dm_grid).to(device)
                loss_aux, _ = distribution_matching_loss(generated, self.teacher,
                                                         self.fake_score, sigma, cond)
                name, aux_weight = "dm", c.dm_weight
            weight = adaptive_weight(loss_ctm, loss_aux, student.last_layer, max_weight=10.0,
                                     min_weight=0.01)
            logs.update({name: loss_aux.detach(), f"{name}_weight": weight})
            loss = loss + aux_weight * weight * loss_aux
            self.generated, self.generated_cond = generated.detach(), cond
        return loss, logs

    def one_step_samples(self, like: torch.Tensor, cond) -> torch.Tensor:
        """What the exported pipeline's 1-step call makes: G(sigma0 z, sigma0, sigma_min), sigma0
        where its scheduler starts a single jump (not sigma_max: the GAN should sharpen the jump
        that is sampled); at omega = 1, as the data the discriminator calls real (and the
        teacher the DM term matches) is unguided."""
        t, s = self.scheduler.grid_top(1), self.scheduler.config.sigma_min
        guidance = (torch.ones(like.shape[0], device=like.device) if self.distill_guidance
                    else None)
        return self.model(torch.randn_like(like) * t, t, s, cond, guidance)

    def auxiliary_loss(self, batch, step):
        """The discriminator's hinge loss (real data against the step's 1-step samples), or the
        fake score's denoising loss on those samples."""
        if self.generated is None:
            return None, {}
        if self.dm_active(step):
            sigma = dm_sigmas(self.generated.shape[0], self.dm_grid).to(self.generated.device)
            # through the loop's (data-parallel) wrapper: every rank's samples train it
            loss = denoising_loss(self.auxiliary[0], self.generated, sigma,
                                  self.generated_cond, sigma_data=self.teacher.sigma_data)
            return loss, {"fake_dsm": loss.detach()}
        discriminator = self.auxiliary[0]  # as the loop prepared it (DDP-wrapped on GPUs)
        sigma = self.gan_sigma
        real = discriminator_logits(self.gan_features, discriminator,
                                    self.teacher_pipe.encode(batch[0]), self.generated_cond,
                                    sigma)
        fake = discriminator_logits(self.gan_features, discriminator, self.generated,
                                    self.generated_cond, sigma)
        loss = hinge_discriminator_loss(real, fake)
        return loss, {"disc": loss.detach(), "d_real": real.mean().detach(),
                      "d_fake": fake.mean().detach()}

    def export(self, student: CTMStudent, folder: Path):
        from ..pipelines import CTMPipeline, CTMScheduler, SoundCTMPipeline
        from ..pipelines.base import teacher_components
        from ..pipelines.remote import save_with_remote_code

        scheduler = CTMScheduler.from_config(self.scheduler.config)
        components = teacher_components(self.teacher_pipe)
        text_to_sound = (components["vocoder"] is not None
                         and self.teacher_pipe.conditioning == "text")
        pipeline_class = SoundCTMPipeline if text_to_sound else CTMPipeline
        pipe = pipeline_class(unet=student, scheduler=scheduler,
                              text_encoder_name=self.teacher_pipe.config.text_encoder_name,
                              **components)
        save_with_remote_code(pipe, folder)
