"""Multi-student distillation (Song et al. 2024): partition, K DMD2 students, one pipeline.

``output_dir`` holds the run:

  partition.json          the router (which condition goes to which student)
  teacher_pairs.pt        the teacher's ODE pairs, made once, shared by every student
  students/student-k/     student k's own training run (checkpoints, logs, model/)
  model/                  the assembled MSDPipeline

Students are independent: ``msd.student=k`` trains part k alone (a separate process or cluster
job); a run without it trains the parts still missing and assembles the pipeline.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch

from ..config import Config, ConfigError, to_dict
from ..data import Dataset
from ..partition import PartitionError, Router, class_features, partition_classes
from ..pipelines.text import text_encoder_of

log = logging.getLogger("gendistill")

MAX_FEATURE_SAMPLES = 256  # per class, for the k-means features


@torch.no_grad()
def teacher_class_features(teacher, ds: Dataset, encode=lambda x: x) -> torch.Tensor:
    """Per-class mean of the teacher's bottleneck features of real data at sigma = sigma_data
    (spatially pooled): what ``partition=kmeans`` clusters. ``encode``: data -> the teacher
    network's space (a latent teacher's VAE)."""
    from ..diffusion import bottleneck_module, tap_features

    net = teacher.net
    keep = torch.cat([(ds.y == c).nonzero().flatten()[:MAX_FEATURE_SAMPLES]
                      for c in range(ds.num_classes)])
    x, y = encode(ds.x[keep]), ds.y[keep]
    sigma = torch.full((len(x),), float(teacher.sigma_data))
    g = torch.Generator().manual_seed(0)
    x_sigma = x + sigma.view(-1, *[1] * (x.ndim - 1)) * torch.randn(x.shape, generator=g)
    with tap_features(net, [bottleneck_module(net)]) as feats:
        teacher(x_sigma, sigma, y)
    h = feats[0]
    h = h.mean((2, 3)) if h.ndim == 4 else h
    return class_features(h, y, ds.num_classes)


def pooled_captions(ds: Dataset, teacher_pipe) -> tuple[list[str], torch.Tensor]:
    """A text dataset's unique captions (sorted) and their pooled states from the teacher's
    text encoder: what the router is built on and reads."""
    captions = sorted(set(ds.captions))
    encoder = text_encoder_of(teacher_pipe)
    return captions, torch.cat([encoder(captions[i:i + 256])[1]
                                for i in range(0, len(captions), 256)])


def build_router(cfg: Config, ds: Dataset, teacher, teacher_pipe, captions=None) -> Router:
    """The partition of ``ds``'s conditioning space among ``msd.num_students`` students:
    classes by the teacher's features (kmeans), prompts by their pooled states (``captions``,
    from ``pooled_captions``)."""
    m = cfg.msd
    if (ds.conditioning == "text") != (m.partition == "balanced"):
        raise ConfigError(f"msd.partition: {ds.conditioning}-conditional data ({ds.name}) is "
                          f"split with " + ("partition=balanced" if ds.conditioning == "text"
                                            else "contiguous, kmeans or random") +
                          f", got {m.partition!r}")
    try:
        if ds.conditioning == "class":
            features = (teacher_class_features(teacher, ds, teacher_pipe.encode)
                        if m.partition == "kmeans" else None)
            return partition_classes(m.partition, ds.num_classes, m.num_students, cfg.seed,
                                     features)
        if ds.conditioning == "text":
            return Router.for_prompts(captions[1], m.num_students)
    except PartitionError as e:
        raise ConfigError(f"msd: {e}") from None
    if m.num_students != 1:
        raise ConfigError(f"msd.num_students: an unconditional dataset ({ds.name}) has one "
                          f"part, got {m.num_students}")
    return Router({"kind": "single"})


def part_of_each_sample(router: Router, ds: Dataset, captions=None) -> torch.Tensor:
    """The student index of every training sample (a text dataset's from ``captions``, the
    pair ``pooled_captions`` gave)."""
    if ds.conditioning == "class":
        return router(ds.y)
    if ds.conditioning == "text":
        part = dict(zip(captions[0], router(captions[1]).tolist()))
        return torch.tensor([part[c] for c in ds.captions])
    return torch.zeros(len(ds), dtype=torch.long)


def regression_pairs(cfg: Config, teacher, ds: Dataset, cond, out: Path) -> dict:
    """Teacher ODE pairs over the **whole** conditioning space (balanced over classes, or
    random training captions), cached in ``output_dir/teacher_pairs.pt``."""
    from ..pipelines.base import network_sample_shape
    from .dmd2 import cached_pairs, fingerprint, teacher_pairs

    m = cfg.msd
    n = m.num_pairs
    shape = network_sample_shape(teacher.net)  # a latent teacher's latents
    if ds.conditioning == "class":
        pair_cond = torch.arange(n) % ds.num_classes
    elif cond is not None:
        pair_cond = cond[torch.randint(len(cond), (n,),
                                       generator=torch.Generator().manual_seed(cfg.seed))]
    else:
        pair_cond = None
    key = {"num_pairs": n, "guidance": m.guidance, "steps": m.pair_steps, "seed": cfg.seed,
           "teacher": fingerprint(teacher.net.state_dict().items()),
           # the same weights read under another parameterisation give other trajectories
           "denoiser": {"class": type(teacher).__name__, "sigma_data": teacher.sigma_data,
                        "sigma_min": teacher.sigma_min, "sigma_max": teacher.sigma_max,
                        "scheduler": teacher.scheduler_config},
           "data": ds.name,
           "conditions": None if pair_cond is None else fingerprint([("cond", pair_cond)]),
           "shape": list(shape)}

    def make():
        log.info("making %d teacher ODE pairs (%d Heun steps)", n, m.pair_steps)
        return teacher_pairs(teacher, pair_cond, shape, m.guidance, m.pair_steps, cfg.seed,
                             n if pair_cond is None else 256, progress=True)

    return cached_pairs(out / "teacher_pairs.pt", key, make)


def student_config(cfg: Config, k: int) -> Config:
    """Student k's own run: its folder, its part, its seed."""
    part = copy.deepcopy(cfg)
    part.output_dir = str(Path(cfg.output_dir) / "students" / f"student-{k}")
    part.msd.student = k
    part.seed = cfg.seed + k
    return part


