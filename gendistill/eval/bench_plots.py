"""Figures written next to the benchmark results: samples of every row and score vs NFE."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..generate import sample
from ..plots import image_grid, plt, save_spectrograms


def row_samples(pipe, call: dict, dataset, per_condition: int):
    """Model-space samples for a fixed set of conditions (same seed for every row)."""
    if dataset.captions is not None:
        prompts = sorted(set(dataset.captions))[::max(1, len(set(dataset.captions)) // 6)][:6]
        return sample(pipe, None, prompts, 1, 0, **call)
    labels = list(range(dataset.num_classes))
    return sample(pipe, labels, None, per_condition, 0, **call)


def plot_bench(preset, samples: dict, rows: list[dict], out: Path):
    outputs = plot_samples(preset.dataset, samples, out / "samples.png")
    plot_score_vs_nfe(preset.dataset, rows, out / "score_vs_nfe.png")
    teacher = next(name for name in outputs if name.startswith("teacher/heun"))
    for name, output in outputs.items():
        if output.students is not None and max(output.students) > 0:
            plot_students(preset.dataset, outputs[teacher], output, name,
                          out / f"students_{name.split('/')[0]}.png")


def scatter_panel(ax, pts, colour: int, title: str | None):
    """One class's 2-D points on the fixed [-1.8, 1.8]^2 square every panel shares."""
    ax.scatter(pts[:, 0], pts[:, 1], s=0.5, color=plt.cm.tab10(colour))
    ax.set_xlim(-1.8, 1.8)
    ax.set_ylim(-1.8, 1.8)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=8)


def plot_students(dataset_name: str, teacher, msd, name: str, path: Path):
    """Each class's teacher samples beside the MSD samples, the row named by the student that
    made them (2-D points and images)."""
    from ..data import load_dataset

    test = load_dataset(dataset_name, "test")
    if test.kind == "audio":  # the spectrogram sheets name each clip's student instead
        return
    labels = torch.tensor(msd.conditions)
    student_of = dict(zip(msd.conditions, msd.students))
    classes = test.class_names or [str(c) for c in range(test.num_classes)]
    if test.kind == "vector":
        fig, axes = plt.subplots(len(classes), 2, squeeze=False,
                                 figsize=(4.0, 2.0 * len(classes)))
        for c, class_name in enumerate(classes):
            mask = (labels == c).numpy()
            for k, (title, output) in enumerate([("teacher (Heun)", teacher), (name, msd)]):
                scatter_panel(axes[c][k], output.latents.numpy()[mask], student_of[c],
                              title if c == 0 else None)
            axes[c][0].set_ylabel(f"{class_name}\nstudent {student_of[c]}", fontsize=8)
    elif test.kind == "image":
        fig, axes = plt.subplots(len(classes), 2, squeeze=False,
                                 figsize=(5.0, 0.75 * len(classes) + 0.6))
        for c, class_name in enumerate(classes):
            mask = (labels == c).numpy()
            for k, (title, output) in enumerate([("teacher (Heun)", teacher), (name, msd)]):
                x = output.latents.float()[mask]
                images = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
                ax = axes[c][k]
                ax.imshow(np.asarray(image_grid(images, rows=1, scale=1)), cmap="gray",
                          vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_title(title, fontsize=9)
            axes[c][0].set_ylabel(f"{class_name}: student {student_of[c]}", fontsize=7,
                                  rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(dataset_name: str, samples: dict, path: Path):
    """Samples of every ``name: (pipe, call)`` side by side, the same conditions and seed for
    each: 2-D points one class per row beside the true distribution, images as class-by-row
    grids, audio as spectrograms (one file per model, ``spectrograms_<name>.png``). Returns
    each name's pipeline output."""
    from ..data import load_dataset

    out = path.parent
    test = load_dataset(dataset_name, "test")
    kind = test.kind
    names = list(samples)
    per_condition = 400 if kind == "vector" else 8
    outputs = {name: row_samples(pipe, call, test, per_condition)
               for name, (pipe, call) in samples.items()}
    if kind == "vector":  # one row per class, so that every class's shape can be read
        labels = torch.tensor(outputs[names[0]].conditions)
        truth = test.sample_true(labels, torch.Generator().manual_seed(0)).numpy()
        panels = [("true distribution", truth)] + [(n, outputs[n].latents.numpy()) for n in names]
        classes = test.class_names
        fig, axes = plt.subplots(len(classes), len(panels), squeeze=False,
                                 figsize=(2.0 * len(panels), 2.0 * len(classes)))
        for c, class_name in enumerate(classes):
            mask = (labels == c).numpy()
            for k, (title, pts) in enumerate(panels):
                scatter_panel(axes[c][k], pts[mask], c, title if c == 0 else None)
                if k == 0:
                    axes[c][k].set_ylabel(class_name, fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    elif kind == "image":
        fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.6))
        for ax, name in zip(np.atleast_1d(axes), names):
            x = outputs[name].latents.float()
            images = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            ax.imshow(np.asarray(image_grid(images, rows=test.num_classes, scale=1)),
                      cmap="gray", vmin=0, vmax=255)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    else:
        for name in names:
            result = outputs[name]
            stem = name.replace('/', '_')
            titles = [str(c)[:28] for c in result.conditions]
            if result.students is not None:  # which MSD student made each clip
                titles = [f"{t[:22]} · s{k}" for t, k in zip(titles, result.students)]
            save_spectrograms(out / f"spectrograms_{stem}.png",
                              result.latents.float().numpy(), titles)
            vocoder = samples[name][0].vocoder
            write_wavs(out / "wav" / stem, vocoder(result.latents[:WAVS_PER_ROW].float()),
                       vocoder.config.sample_rate, result.conditions[:WAVS_PER_ROW])
    return outputs


WAVS_PER_ROW = 3


def write_wavs(folder: Path, waves, sample_rate: int, captions: list[str]):
    """One WAV per waveform, named by its index and caption."""
    import re

    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for i, (wave, caption) in enumerate(zip(waves.numpy(), captions)):
        slug = re.sub(r"[^a-z0-9]+", "-", str(caption).lower()).strip("-")[:48]
        sf.write(folder / f"{i}-{slug}.wav", wave / max(1.0, abs(wave).max()), sample_rate)


def plot_score_vs_nfe(dataset_name: str, rows: list[dict], path: Path):
    """Every row's score against its network calls, one legend entry per row (labels beside the
    points overlapped where rows crowd at 1 and 2 NFE); squares are teacher rows, bars the
    row's spread over seeds. Log scales where the scores allow (a 1-step Euler row is 20x the
    rest)."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(rows):
        spread = r.get("score_std_seed") or r.get("score_std_eval")
        marker = "s" if r["model"].startswith("teacher") else "o"
        ax.errorbar(r["nfe"], r["score"], yerr=spread, fmt=marker, ms=5, capsize=2,
                    color=colors[i % len(colors)], label=f"{r['model']} {r['method']}")
    ax.set_xscale("log")
    if all(r["score"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(rows[0]["score_name"])
    ax.set_title(f"{dataset_name}: score vs NFE")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
