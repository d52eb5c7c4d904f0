"""``gendistill train``: config -> data -> method -> the shared accelerate loop."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from .config import Config, ConfigError
from .data import load_dataset
from .data.conditioning import condition_tensors
from .pipelines.base import mismatch
from .pipelines.text import text_encoder_of


class EpochShuffle(torch.utils.data.Sampler):
    """A fresh permutation each epoch, a function of (seed, epoch) alone: a resumed run rebuilds
    the order of the epoch it stopped in and skips the batches it had already seen."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def data_loader(x, cond, batch_size: int, seed: int) -> DataLoader:
    tensors = (x,) if cond is None else (x, cond)
    # the loader's own generator: creating an iterator draws from it, never from the global
    # RNG that the training noise comes from
    return DataLoader(TensorDataset(*tensors), batch_size=min(batch_size, len(x)),
                      sampler=EpochShuffle(len(x), seed), drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def load_teacher(cfg: Config):
    """The teacher pipeline: ``teacher=PATH``, or the shipped one for a built-in dataset."""
    from .assets import builtin_teacher
    from .pipelines import TeacherPipeline, load_pipeline, model_folder

    if cfg.teacher:
        try:
            path = model_folder(cfg.teacher)
        except FileNotFoundError:
            raise ConfigError(f"teacher: no model folder at {cfg.teacher} (no "
                              f"model_index.json there or in its model/)") from None
    else:
        path = builtin_teacher(cfg.data.name)
    pipe = load_pipeline(path)
    if not isinstance(pipe, TeacherPipeline):
        raise ConfigError(f"teacher: {path} holds a {type(pipe).__name__}, not a teacher "
                          f"(distil a teacher, not a student)")
    from .diffusion.teachers import SUPPORTED_NETWORKS
    from .models.networks import NETWORK_CLASSES

    if type(pipe.unet).__name__ not in NETWORK_CLASSES:
        raise ConfigError(f"teacher: {path} has a {type(pipe.unet).__name__} network; "
                          f"supported: {SUPPORTED_NETWORKS}")
    channels = pipe.unet.config.get("in_channels"), pipe.unet.config.get("out_channels")
    if channels[0] is not None and channels[1] not in (None, channels[0]):
        raise ConfigError(f"teacher: {path}: the network has {channels[0]} input and "
                          f"{channels[1]} output channels (a learned variance?); the adapters "
                          f"need a prediction of the input's shape")
    try:
        pipe.denoiser()  # an adapter for its scheduler
    except (TypeError, ValueError) as e:
        raise ConfigError(f"teacher: {path}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def enable_xformers(model: torch.nn.Module):
    """xformers attention for the trained network; it has no CPU build, so ask clearly."""
    if not torch.cuda.is_available():
        raise ConfigError("train.xformers=true needs a CUDA GPU (xformers has no CPU build; "
                          "without it attention runs on PyTorch SDPA)")
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise ConfigError("train.xformers=true needs the xformers extra: "
                          "pip install 'gendistill[xformers]'") from None
    model.enable_xformers_memory_efficient_attention()


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else the cores divided among this machine's training processes
    (torchrun / accelerate set LOCAL_WORLD_SIZE): ranks that each take every core wait on each
    other's OpenMP threads."""
    import os

    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def run_training(cfg: Config) -> Path:
    from accelerate.utils import set_seed

    from .training import train

    if cfg.train.threads is not None and cfg.train.threads < 1:
        raise ConfigError(f"train.threads: expected >= 1, got {cfg.train.threads}")
    torch.set_num_threads(cfg.train.threads or default_threads())
    # Seed before anything random is built (the network's initial weights, the student's new
    # embeddings): every rank starts from the same weights and two runs of one seed agree.
    set_seed(cfg.seed)
    teacher = load_teacher(cfg) if cfg.method in ("ctm", "msd") else None
    # a user's audio is made into the teacher's own log-mels where it has its own vocoder
    ds = load_dataset(cfg.data.name, "train", cfg.data.path, cfg.data.kind,
                      getattr(teacher, "vocoder", None))
    if teacher is not None and (why := mismatch(teacher, ds)) is not None:
        raise ConfigError(f"teacher: the model {why}")
    # captions are encoded as the teacher encodes prompts (its own text encoder, or MiniLM)
    cond, null_cond = condition_tensors(ds, None if teacher is None else text_encoder_of(teacher))
    if cfg.method == "teacher":
        from .methods.teacher import TeacherTraining

        method = TeacherTraining(cfg, ds, null_cond)
    elif cfg.method == "ctm":
        from .methods.ctm import CTMTraining

        method = CTMTraining(cfg, teacher, null_cond)
    elif cfg.method == "msd":
        from .methods.msd import train_msd

        return train_msd(cfg, ds, cond, teacher)
    else:
        raise ConfigError(f"method: {cfg.method!r} is not implemented")
    if cfg.train.xformers:
        enable_xformers(method.model)
    return train(cfg, method, data_loader(ds.x, cond, cfg.train.batch_size, cfg.seed))