def student_done(part: Config) -> bool:
    """True when the part's model is saved under this very config after ``train.max_steps``
    (an older run of another config is an error, unless train.overwrite)."""
    from ..training.loop import check_resumable

    folder = Path(part.output_dir)
    if not (folder / "model" / "config.json").is_file() or part.train.overwrite:
        return False
    check_resumable(folder, part)
    timing = folder / "train_time.json"
    steps = json.loads(timing.read_text())["steps"] if timing.is_file() else 0
    return steps >= part.train.max_steps


def train_student(cfg: Config, k: int, router: Router, parts: torch.Tensor, ds: Dataset, cond,
                  teacher, pairs: dict, encode=None) -> Path:
    from accelerate.utils import set_seed

    from ..train import data_loader
    from ..training import latest_checkpoint, train
    from .dmd2 import DMD2Training

    part = student_config(cfg, k)
    # train.resume continues every unfinished student from its newest checkpoint; a student
    # that has none yet starts afresh
    part.train.resume = cfg.train.resume and latest_checkpoint(Path(part.output_dir)) is not None
    if student_done(part):
        log.info("student %d: done (%s)", k, Path(part.output_dir) / "model")
        return Path(part.output_dir) / "model"
    rows = (parts == k).nonzero().flatten()
    log.info("student %d of %d: %d training samples", k, router.num_students, len(rows))
    set_seed(part.seed)
    method = DMD2Training(part, teacher, pairs, encode)
    loader = data_loader(ds.x[rows], None if cond is None else cond[rows],
                         part.train.batch_size, part.seed)
    return train(part, method, loader)


