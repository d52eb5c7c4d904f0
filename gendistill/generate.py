"""Sampling a saved model folder into files: PNG grids, WAVs, scatter plots or .npz arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .pipelines.base import null_class
from .plots import image_grid, save_scatter, save_spectrograms


def sample(pipe, class_labels=None, prompts=None, num_per_condition: int = 8, seed: int = 0,
           **call_kwargs):
    """Run a pipeline for every condition given (all classes of a class-conditional pipeline
    when none is given); returns its SamplesOutput with raw latents and the conditions."""
    if pipe.conditioning == "class" and class_labels is None:
        class_labels = list(range(null_class(pipe.network)))
    if pipe.conditioning == "text" and prompts is None:
        raise ValueError("this model is text-conditional: give --prompt TEXT")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # an unconditional model has one "condition": num_per_condition samples in one batch
    batch, per = (num_per_condition, 1) if pipe.conditioning == "none" else (1, num_per_condition)
    return pipe(class_labels=class_labels, prompt=prompts, batch_size=batch,
                num_per_condition=per, generator=generator, output_type="latent", **call_kwargs)


def write_samples(pipe, output, out: str | Path, rows: int) -> list[Path]:
    """Write samples where ``out`` says: .npz arrays, .wav audio, or a .png figure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = output.latents.float().cpu()
    conds = output.conditions
    written = [out]
    if out.suffix == ".npz":
        extra = {}
        if conds and isinstance(conds[0], int):
            extra["y"] = np.array(conds, dtype=np.int64)
        elif conds and isinstance(conds[0], str):
            extra["captions"] = np.array(conds)
        np.savez(out, x=x.numpy(), **extra)
    elif getattr(pipe, "vocoder", None) is not None:
        if out.suffix not in (".wav", ".png"):
            raise ValueError(f"audio goes to .wav (or .png spectrograms, .npz arrays), got {out}")
        waves = pipe.vocoder(x).numpy()
        rate = pipe.vocoder.config.sample_rate
        stem = out.with_suffix("")
        wavs = [out.with_suffix(".wav")] if len(waves) == 1 else \
            [stem.with_name(f"{stem.name}-{i:03d}.wav") for i in range(len(waves))]
        for path, wave in zip(wavs, waves):
            sf.write(path, wave / max(1.0, np.abs(wave).max()), rate)
        png = out.with_suffix(".png")
        save_spectrograms(png, x.numpy(), [str(c)[:28] for c in conds])
        written = wavs + [png]
    elif x.ndim == 2:
        if out.suffix != ".png":
            raise ValueError(f"2-D samples go to a .png scatter plot or .npz, got {out}")
        labels = np.array(conds) if conds and conds[0] is not None else None
        save_scatter(out, x.numpy(), labels, title=type(pipe).__name__)
    else:
        if out.suffix != ".png":
            raise ValueError(f"images go to a .png grid or .npz, got {out}")
        images = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        image_grid(images, rows=rows).save(out)
    return written
