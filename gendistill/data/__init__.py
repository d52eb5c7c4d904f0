"""Built-in datasets (toy2d, digits, synthsounds) and the loaders of user data: an .npz file
(``npz``) or a folder of captioned audio files (``audiofolder``)."""
from __future__ import annotations

from .audiofolder import load_audiofolder
from .base import Dataset, DataError
from .digits import load_digits
from .npz import load_npz
from .synthsounds import load_synthsounds
from .toy2d import load_toy2d, sample_toy2d

BUILTIN = {"toy2d": load_toy2d, "digits": load_digits, "synthsounds": load_synthsounds}


def load_dataset(name: str, split: str = "train", path: str | None = None,
                 kind: str | None = None, vocoder=None) -> Dataset:
    """A built-in dataset by name, or user data: ``name="npz"`` with ``path`` a .npz file,
    ``name="audiofolder"`` with ``path`` a folder of captioned audio, encoded by ``vocoder`` (a
    teacher's) where given."""
    if name == "npz":
        if not path:
            raise DataError("data.name=npz needs data.path=FILE.npz")
        return load_npz(path, kind=kind)
    if name == "audiofolder":
        if not path:
            raise DataError("data.name=audiofolder needs data.path=DIR")
        return load_audiofolder(path, vocoder)
    if name not in BUILTIN:
        raise DataError(f"unknown dataset {name!r}; choose one of "
                        f"{', '.join([*BUILTIN, 'npz', 'audiofolder'])}")
    return BUILTIN[name](split=split)


__all__ = ["Dataset", "DataError", "load_audiofolder", "load_dataset", "load_npz", "load_toy2d", "load_digits",
           "load_synthsounds", "sample_toy2d", "BUILTIN"]