def assemble(cfg: Config, router: Router, teacher, teacher_pipe) -> Path:
    """Every student's network + the router -> one MSDPipeline in ``output_dir/model``."""
    from ..models.msd import MSDStudents
    from ..models.networks import NETWORK_CLASSES
    from ..pipelines import MSDPipeline
    from ..pipelines.base import teacher_components
    from ..pipelines.remote import save_with_remote_code

    out = Path(cfg.output_dir)
    folders = [Path(student_config(cfg, k).output_dir) / "model"
               for k in range(router.num_students)]
    missing = [k for k, f in enumerate(folders) if not (f / "config.json").is_file()]
    if missing:
        raise ConfigError(f"msd: cannot assemble {out / 'model'}: student(s) "
                          f"{', '.join(map(str, missing))} not trained yet (run them with "
                          f"msd.student=K, or all with msd.student unset)")
    networks = []
    for folder in folders:
        name = json.loads((folder / "config.json").read_text())["_class_name"]
        networks.append(NETWORK_CLASSES[name].from_pretrained(folder))
    students = MSDStudents.from_networks(networks, router, teacher)
    pipe = MSDPipeline(students=students, text_encoder_name=teacher_pipe.config.text_encoder_name,
                       **teacher_components(teacher_pipe))
    final = out / "model"
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_with_remote_code(pipe, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    seconds = sum(json.loads(t.read_text())["seconds"] for f in folders
                  if (t := f.parent / "train_time.json").is_file())
    (out / "train_time.json").write_text(json.dumps(
        {"students": router.num_students, "seconds": round(seconds, 1),
         "per_student_steps": cfg.train.max_steps}))
    log.info("saved %s", final)
    return final


def check_partition(saved: Path, router: Router, overwrite: bool):
    """The parts already trained in this folder (as separate jobs, maybe on other machines)
    must be the parts this run routes to: a k-means or prompt split that another machine's
    floating point computed differently is an error, not a silently mismatched student."""
    if not saved.is_file() or overwrite:
        return
    try:
        previous = json.loads(saved.read_text())
    except (OSError, ValueError):
        previous = None
    if previous != json.loads(json.dumps(router.state)):
        raise ConfigError(f"{saved}: this run computes another partition than the one its "
                          f"students were trained on (msd.partition, msd.num_students, the data "
                          f"or the teacher changed, or another machine's floating point); use "
                          f"another output_dir, or train.overwrite=true to start afresh")


def train_msd(cfg: Config, ds: Dataset, cond, teacher_pipe) -> Path:
    """Train the students (all, or ``msd.student``) and assemble the pipeline when all are
    there. Returns the pipeline folder, or the part's network folder for a single part."""
    from accelerate import PartialState

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file, not a folder")
    teacher = teacher_pipe.denoiser().eval().requires_grad_(False)
    captions = pooled_captions(ds, teacher_pipe) if ds.conditioning == "text" else None
    router = build_router(cfg, ds, teacher, teacher_pipe, captions)
    # several launched processes train each student data-parallel; rank 0 alone writes
    processes = PartialState(cpu=cfg.train.cpu)
    check_partition(out / "partition.json", router, cfg.train.overwrite)
    processes.wait_for_everyone()  # every rank has read partition.json before it is written
    if processes.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "partition.json").write_text(json.dumps(router.state) + "\n")
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    parts = part_of_each_sample(router, ds, captions)
    with processes.main_process_first():  # made once, then read from the cache
        pairs = regression_pairs(cfg, teacher, ds, cond, out)
    todo = range(router.num_students) if cfg.msd.student is None else [cfg.msd.student]
    for k in todo:
        # a latent teacher's students learn in its VAE's latent space (as CTM students do)
        folder = train_student(cfg, k, router, parts, ds, cond, teacher, pairs,
                               teacher_pipe.encode)
    if cfg.msd.student is not None:
        return folder
    if processes.is_main_process:
        assemble(cfg, router, teacher, teacher_pipe)
    processes.wait_for_everyone()
    return out / "model"
