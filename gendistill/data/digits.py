"""digits: scikit-learn's bundled 8x8 handwritten digits, scaled to [-1, 1], fixed split."""
from __future__ import annotations

import numpy as np
import torch

from .base import Dataset

TEST_FRACTION = 0.2


def load_digits(split: str = "train") -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = bunch.images.astype(np.float32) / 8.0 - 1.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=TEST_FRACTION, random_state=0, stratify=bunch.target)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return Dataset("digits", "image", torch.from_numpy(x).unsqueeze(1),
                   y=torch.from_numpy(y).long(), class_names=[str(i) for i in range(10)])
