"""Figures people look at: image grids, 2-D scatter plots, spectrograms. Files only (Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def image_grid(images: np.ndarray, rows: int, scale: int = 4) -> Image.Image:
    """(N, H, W, C) in [0, 1], N = rows * cols -> one PIL image, row-major, nearest upscaling."""
    n, h, w, c = images.shape
    cols = int(np.ceil(n / rows))
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = images[i]
    arr = (grid * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_scatter(path: Path, points: np.ndarray, labels=None, class_names=None,
                 title: str = "", reference: np.ndarray | None = None, ref_labels=None):
    """2-D samples coloured by class; with ``reference``, the true samples side by side."""
    panels = [("samples", points, labels)]
    if reference is not None:
        panels.insert(0, ("true distribution", reference, ref_labels))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, pts, lab) in zip(axes[0], panels):
        colours = None if lab is None else np.asarray(lab)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=colours, cmap="tab10", vmin=0, vmax=9, alpha=0.6)
        ax.set_title(name)
        ax.set_xlim(-2, 2)
        ax.set_ylim(-2, 2)
        ax.set_aspect("equal")
    if class_names is not None and labels is not None:
        handles = [plt.Line2D([], [], marker="o", ls="", color=plt.cm.tab10(i), label=n)
                   for i, n in enumerate(class_names)]
        axes[0][-1].legend(handles=handles, loc="lower right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_spectrograms(path: Path, features, titles: list[str]):
    """(N, 1, mels, frames) normalised log-mels as a row of images titled ``titles``, or a
    sheet of such rows, ``{row name: (N, 1, mels, frames)}`` (the same N conditions in each
    column, e.g. teacher and student on the same prompts)."""
    rows = features if isinstance(features, dict) else {"": features}
    n = len(titles)
    fig, axes = plt.subplots(len(rows), n, figsize=(2.2 * n, 2.4 * len(rows) + 0.2),
                             squeeze=False)
    for r, (name, feats) in enumerate(rows.items()):
        for c, (feat, title) in enumerate(zip(feats, titles)):
            ax = axes[r][c]
            ax.imshow(feat[0], origin="lower", aspect="auto", cmap="magma", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if c == 0 and name:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
