"""FAD: the Fréchet distance between embeddings of real and generated audio.

Embeddings:

- ``domain`` (offline default for synthsounds): the penultimate features of the synthsounds
  domain classifier on normalised log-mels (model space, no vocoder), reported as "domain FAD".
- ``vggish``: a VGGish network (the architecture of Hershey et al. 2017, 128-d embedding of each
  0.96 s example of 16 kHz audio) with weights the user supplies: a state_dict (``.pt`` /
  ``.pth`` / ``.safetensors``) with the key layout of the common PyTorch ports
  (``features.N.*`` / ``embeddings.N.*``, or torchaudio's ``features_network`` /
  ``embedding_network``). torchaudio 2.11 no longer ships VGGish, so the module is defined here.
  The front end follows VGGish's: 25 ms periodic-Hann frames, 10 ms hop, 512-point FFT
  magnitudes, 64 HTK-mel bands over 125–7500 Hz, ``log(mel + 0.01)``, 96-frame examples. The
  PCA/quantisation post-processing is not applied (FAD uses the raw embedding).
- ``clap``: a transformers CLAP checkpoint folder (``ClapModel`` or
  ``ClapAudioModelWithProjection``, plus its ``ClapFeatureExtractor`` config if present),
  audio resampled to the extractor's rate; the L2-normalised projected audio embedding.

All Fréchet distances go through ``gendistill.eval.frechet.frechet_distance``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .classifier import DomainClassifier, load_classifier
from .frechet import frechet_distance_of_features

DOMAIN_FAD = "domain FAD"
VGGISH_RATE = 16000


class AudioEmbedding:
    """Base: ``__call__(x, sample_rate)`` -> (M, D) float64 embeddings. ``input`` says what x is:
    ``"mel"`` (model-space log-mels (N, 1, n_mels, frames)) or ``"wave"`` ((N, T) waveforms)."""

    name = "embedding"
    input = "wave"
    batch_size = 32

    def embed_batch(self, x: torch.Tensor, sample_rate: int | None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, x, sample_rate: int | None = None, progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm

        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float().cpu()
        if self.input == "wave" and x.ndim == 1:
            x = x.unsqueeze(0)
        if self.input == "wave" and x.ndim != 2:
            raise ValueError(f"{self.name} embeds waveforms (N, T), got shape {tuple(x.shape)}")
        if self.input == "mel" and x.ndim != 4:
            raise ValueError(f"{self.name} embeds log-mels (N, 1, mels, frames), got shape "
                             f"{tuple(x.shape)}")
        starts = range(0, len(x), self.batch_size)
        out = [self.embed_batch(x[i:i + self.batch_size], sample_rate).double().cpu()
               for i in tqdm(starts, desc=f"{self.name} embeddings", disable=not progress)]
        return torch.cat(out)


class DomainEmbedding(AudioEmbedding):
    """The synthsounds classifier's penultimate features on normalised log-mels."""

    name = "domain"
    input = "mel"
    batch_size = 512

    def __init__(self, classifier: str | DomainClassifier = "synthsounds"):
        self.classifier = load_classifier(classifier) if isinstance(classifier, str) \
            else classifier.eval()
        self.shape = tuple(self.classifier.config.get("input_shape", ()))

    def embed_batch(self, x, sample_rate=None):
        if self.shape and tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"log-mels have shape {tuple(x.shape[1:])}, the domain classifier "
                             f"expects {self.shape}")
        return self.classifier.features(x)


# ---------------------------------------------------------------- VGGish

