"""Training-free control of a SoundCTM student: a differentiable loss on the output steers it,
with no retraining (SoundCTM showed this; no public code exists).

Two controls, each a loss on the student's log-mel output:
- ``LoudnessControl``: follow a target RMS envelope (one value per STFT frame), compared in dB;
- ``SpectralMaskControl``: keep the energy inside (or out of) a region of the mel spectrogram.

Two ways to reach them (``method``):
- ``"noise"`` (DITTO-like): optimise the initial noise through the 1-step student, keeping it on
  the Gaussian shell, then sample from the optimised noise;
- ``"guided"``: loss-guided gamma-sampling: after each jump but the last, the student's clean
  estimate g takes gradient steps on the loss and the jump's output moves with it by
  (1 - s/t) (G = (s/t) x + (1 - s/t) g); the next jump brings the edit back to the data. No
  extra network calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("noise", "guided")


def control_unsupported(pipe) -> str | None:
    """Why training-free control cannot steer this pipeline's samples, or None: its losses
    read gendistill's mel spectrograms, which a pipeline without a vocoder, or a latent
    pipeline (VAE latents), does not make."""
    if getattr(pipe, "vocoder", None) is None:
        return "control works on audio: this pipeline has no vocoder"
    if getattr(pipe, "vae", None) is not None:
        return "control reads mel spectrograms: a latent pipeline's samples are VAE latents"
    return None


@dataclass(kw_only=True)
class Control:
    """``steps`` gradient steps of Adam at rate ``lr``: on the initial noise (``noise``) or on
    each intermediate clean estimate (``guided``)."""

    method: str = "noise"
    steps: int = 20
    lr: float = 0.1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"control method must be one of {', '.join(METHODS)}, got "
                             f"{self.method!r}")
        if self.steps < 1 or not self.lr > 0:
            raise ValueError(f"control needs steps >= 1 and lr > 0, got {self.steps}, {self.lr}")

    def loss(self, features: torch.Tensor, vocoder) -> torch.Tensor:
        """(B,) control loss of normalised log-mels (B, 1, n_mels, frames)."""
        raise NotImplementedError

    def error(self, waves: torch.Tensor, vocoder) -> dict:
        """How far vocoded waveforms (B, T) are from the control, measured on the audio."""
        raise NotImplementedError


def to_db(rms: torch.Tensor, floor_db: float = -60.0) -> torch.Tensor:
    return 20 * torch.log10(rms.clamp_min(10 ** (floor_db / 20)))


@dataclass(kw_only=True)
class LoudnessControl(Control):
    """Follow ``target``: RMS per frame (linear amplitude, as ``MelVocoder.loudness`` measures
    it), shape (frames,) for every sample or (B, frames); another length is resampled
    linearly to the output's frames."""

    target: torch.Tensor
    floor_db: float = -60.0

    def __post_init__(self):
        super().__post_init__()
        self.target = torch.as_tensor(self.target, dtype=torch.float)
        if self.target.ndim not in (1, 2) or self.target.shape[-1] < 2:
            raise ValueError(f"a loudness target is (frames,) or (batch, frames) RMS values, got "
                             f"shape {tuple(self.target.shape)}")
        if not torch.isfinite(self.target).all() or (self.target < 0).any():
            raise ValueError("a loudness target holds finite RMS values >= 0")

    def target_db(self, frames: int, batch: int, device) -> torch.Tensor:
        target = self.target.to(device)
        if target.shape[-1] != frames:
            target = torch.nn.functional.interpolate(target.reshape(-1, 1, target.shape[-1]),
                                                     size=frames, mode="linear",
                                                     align_corners=True).reshape(-1, frames)
        return to_db(target.reshape(-1, frames).expand(batch, frames), self.floor_db)

    def envelope_db(self, features, vocoder) -> torch.Tensor:
        return to_db(vocoder.frame_rms(vocoder.linear_magnitude(features)), self.floor_db)

    def loss(self, features, vocoder):
        db = self.envelope_db(features, vocoder)
        return ((db - self.target_db(db.shape[-1], db.shape[0], db.device)) ** 2).mean(-1)

    def error(self, waves, vocoder):
        """Mean absolute dB error of the frames' RMS, and the correlation of the dB curves,
        averaged over samples."""
        db = to_db(vocoder.loudness(waves), self.floor_db)
        target = self.target_db(db.shape[-1], db.shape[0], db.device)
        a, b = db - db.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True)
        corr = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-8)
        return {"envelope_db_error": float((db - target).abs().mean()),
                "envelope_corr": float(corr.mean())}


