"""YAML configs with dotted ``key=value`` overrides, validated into dataclasses.

Every section is a dataclass; an unknown key, a value of the wrong type or a missing file raises
``ConfigError`` with a one-line message that names it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("teacher", "ctm", "msd")


class ConfigError(ValueError):
    """A bad config file, key or value."""


@dataclass
class DataConfig:
    name: str = "digits"
    path: str | None = None        # the .npz file (name npz) or the folder (name audiofolder)
    kind: str | None = None        # npz only: vector, image or audio (inferred when unset)


@dataclass
class NetworkConfig:
    type: str = "unet"             # images: unet (diffusers UNets) or dit (DiTTransformer2DModel
                                   # for class labels, PixArtTransformer2DModel for prompts)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # UNet block widths
    layers_per_block: int = 1
    attention: bool = True
    width: int = 256               # MLP width (vector data); DiT token width
    depth: int = 4                 # MLP residual blocks; DiT transformer blocks
    heads: int = 4                 # DiT attention heads
    patch_size: int = 2            # DiT patch size


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # after the warm-up: constant, or cosine (to 0 at max_steps,
                                   # so a resume that changes max_steps changes the curve)
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    cond_dropout: float = 0.1      # CFG: share of conditions replaced by the null condition
    checkpoint_every: int = 1000
    log_every: int = 50
    mixed_precision: str = "no"    # no, fp16 or bf16
    resume: bool = False           # continue from the newest complete checkpoint in output_dir
    overwrite: bool = False        # start afresh in an output_dir holding checkpoints
    allow_config_change: bool = False  # a resume may change the batch size and lr
    keep_checkpoints: int = 3      # the newest N checkpoints are kept (0 = all)
    max_nonfinite: int = 3         # NaN/Inf steps in a row (each skipped) before the run stops
    threads: int | None = None     # CPU threads for torch; unset = the cores / local processes
    cpu: bool = False              # force CPU even where a GPU is present
    xformers: bool = False         # xformers attention (CUDA + the xformers extra); else SDPA
    compile: bool = False          # torch.compile the trained network (inductor)
    fsdp: bool = False             # shard the trained network over the processes (FSDP2)


@dataclass
class EDMConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2


@dataclass
class DiffusionConfig:
    """What a teacher is trained as: its parameterisation and its diffusers scheduler."""

    parameterization: str = "edm"  # edm (EDMEulerScheduler; the edm section), vp-eps / vp-v
                                   # (DDPMScheduler, epsilon / v prediction) or flow
                                   # (FlowMatchEulerDiscreteScheduler, velocity)
    num_train_timesteps: int = 1000  # VP and flow: the scheduler's discrete timesteps
    beta_schedule: str = "linear"  # VP: DDPMScheduler's beta schedule


@dataclass
class CTMConfig:
    """CTM / SoundCTM distillation (DESIGN.md section 4)."""

    num_grid: int = 18             # N points of the Karras grid (40 at paper scale)
    sigma_max: float | None = None  # top of the grid, the DSM levels and the student's range;
                                   # unset: the teacher's sigma_max
    max_jump: int | None = None    # K, default N - 1
    final_jump_prob: float = 0.0   # the share of CTM pairs whose s is sigma_min (the 1-step
                                   # jump); the rest draw s uniformly as CTM does
    start_sampling: str = "jump"   # jump: k ∝ k first, then t (most starts near sigma_max);
                                   # uniform: t uniform over the grid, then k ∝ k that fits
    match_point: str = "zs"        # zs (SoundCTM) or z0 (CTM)
    distance: str = "teacher_feature"  # teacher_feature, l2 or lpips
    denoising_weight: float = 1.0  # w in front of the adaptive DSM term (0 turns it off)
    guidance_min: float = 1.0      # CFG distillation: omega ~ U[min, max] per sample;
    guidance_max: float = 1.0      # min = max = 1 trains an unguided student
    target_ema: float = 0.999      # EMA rate of the target network theta- (CTM: 0.999; iCT: 0)
    gan_weight: float = 0.0        # CTM's GAN term (adaptive weight in [0.01, 10]); 0 = off
    gan_start: int = 0             # the step the GAN term and its discriminator switch on
    gan_sigma: float | None = None  # the noise level the discriminator sees its inputs at:
                                   # unset = the teacher's log-normal training levels (DMD2's
                                   # way); a value = that level (CTM judges clean samples)
    gan_classifier: str | None = None  # a classifier folder (`train-classifier --out`): the
                                   # discriminator's heads read its feature maps of the clean
                                   # samples (or at gan_sigma) instead of the teacher's
    dm_weight: float = 0.0         # DMD's distribution-matching term on the 1-step samples
                                   # (adaptive weight, as the GAN's); 0 = off
    dm_start: int = 0              # the step the DM term and its fake score switch on
    gen_update_ratio: int = 1      # with the DM term: from dm_start the student steps every N
                                   # iterations, the fake score every one (DMD2's rule: 5)
    student_width: int = 1         # the student's channels (UNet) / width (MLP) x this, widened
                                   # from the teacher's weights with the same function at step 0
    s_log_scale: float = 0.25      # the student's s embedding reads s_log_scale * ln(s)
    guidance_embed_scale: float = 1000.0  # the omega embedding reads this * omega (LCM's 1000)
    guidance_in_text: bool = False  # omega also scales each caption's token states' departure
                                   # from the empty prompt's (text students only)
    target_inner: str = "ema"      # the u -> s jump of the target: ema (theta-) or online
                                   # (theta without gradient, CTM); z0 maps to sigma_min with ema
    output_weighting: bool = False  # each sample's CTM distance times (c_out / |dg/dF|)^2 at t:
                                   # the network trained in EDM's units (no change for EDM)
    embedding_lr_scale: float = 1.0  # lr multiplier of the new s / omega embeddings (the rest
                                     # of the student starts trained, they start at zero)


@dataclass
class MSDConfig:
    """Multi-student distillation: K students, each trained by DMD2 (DESIGN.md section 5)."""

    num_students: int = 4          # K; 1 is the DMD2 baseline
    partition: str = "contiguous"  # classes: contiguous, kmeans or random; prompts: balanced
                                   # (median cuts of the pooled text embedding)
    student: int | None = None     # train only this part (a separate job); unset: all, then
                                   # assemble the pipeline
    student_width: float = 1.0     # channel / width factor of each student (< 1: TSM first)
    tsm_steps: int = 0             # narrow students: teacher score matching steps before DM
    student_init: str = "select"   # narrow students start from the teacher's leading channels
                                   # (weight selection) or random
    guidance: float = 1.0          # the teacher's CFG scale omega in the DM gradient
    gen_update_ratio: int = 5      # the fake score steps every iteration, the generator 1 in N
    dm_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # DM's sigmas: this
                                   # span of the Karras grid's indices (0 = sigma_max)
    regression_weight: float = 0.25  # the regression term on teacher ODE pairs (0 = off)
    num_pairs: int = 1024          # teacher ODE pairs, from the whole conditioning space
    pair_steps: int = 18           # Heun steps of the teacher for each pair
    adversarial: bool = False      # stage 2: the classifier head on the fake score's bottleneck
    gan_start: int = 0             # the step stage 2 begins (it continues the DM run)
    gan_generator_weight: float = 3e-3
    gan_head_weight: float = 1e-2


@dataclass
class Config:
    method: str = "teacher"
    output_dir: str = "runs/teacher"
    seed: int = 0
    teacher: str | None = None     # teacher folder for distillation; unset: the shipped one
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    ctm: CTMConfig = field(default_factory=CTMConfig)
    msd: MSDConfig = field(default_factory=MSDConfig)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; YAML already parsed numbers and bools."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build(cls, values: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.max_steps=10", "seed=1"]`` -> nested dict with YAML-parsed values."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


INF = float("inf")
# (low, high, low_open) for every numeric key: a value outside is a one-line error naming the
# key, the value and the range; every float must also be finite
RANGES = {
    "seed": (0, 2 ** 32 - 1, False),
    "network.layers_per_block": (1, 16, False), "network.width": (1, 65536, False),
    "network.depth": (1, 256, False), "network.channels[]": (1, 65536, False),
    "network.heads": (1, 1024, False), "network.patch_size": (1, 64, False),
    "train.max_steps": (1, INF, False), "train.batch_size": (1, 2 ** 20, False),
    "train.lr": (0, 1.0, True), "train.warmup_steps": (0, INF, False),
    "train.weight_decay": (0, 1.0, False), "train.ema_decay": (0, 1.0, False),
    "train.grad_clip": (0, INF, False), "train.cond_dropout": (0, 1.0, False),
    "train.checkpoint_every": (0, INF, False), "train.log_every": (1, INF, False),
    "train.keep_checkpoints": (0, INF, False), "train.max_nonfinite": (1, INF, False),
    "train.threads": (1, 4096, False),
    "diffusion.num_train_timesteps": (2, 10 ** 6, False),
    "edm.sigma_min": (0, INF, True), "edm.sigma_max": (0, INF, True),
    "edm.sigma_data": (0, INF, True), "edm.p_mean": (-INF, INF, False),
    "edm.p_std": (0, INF, True),
    "ctm.num_grid": (2, 10000, False), "ctm.max_jump": (1, 10000, False),
    "ctm.final_jump_prob": (0, 1.0, False),
    "ctm.sigma_max": (0, INF, True),
    "ctm.denoising_weight": (0, INF, False), "ctm.guidance_min": (1, 100, False),
    "ctm.guidance_max": (1, 100, False), "ctm.target_ema": (0, 1.0, False),
    "ctm.gan_weight": (0, INF, False), "ctm.gan_start": (0, INF, False),
    "ctm.gan_sigma": (0, INF, True),
    "ctm.dm_weight": (0, INF, False), "ctm.dm_start": (0, INF, False),
    "ctm.gen_update_ratio": (1, 1000, False), "ctm.student_width": (1, 16, False),
    "ctm.s_log_scale": (0, 1e4, True), "ctm.guidance_embed_scale": (0, 1e4, True),
    "ctm.embedding_lr_scale": (0, 1e4, True),
    "msd.num_students": (1, 4096, False), "msd.student": (0, 4095, False),
    "msd.student_width": (0, 1.0, True), "msd.tsm_steps": (0, INF, False),
    "msd.guidance": (1, 100, False), "msd.gen_update_ratio": (1, 1000, False),
    "msd.regression_weight": (0, INF, False), "msd.num_pairs": (1, 10 ** 7, False),
    "msd.pair_steps": (1, 1000, False), "msd.dm_range[]": (0, 1.0, False),
    "msd.gan_start": (0, INF, False),
    "msd.gan_generator_weight": (0, INF, False), "msd.gan_head_weight": (0, INF, False),
}
CHOICES = {
    "method": METHODS, "network.type": ("unet", "dit"), "data.name": ("toy2d", "digits", "synthsounds", "npz", "audiofolder"),
    "data.kind": (None, "vector", "image", "audio"),
    "train.mixed_precision": ("no", "fp16", "bf16"), "train.lr_schedule": ("constant", "cosine"),
    "diffusion.parameterization": ("edm", "vp-eps", "vp-v", "flow"),
    "diffusion.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"), "ctm.match_point": ("zs", "z0"),
    "ctm.distance": ("teacher_feature", "l2", "lpips"), "ctm.target_inner": ("ema", "online"),
    "ctm.start_sampling": ("jump", "uniform"),
    "msd.partition": ("contiguous", "kmeans", "random", "balanced"),
    "msd.student_init": ("select", "random"),
}


def _check_value(key: str, value) -> None:
    if isinstance(value, list):
        for v in value:
            _check_value(key + "[]", v)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    if key in RANGES and value is not None:
        low, high, low_open = RANGES[key]
        if value < low or value > high or (low_open and value == low):
            lo = f"({low}" if low_open else f"[{low}"
            raise ConfigError(f"{key}: {value} is out of range {lo}, {high}]")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, CHOICES[key]))}, got "
                          f"{value!r}")


def validate(cfg: Config) -> Config:
    """Ranges, choices and finiteness of every key, and the constraints between keys."""
    for key, value in flatten(dataclasses.asdict(cfg)).items():
        _check_value(key, value)
    if cfg.edm.sigma_max <= cfg.edm.sigma_min:
        raise ConfigError(f"edm.sigma_max ({cfg.edm.sigma_max}) must exceed edm.sigma_min "
                          f"({cfg.edm.sigma_min})")
    c = cfg.ctm
    if c.gan_weight > 0 and c.dm_weight > 0:
        raise ConfigError("ctm.gan_weight and ctm.dm_weight: use one of the two terms (each "
                          "trains its own auxiliary network)")
    if c.gan_classifier and c.gan_weight == 0:
        raise ConfigError(f"ctm.gan_classifier ({c.gan_classifier}) is the GAN term's feature "
                          f"network: set ctm.gan_weight > 0 too")
    if c.gen_update_ratio > 1 and c.dm_weight == 0:
        raise ConfigError(f"ctm.gen_update_ratio ({c.gen_update_ratio}) paces the student "
                          f"against the DM term's fake score: set ctm.dm_weight > 0 too")
    if c.guidance_max < c.guidance_min:
        raise ConfigError(f"ctm.guidance_max ({c.guidance_max}) is below ctm.guidance_min "
                          f"({c.guidance_min})")
    if c.max_jump is not None and c.max_jump > c.num_grid - 1:
        raise ConfigError(f"ctm.max_jump: {c.max_jump} is out of range [1, num_grid - 1 = "
                          f"{c.num_grid - 1}]")
    m = cfg.msd
    if m.student is not None and m.student >= m.num_students:
        raise ConfigError(f"msd.student: {m.student} is out of range [0, num_students - 1 = "
                          f"{m.num_students - 1}]")
    if len(m.dm_range) != 2 or m.dm_range[0] >= m.dm_range[1]:
        raise ConfigError(f"msd.dm_range: expected [low, high] with low < high, got "
                          f"{m.dm_range}")
    if m.adversarial and m.gan_start >= cfg.train.max_steps and cfg.method == "msd":
        raise ConfigError(f"msd.gan_start ({m.gan_start}) leaves no adversarial steps before "
                          f"train.max_steps ({cfg.train.max_steps}) with msd.adversarial=true")
    if m.student_width < 1 and m.tsm_steps >= cfg.train.max_steps and cfg.method == "msd":
        raise ConfigError(f"msd.tsm_steps ({m.tsm_steps}) leaves no DM steps before "
                          f"train.max_steps ({cfg.train.max_steps})")
    if cfg.data.name == "npz" and not cfg.data.path:
        raise ConfigError("data.path: data.name=npz needs data.path=FILE.npz")
    if cfg.data.name == "audiofolder" and not cfg.data.path:
        raise ConfigError("data.path: data.name=audiofolder needs data.path=DIR")
    return cfg


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested dict -> {"section.key": value}."""
    out = {}
    for k, v in values.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def load_config(path: str | Path, overrides: list[str] | None = None, cls=Config):
    """Read a YAML config, apply dotted overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if values is None:
        raise ConfigError(f"{path}: the config file is empty (it needs at least method: and "
                          f"data:)")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got a "
                          f"{type(values).__name__}")
    values = merge(values, parse_overrides(overrides or []))
    cfg = build(cls, values)
    return validate(cfg) if cls is Config else cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def changed_keys(saved: dict, cfg, ignored=()) -> dict[str, str]:
    """Where a run's saved config (as its config.json holds it) and ``cfg`` differ, outside
    ``ignored``: {key: "key (before -> now)"}. A key newer than the run counts as unchanged
    while it keeps its default: a new key's default is the old behaviour."""
    def flat(c) -> dict:  # through JSON, as config.json has it (tuples become lists)
        return flatten(json.loads(json.dumps(to_dict(c))))

    saved, now, defaults = flatten(saved), flat(cfg), flat(type(cfg)())
    missing, absent = object(), "not in the run's config"
    return {k: f"{k} ({repr(saved[k]) if k in saved else absent} -> {now.get(k)!r})"
            for k in sorted(saved.keys() | now.keys())
            if k not in ignored and saved.get(k, defaults.get(k, missing)) != now.get(k)}


# config keys that name folders a run reads: a folder is what its weights hold, not where it
# lies (the bench's cache and a resume compare these, not the paths)
FOLDER_KEYS = ("teacher", "ctm.gan_classifier")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def folder_weights(cfg) -> dict[str, dict]:
    """For each folder key that is set, its path and the sha256 of every weights file in it (a
    training run's output_dir: in its model/, not its checkpoints), in path order."""
    values = flatten(to_dict(cfg))
    found = {}
    for key in FOLDER_KEYS:
        if not values.get(key):
            continue
        folder = Path(values[key])
        if (folder / "model").is_dir() and not (folder / "model_index.json").is_file():
            folder = folder / "model"
        files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
        found[key] = {"path": values[key],
                      "weights": [hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                                  for p in files]}
    return found
