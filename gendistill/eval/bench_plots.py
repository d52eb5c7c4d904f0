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
    from ..data import load_dataset

    test = load_dataset(preset.dataset, "test")
    kind = test.kind
    names = list(samples)
    per_condition = 400 if kind == "vector" else 8
    outputs = {name: row_samples(pipe, call, test, per_condition)
               for name, (pipe, call) in samples.items()}
    if kind == "vector":
        fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.4))
        labels = torch.tensor(outputs[names[0]].conditions)
        truth = test.sample_true(labels, torch.Generator().manual_seed(0)).numpy()
        panels = [("true distribution", truth)] + [(n, outputs[n].latents.numpy()) for n in names]
        for ax, (title, pts) in zip(axes, panels):
            ax.scatter(pts[:, 0], pts[:, 1], s=1, c=labels.numpy(), cmap="tab10", vmin=0, vmax=9)
            ax.set_title(title, fontsize=9)
            ax.set_xlim(-2, 2)
            ax.set_ylim(-2, 2)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(out / "samples.png", dpi=100)
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
        fig.savefig(out / "samples.png", dpi=110)
        plt.close(fig)
    else:
        for name in names:
            result = outputs[name]
            save_spectrograms(out / f"spectrograms_{name.replace('/', '_')}.png",
                              result.latents.float().numpy(), [str(c)[:28] for c in
                                                               result.conditions])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in rows:
        ax.scatter(r["nfe"], r["score"], s=25)
        ax.annotate(f"{r['model']} {r['method']}", (r["nfe"], r["score"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(rows[0]["score_name"])
    ax.set_title(f"{preset.dataset}: score vs NFE")
    fig.tight_layout()
    fig.savefig(out / "score_vs_nfe.png", dpi=110)
    plt.close(fig)