@dataclass(kw_only=True)
class SpectralMaskControl(Control):
    """``mask`` (n_mels, frames) in [0, 1] marks a region of the mel spectrogram; ``keep``
    "inside" puts the energy there, "outside" keeps it out. The loss is the share of mel
    energy in the wrong place."""

    mask: torch.Tensor
    keep: str = "inside"

    def __post_init__(self):
        super().__post_init__()
        self.mask = torch.as_tensor(self.mask, dtype=torch.float)
        if self.mask.ndim != 2:
            raise ValueError(f"a spectral mask is (n_mels, frames), got shape "
                             f"{tuple(self.mask.shape)}")
        if self.keep not in ("inside", "outside"):
            raise ValueError(f"keep must be 'inside' or 'outside', got {self.keep!r}")
        if (self.mask < 0).any() or (self.mask > 1).any():
            raise ValueError("a spectral mask holds values in [0, 1]")

    def wrong_place(self, mel: torch.Tensor) -> torch.Tensor:
        if tuple(mel.shape[-2:]) != tuple(self.mask.shape):
            raise ValueError(f"the spectral mask is {tuple(self.mask.shape)}, the output's mel "
                             f"spectrogram {tuple(mel.shape[-2:])}")
        mask = self.mask.to(mel.device)
        outside = 1 - mask if self.keep == "inside" else mask
        energy = mel ** 2
        return (outside * energy).flatten(1).sum(1) / energy.flatten(1).sum(1).clamp_min(1e-12)

    def loss(self, features, vocoder):
        return self.wrong_place(vocoder.mel(features))

    def error(self, waves, vocoder):
        """The share of the vocoded audio's mel energy in the wrong place, and its level (RMS
        in dB), means over samples: a share near 0 can also come from a clip silenced as a
        whole, which the level shows."""
        waves = waves.float()
        mel = vocoder.mel_spectrogram(waves)
        return {"energy_outside": float(self.wrong_place(mel).mean()),
                "level_db": float(to_db(waves.pow(2).mean(-1).sqrt()).mean())}


def band_mask(n_mels: int, frames: int, low: int, high: int) -> torch.Tensor:
    """A spectral mask marking mel bins ``low:high`` in every frame."""
    if not 0 <= low < high <= n_mels:
        raise ValueError(f"mel bins {low}:{high} are outside 0:{n_mels}")
    mask = torch.zeros(n_mels, frames)
    mask[low:high] = 1
    return mask


def descend(x: torch.Tensor, loss, lr: float, steps: int, project=None) -> torch.Tensor:
    """``steps`` Adam steps on a copy of x for ``loss(x).sum()``; ``project`` (in place) after
    each. Only x gets gradients: a network inside ``loss`` keeps its weights' untouched."""
    x = x.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            x.grad, = torch.autograd.grad(loss(x).sum(), x)
            optimizer.step()
            if project is not None:
                with torch.no_grad():
                    project(x)
    return x.detach()


def optimise_noise(generate, noise: torch.Tensor, control: Control, vocoder) -> torch.Tensor:
    """DITTO-like: Adam on the initial noise through ``generate`` (the 1-step student), each
    sample's noise renormalised to its starting norm after every step."""
    norm = noise.flatten(1).norm(dim=1)
    shape = (-1, *[1] * (noise.ndim - 1))
    return descend(noise, lambda z: control.loss(generate(z), vocoder),
                   control.lr * float(norm.mean()) / norm[0].numel() ** 0.5, control.steps,
                   project=lambda z: z.mul_((norm / z.flatten(1).norm(dim=1)).view(shape)))


def guide(estimate: torch.Tensor, control: Control, vocoder) -> torch.Tensor:
    """Adam steps on a clean estimate (in sample space, no network calls)."""
    return descend(estimate, lambda x: control.loss(x, vocoder), control.lr, control.steps)
