"""``gendistill train``: config -> data -> method -> the shared accelerate loop."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader, TensorDataset

from .config import Config, ConfigError
from .data import load_dataset
from .data.conditioning import condition_tensors


def data_loader(x, cond, batch_size: int, seed: int) -> DataLoader:
    import torch

    tensors = (x,) if cond is None else (x, cond)
    return DataLoader(TensorDataset(*tensors), batch_size=min(batch_size, len(x)), shuffle=True,
                      drop_last=True, generator=torch.Generator().manual_seed(seed))


def run_training(cfg: Config) -> Path:
    from .training import train

    ds = load_dataset(cfg.data.name, "train", cfg.data.path, cfg.data.kind)
    cond, null_cond = condition_tensors(ds)
    if cfg.method == "teacher":
        from .methods.teacher import TeacherTraining

        method = TeacherTraining(cfg, ds, null_cond)
    else:
        raise ConfigError(f"method: {cfg.method!r} is not implemented")
    return train(cfg, method, data_loader(ds.x, cond, cfg.train.batch_size, cfg.seed))
