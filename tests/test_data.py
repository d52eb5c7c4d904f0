import numpy as np
import pytest
import torch

from gendistill.data import DataError, load_dataset, sample_toy2d
from gendistill.data.synthsounds import FAMILIES, family_of, generate_synthsounds


def test_digits_split_and_range():
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert train.x.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert train.x.min() == -1 and train.x.max() == 1
    assert train.num_classes == 10 and set(test.y.tolist()) == set(range(10))


def test_toy2d_labels_and_exact_sampler():
    ds = load_dataset("toy2d")
    assert ds.shape == (2,) and ds.num_classes == 4
    ring = sample_toy2d(torch.zeros(5000, dtype=torch.long), torch.Generator().manual_seed(1))
    radius = ring.norm(dim=1)
    assert radius.mean().item() == pytest.approx(1.0, abs=0.02)
    # fresh samples differ from the training set but share its statistics
    fresh = ds.sample_true(ds.y, torch.Generator().manual_seed(5))
    assert not torch.equal(fresh, ds.x)
    torch.testing.assert_close(fresh.std(0), ds.x.std(0), atol=0.03, rtol=0)


def test_synthsounds_deterministic_and_captioned():
    w1, c1, f1 = generate_synthsounds(1, seed=3)
    w2, c2, f2 = generate_synthsounds(1, seed=3)
    assert np.array_equal(w1, w2) and c1 == c2
    assert len(set(f1.tolist())) == len(FAMILIES) >= 8
    assert all(family_of(c) == f for c, f in zip(c1, f1))
    assert len(set(c1)) > len(c1) // 2  # paraphrases, not one caption per combination
    assert np.abs(w1).max() <= 1.0
    w3, _, _ = generate_synthsounds(1, seed=4)
    assert not np.array_equal(w1, w3)


def test_npz_loader_and_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.rand(10, 1, 4, 4).astype(np.float32), y=np.arange(10) % 3)
    ds = load_dataset("npz", path=str(good))
    assert ds.kind == "image" and ds.num_classes == 3 and len(ds) == 10
    caps = tmp_path / "caps.npz"
    np.savez(caps, x=np.random.rand(4, 2), captions=np.array(["a", "b", "c", "d"]))
    assert load_dataset("npz", path=str(caps)).captions == ["a", "b", "c", "d"]

    with pytest.raises(DataError, match="data file not found: .*missing.npz"):
        load_dataset("npz", path=str(tmp_path / "missing.npz"))
    bad = tmp_path / "nox.npz"
    np.savez(bad, images=np.zeros((2, 2)))
    with pytest.raises(DataError, match="missing array 'x' \\(found: images\\)"):
        load_dataset("npz", path=str(bad))
    bad = tmp_path / "shape.npz"
    np.savez(bad, x=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match=r"'x' has shape \(2, 2, 2\)"):
        load_dataset("npz", path=str(bad))
    bad = tmp_path / "labels.npz"
    np.savez(bad, x=np.zeros((2, 2)), y=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="'y' must be non-negative integer labels"):
        load_dataset("npz", path=str(bad))
    bad = tmp_path / "count.npz"
    np.savez(bad, x=np.zeros((3, 2)), y=np.array([0, 1]))
    with pytest.raises(DataError, match="3 samples but 2 labels"):
        load_dataset("npz", path=str(bad))
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
