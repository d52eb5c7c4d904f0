"""Log-mel features and the Griffin-Lim vocoder, as a diffusers component.

Audio models work on normalised log-mel spectrograms shaped like 1-channel images; the
``MelVocoder`` saved with each audio pipeline turns waveforms into that space and back.
"""
from __future__ import annotations

import torch
import torchaudio
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config


class MelVocoder(ModelMixin, ConfigMixin):
    """waveform <-> normalised log-mel in [-1, 1]; inversion by least squares + Griffin-Lim.

    The default 15,872 samples at 16 kHz (~1 s) give 32 frames, a size UNets halve cleanly.
    """

    @register_to_config
    def __init__(self, sample_rate: int = 16000, n_fft: int = 1024, hop_length: int = 512,
                 n_mels: int = 32, num_samples: int = 15872, log_min: float = -9.0,
                 log_max: float = 5.5, griffin_lim_iters: int = 64):
        super().__init__()
        self.mel_spectrogram = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, power=1.0)
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_fft // 2 + 1, n_mels=n_mels, sample_rate=sample_rate)
        self.griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=n_fft, hop_length=hop_length, power=1.0, n_iter=griffin_lim_iters)

    @property
    def num_frames(self) -> int:
        return self.config.num_samples // self.config.hop_length + 1

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T) waveforms -> (B, 1, n_mels, frames) normalised log-mel."""
        mel = self.mel_spectrogram(wave.float())
        log_mel = mel.clamp_min(1e-5).log().clamp(self.config.log_min, self.config.log_max)
        scaled = 2 * (log_mel - self.config.log_min) / (self.config.log_max - self.config.log_min)
        return (scaled - 1).unsqueeze(1)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, frames) normalised log-mel -> (B, T) waveforms."""
        cfg = self.config
        log_mel = (features.squeeze(1).float().clamp(-1, 1) + 1) / 2 * (cfg.log_max - cfg.log_min)
        mel = (log_mel + cfg.log_min).exp()
        wave = self.griffin_lim(self.inverse_mel(mel.cpu()).clamp_min(0))
        return wave[..., :cfg.num_samples]