def _hz_to_mel(hz):
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def vggish_mel_matrix(num_mel_bins: int = 64, num_spectrogram_bins: int = 257,
                      sample_rate: int = VGGISH_RATE, lower_hz: float = 125.0,
                      upper_hz: float = 7500.0) -> torch.Tensor:
    """(spectrogram bins, mel bins) triangular HTK-mel weights, triangles in mel space, DC
    bin excluded (VGGish's construction)."""
    bins_mel = _hz_to_mel(np.linspace(0.0, sample_rate / 2, num_spectrogram_bins))
    edges = np.linspace(_hz_to_mel(lower_hz), _hz_to_mel(upper_hz), num_mel_bins + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (centre - lower)
    falling = (upper - bins_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return torch.from_numpy(weights).float()


class VGGishFrontend(nn.Module):
    """16 kHz waveforms (N, T) -> log-mel examples (N, E, 96, 64) and each example's clip."""

    def __init__(self, window: int = 400, hop: int = 160, n_fft: int = 512, n_mels: int = 64,
                 example_frames: int = 96):
        super().__init__()
        self.window, self.hop, self.n_fft, self.example_frames = window, hop, n_fft, example_frames
        self.register_buffer("hann", torch.hann_window(window, periodic=True), persistent=False)
        self.register_buffer("mel", vggish_mel_matrix(n_mels, n_fft // 2 + 1), persistent=False)

    @property
    def min_samples(self) -> int:
        return self.window + (self.example_frames - 1) * self.hop

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.shape[-1] < self.min_samples:
            wave = nn.functional.pad(wave, (0, self.min_samples - wave.shape[-1]))
        frames = wave.unfold(-1, self.window, self.hop) * self.hann  # (N, F, 400)
        magnitude = torch.fft.rfft(frames, n=self.n_fft).abs()
        log_mel = torch.log(magnitude @ self.mel + 0.01)  # (N, F, 64)
        n_ex = log_mel.shape[1] // self.example_frames
        return log_mel[:, :n_ex * self.example_frames].reshape(
            wave.shape[0], n_ex, self.example_frames, log_mel.shape[-1])


class VGGish(nn.Module):
    """The VGGish network: (B, 1, 96, 64) log-mel examples -> (B, 128) embeddings."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 1
        for widths in ([64], [128], [256, 256], [512, 512]):
            for c in widths:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 4096),
            nn.ReLU(inplace=True), nn.Linear(4096, 128), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # channels last, as in the TF model
        return self.embeddings(x)


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_vggish(weights_path: str | Path) -> VGGish:
    """VGGish with the user's weights (see the module docstring for the accepted layouts)."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"VGGish weights file not found: {path}")
    state = _load_state_dict(path)
    renamed = {}
    for key, value in state.items():
        key = key.replace("features_network.", "features.").replace("embedding_network.",
                                                                    "embeddings.")
        if key.startswith(("features.", "embeddings.")):
            renamed[key] = value
    model = VGGish()
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not VGGish weights (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return model.eval().requires_grad_(False)


def _resample(wave: torch.Tensor, rate: int | None, target: int) -> torch.Tensor:
    if rate is None:
        raise ValueError("embedding waveforms needs their sample_rate")
    if rate == target:
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, int(rate), int(target))


class VGGishEmbedding(AudioEmbedding):
    """One 128-d VGGish embedding per 0.96 s example of each clip."""

    name = "vggish"
    input = "wave"

    def __init__(self, weights_path: str | Path):
        self.model = load_vggish(weights_path)
        self.frontend = VGGishFrontend()

    def embed_batch(self, x, sample_rate):
        examples = self.frontend(_resample(x, sample_rate, VGGISH_RATE))  # (N, E, 96, 64)
        return self.model(examples.reshape(-1, 1, *examples.shape[-2:]))


# ---------------------------------------------------------------- CLAP

class ClapEmbedding(AudioEmbedding):
    """L2-normalised projected CLAP audio embeddings from a transformers checkpoint folder."""

    name = "clap"
    input = "wave"
    batch_size = 16

    def __init__(self, model_dir: str | Path):
        from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor, ClapModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        folder = Path(model_dir)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no CLAP checkpoint folder (config.json) at {folder}")
        model_type = json.loads(cfg_path.read_text()).get("model_type")
        if model_type == "clap":
            self.model, self.full = ClapModel.from_pretrained(folder), True
        elif model_type == "clap_audio_model":
            self.model, self.full = ClapAudioModelWithProjection.from_pretrained(folder), False
        else:
            raise ValueError(f"{cfg_path}: model_type {model_type!r} is not a CLAP model "
                             "(clap or clap_audio_model)")
        self.model.eval().requires_grad_(False)
        audio_cfg = getattr(self.model.config, "audio_config", self.model.config)
        self._fusion = bool(getattr(audio_cfg, "enable_fusion", False))
        has_fe = (folder / "preprocessor_config.json").is_file()
        self.feature_extractor = ClapFeatureExtractor.from_pretrained(folder) if has_fe \
            else ClapFeatureExtractor()

    def embed_batch(self, x, sample_rate):
        rate = self.feature_extractor.sampling_rate
        waves = _resample(x, sample_rate, rate)
        # Unfused checkpoints take one mel channel; "fusion" would stack four.
        truncation = "fusion" if self._fusion else "rand_trunc"
        inputs = self.feature_extractor([w.numpy() for w in waves], sampling_rate=rate,
                                        truncation=truncation, return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if k in ("input_features", "is_longer")}
        if self.full:
            out = self.model.get_audio_features(**inputs)
            emb = out if torch.is_tensor(out) else out.pooler_output
        else:
            emb = self.model(**inputs).audio_embeds
        return nn.functional.normalize(emb, dim=-1)


def load_audio_embedding(name: str, path: str | Path | None = None) -> AudioEmbedding:
    """``domain`` (no path: the shipped synthsounds classifier), ``vggish`` (weights file) or
    ``clap`` (checkpoint folder)."""
    if name == "domain":
        return DomainEmbedding(path if path is not None else "synthsounds")
    if name in ("vggish", "clap"):
        if path is None:
            raise ValueError(f"the {name} embedding needs a checkpoint path; nothing is "
                             "downloaded")
        return VGGishEmbedding(path) if name == "vggish" else ClapEmbedding(path)
    raise ValueError(f"unknown audio embedding {name!r}; choose domain, vggish or clap")


def fad_from_embeddings(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FAD between two sets of (N, D) embeddings."""
    return frechet_distance_of_features(real, fake)


def fad(real, fake, embedding: AudioEmbedding, sample_rate: int | None = None,
        progress: bool = False) -> float:
    """FAD between real and generated audio (log-mels or waveforms, as the embedding takes)."""
    return fad_from_embeddings(embedding(real, sample_rate, progress),
                               embedding(fake, sample_rate, progress))


def domain_fad(real_mels: torch.Tensor, fake_mels: torch.Tensor,
               classifier: str | DomainClassifier = "synthsounds") -> float:
    """Domain FAD between real and generated normalised log-mels (model space)."""
    return fad(real_mels, fake_mels, DomainEmbedding(classifier))


__all__ = ["AudioEmbedding", "ClapEmbedding", "DOMAIN_FAD", "DomainEmbedding", "VGGish",
           "VGGishEmbedding", "VGGishFrontend", "domain_fad", "fad", "fad_from_embeddings",
           "load_audio_embedding", "load_vggish", "vggish_mel_matrix"]
