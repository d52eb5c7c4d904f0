"""``gendistill bench PRESET``: teacher and students trained (or reused) and measured in one run.

Each preset names its dataset, its teacher config and the students to distil; every row is one
(model, sampling) pair. Quality (the dataset's score), faithfulness to the condition and speed
are measured in the same process, and ``speedup`` / ``score_ratio`` are relative to the teacher's
Heun row. Trained models are cached under ``cache_dir/<name>-<hash of the resolved config>``.

A score on a thousand samples moves with the noise it was drawn from, and a student with the seed
it was trained from: a row's score is the mean over the preset's evaluation seeds (the same
noise and labels for every row, so ratios are paired) and over its student's training seeds,
with the spread over each beside it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import (FOLDER_KEYS, REPO_ROOT, Config, changed_keys, flatten, folder_weights,
                      load_config, to_dict)


@dataclass
class Student:
    config: str                     # relative to the repository root
    overrides: list[str] = field(default_factory=list)
    teacher: str = "teacher"        # the teacher it distils: "teacher" or a key of
                                    # Preset.other_teachers
    seeds: tuple[int, ...] = (0,)   # training seeds, one cached run each


@dataclass
class Row:
    model: str
    method: str
    source: str                     # "teacher" or a key of Preset.students
    call: dict
    control: str | None = None      # a key of CONTROLS: training-free control of audio


@dataclass
class Preset:
    dataset: str
    teacher_config: str
    students: dict[str, Student]
    rows: list[Row]
    num_samples: int
    quick_num_samples: int
    quick_overrides: list[str]      # applied to every training in --quick
    full_overrides: list[str] = field(default_factory=list)
    timing_batch: int = 64
    other_teachers: dict[str, str] = field(default_factory=dict)  # name -> teacher config:
                                    # teachers of other parameterisations, each a row source
    eval_seeds: tuple[int, ...] = (0,)  # every row is evaluated from each
    calibrate_guidance: float | None = None  # set: every CTM student's single-jump start is
                                    # chosen on the train split at this omega (eval.calibrate)

    def reference(self, row: Row) -> str:
        """The teacher a row is read against: itself for a teacher, else its student's."""
        if row.source == "teacher" or row.source in self.other_teachers:
            return row.source
        return self.students[row.source].teacher

    def main_teacher_only(self) -> "Preset":
        """This preset without the other teachers and their students (the demo's quick run)."""
        return dataclasses.replace(
            self, rows=[r for r in self.rows if self.reference(r) == "teacher"],
            students={k: s for k, s in self.students.items() if s.teacher == "teacher"},
            other_teachers={})


def _teacher_rows(steps: int) -> list[Row]:
    return [Row("teacher", "heun", "teacher", {"num_inference_steps": steps, "sampler": "heun"}),
            Row("teacher", "euler-1", "teacher", {"num_inference_steps": 1, "sampler": "euler"})]


def _soundctm_rows() -> list[Row]:
    """Issue 9's rows: steps, the nu and omega sweeps, l2, control; omega 3.5 (the pipeline's
    default) unless the row sweeps it, read against the teacher at the same omega."""
    w = {"guidance_scale": 3.5}
    one = {"num_inference_steps": 1, **w}
    guided = {"num_inference_steps": 12, "gamma": 1.0, **w}
    return [Row("soundctm-1", "soundctm", "ctm", one),
            Row("soundctm-2", "soundctm", "ctm", {"num_inference_steps": 2, "gamma": 0.0, **w}),
            Row("soundctm-4-g0.5", "soundctm", "ctm",
                {"num_inference_steps": 4, "gamma": 0.5, **w}),
            Row("soundctm-1-nu0.5", "soundctm", "ctm", {**one, "nu": 0.5}),
            Row("soundctm-1-nu2", "soundctm", "ctm", {**one, "nu": 2.0}),
            Row("soundctm-1-w2", "soundctm", "ctm", {**one, "guidance_scale": 2.0}),
            Row("soundctm-1-w5", "soundctm", "ctm", {**one, "guidance_scale": 5.0}),
            Row("soundctm-1-l2", "soundctm", "ctm-l2", one),
            Row("soundctm-control-noiseopt", "soundctm", "ctm", one, control="loudness-noise"),
            # guided control acts between jumps: on the shipped student 8 jumps cut the
            # envelope error 1.9x, 12 2.8x, 16 3.1x (README)
            Row("soundctm-control-guided", "soundctm", "ctm", guided, control="loudness-guided"),
            Row("soundctm-control-highpass-noiseopt", "soundctm", "ctm", one,
                control="highpass-noise"),
            Row("soundctm-control-highpass-guided", "soundctm", "ctm", guided,
                control="highpass-guided")]


def swell_envelope(frames: int) -> torch.Tensor:
    """The bench's loudness target: a swell from -40 dB to -12 dB at the middle and back, an
    envelope none of the dataset's sounds has."""
    db = -40 + 28 * (1 - (torch.linspace(-1, 1, frames)).abs())
    return 10 ** (db / 20)


def make_control(name: str, vocoder):
    """The bench's control targets, ``TARGET-METHOD``, both far from what the data does:
    ``loudness``, the swell above; ``highpass``, all the energy in the upper half of the mel
    bins (the lower half holds 96-98 % of the student's)."""
    from ..pipelines.control import LoudnessControl, SpectralMaskControl, band_mask

    target, method = name.split("-")
    if target == "loudness":
        return LoudnessControl(target=swell_envelope(vocoder.num_frames), method=method)
    if target == "highpass":
        n_mels = vocoder.config.n_mels
        return SpectralMaskControl(mask=band_mask(n_mels, vocoder.num_frames, 0, n_mels // 2),
                                   keep="outside", method=method)
    raise ValueError(f"unknown bench control {name!r}")


def _ctm_rows() -> list[Row]:
    # omega = 1 named: a CFG-distilled student's pipeline defaults to 3.5, and every row is
    # read against the teacher's row at its own omega
    w = {"guidance_scale": 1.0}
    return [Row("ctm-1", "ctm", "ctm", {"num_inference_steps": 1, **w}),
            Row("ctm-2", "ctm", "ctm", {"num_inference_steps": 2, "gamma": 0.0, **w}),
            Row("ctm-4-g0.5", "ctm", "ctm", {"num_inference_steps": 4, "gamma": 0.5, **w}),
            Row("ctm-1-l2", "ctm", "ctm-l2", {"num_inference_steps": 1, **w})]


# issue 10's other teachers of the digits: VP epsilon, flow matching, EDM on a DiT; each
# student's overrides of configs/ctm/digits.yaml: the VP epsilon student learns only the jumps
# from sigma <= 10, where its single jump starts (x0 = x - sigma eps multiplies the network's
# error by sigma, up to the DDPM table's 157)
ANY_TEACHER = {"vp": ["ctm.sigma_max=10"], "flow": [], "dit": []}


def _any_teacher_rows(names) -> list[Row]:
    """Issue 10's rows: each other teacher's Heun-18 row, and the student distilled from it at
    1 and 2 steps, read against it."""
    heun = {"num_inference_steps": 18, "sampler": "heun"}
    return ([Row(f"teacher-{n}", "heun", f"teacher-{n}", heun) for n in names]
            + [Row(f"ctm-{k}-{n}", "ctm", f"ctm-{n}", {"num_inference_steps": k,
                                                       "guidance_scale": 1.0})
               for n in names for k in (1, 2)])


# toy2d's CTM without its GAN phase (configs/ctm/toy2d.yaml before the GAN term was its default)
NO_GAN = ["ctm.gan_weight=0", "ctm.gan_start=0"]
OLD_CTM_RECIPE = ["train.lr=2e-4", "ctm.denoising_weight=1.0"]
TOY2D_ABLATION = {
    "old-recipe": OLD_CTM_RECIPE,
    "old+lr1e-3": ["train.lr=1e-3", "ctm.denoising_weight=1.0"],
    "old+online-target": [*OLD_CTM_RECIPE, "ctm.target_inner=online"],
    "old+no-clip": [*OLD_CTM_RECIPE, "train.grad_clip=0"],
    "new-default": [],
    "new-no-dsm": ["ctm.denoising_weight=0"],
    "new-s-embed-250": ["ctm.s_log_scale=250"],
    "new-l2": ["ctm.distance=l2"],
    "new-z0-online": ["ctm.match_point=z0", "ctm.target_inner=online"],
    "new-batch-64": ["train.batch_size=64"],
    "new-embedding-lr10": ["ctm.embedding_lr_scale=10"],
}

# The digits counterpart (issue 7: ctm-1 stays behind its teacher): one change per row against
# today's default (configs/ctm/digits.yaml), each from three training seeds, since one seed's
# student alone spans 1.08-1.31x its teacher; 1 step at omega = 1 and 3, and each row's
# response to omega. The default's runs are the digits preset's `ctm` (one cache per dataset).
DIGITS_ABLATION = {
    "default": [],
    "l2": ["ctm.distance=l2"],
    "lr-cosine": ["train.lr_schedule=cosine"],
    # DMD's distribution matching on the 1-step samples for the last two thirds of the run
    "dm": ["ctm.dm_weight=1", "ctm.dm_start=400"],
}


def _ablation_key(name: str) -> str:
    """A digits-ablation row's student: the default is the digits preset's `ctm`."""
    return "ctm" if name == "default" else f"ctm-{name}"


MSD_VARIANTS = {"dmd2-k1": ["msd.num_students=1"], "msd-k2": ["msd.num_students=2"],
                "msd-k4": [], "msd-k4-w50": ["msd.student_width=0.5"],
                "msd-k4-adv": ["msd.adversarial=true"],
                "msd-k4-kmeans": ["msd.partition=kmeans"],
                "msd-k4-random": ["msd.partition=random"]}


def _msd_preset(dataset: str, num_samples: int, quick_num_samples: int, quick: list[str],
                timing_batch: int, variants=tuple(MSD_VARIANTS), teacher_rows=None,
                full: list[str] = (), schedules: dict[str, list[str]] | None = None,
                eval_seeds=(0,)) -> Preset:
    """The MSD rows of issue 8 on ``configs/msd/<dataset>.yaml``: equal steps and batch per
    student in every row (the config's ``msd.tsm_steps`` and ``msd.gan_start`` place TSM and
    stage 2 inside them), except the rows ``schedules`` gives their own. Each row is read
    against the teacher at the omega its students were distilled at (``msd.guidance``)."""
    config = f"configs/msd/{dataset}.yaml"
    schedules = schedules or {}
    students = {name: Student(config, (["msd.num_students=4"] if name.startswith("msd-k4")
                                       else []) + MSD_VARIANTS[name] + schedules.get(name, []))
                for name in variants}
    rows = [Row(name, "dmd2" if name == "dmd2-k1" else "msd", name, {}) for name in variants]
    return Preset(dataset=dataset, teacher_config=f"configs/teacher/{dataset}.yaml",
                  students=students, rows=(teacher_rows or _teacher_rows(18)) + rows,
                  num_samples=num_samples, quick_num_samples=quick_num_samples,
                  quick_overrides=quick, full_overrides=list(full), timing_batch=timing_batch,
                  eval_seeds=eval_seeds)


PRESETS = {
    "toy2d": Preset(
        dataset="toy2d", teacher_config="configs/teacher/toy2d.yaml",
        # the default's last third adds CTM's GAN term; the two ablations are without it
        students={"ctm": Student("configs/ctm/toy2d.yaml"),
                  "ctm-no-gan": Student("configs/ctm/toy2d.yaml", NO_GAN),
                  "ctm-l2": Student("configs/ctm/toy2d.yaml", ["ctm.distance=l2", *NO_GAN])},
        rows=_teacher_rows(18) + _ctm_rows() + [
            Row("ctm-1-no-gan", "ctm", "ctm-no-gan", {"num_inference_steps": 1})],
        num_samples=4000, quick_num_samples=1000, eval_seeds=(0, 1, 2),
        quick_overrides=["train.max_steps=300", "ctm.gan_start=200"], timing_batch=256),
    "digits": Preset(
        dataset="digits", teacher_config="configs/teacher/digits.yaml",
        # the headline student from three seeds: one seed's FID spans 1.06-1.25x its teacher
        students={"ctm": Student("configs/ctm/digits.yaml", seeds=(0, 1, 2)),
                  **{f"ctm-{n}": Student("configs/ctm/digits.yaml", extra, teacher=f"teacher-{n}")
                     for n, extra in ANY_TEACHER.items()}},
        other_teachers={f"teacher-{n}": f"configs/teacher/digits-{n}.yaml" for n in ANY_TEACHER},
        # the CFG-distilled student at omega = 3, read against the teacher at omega = 3
        rows=_teacher_rows(18) + _ctm_rows()[:3] + [
            Row("teacher", "heun-w3", "teacher",
                {"num_inference_steps": 18, "sampler": "heun", "guidance_scale": 3.0}),
            Row("ctm-1-w3", "ctm", "ctm", {"num_inference_steps": 1, "guidance_scale": 3.0})]
        + _any_teacher_rows(ANY_TEACHER),
        num_samples=1000, quick_num_samples=300, eval_seeds=(0, 1, 2),
        quick_overrides=["train.max_steps=120", "ctm.num_grid=10"], timing_batch=64,
        calibrate_guidance=1.0),
    # Why the 1-step toy2d student blurred (issue 7): one change per row against the old
    # recipe (lr 2e-4, DSM weight 1) and the new default (lr 1e-3, DSM weight 0.1), 1000 steps
    # each, 1 step at sampling.
    "toy2d-ablation": Preset(
        dataset="toy2d", teacher_config="configs/teacher/toy2d.yaml",
        students={name: Student("configs/ctm/toy2d.yaml", ["train.max_steps=1000",
                                                           "train.checkpoint_every=0", *NO_GAN,
                                                           *extra])
                  for name, extra in TOY2D_ABLATION.items()},
        rows=_teacher_rows(18)[:1] + [Row(name, "ctm", name, {"num_inference_steps": 1})
                                      for name in TOY2D_ABLATION],
        num_samples=4000, quick_num_samples=1000, quick_overrides=["train.max_steps=100"],
        timing_batch=256),
    "digits-ablation": Preset(
        dataset="digits", teacher_config="configs/teacher/digits.yaml",
        students={_ablation_key(name): Student("configs/ctm/digits.yaml", extra, seeds=(0, 1, 2))
                  for name, extra in DIGITS_ABLATION.items()},
        rows=_teacher_rows(18)[:1] + [
            Row("teacher", "heun-w3", "teacher",
                {"num_inference_steps": 18, "sampler": "heun", "guidance_scale": 3.0})]
        + [Row(name, "ctm", _ablation_key(name), {"num_inference_steps": 1, "guidance_scale": 1.0})
           for name in DIGITS_ABLATION]
        + [Row(f"{name}-w3", "ctm", _ablation_key(name),
               {"num_inference_steps": 1, "guidance_scale": 3.0}) for name in DIGITS_ABLATION],
        eval_seeds=(0, 1, 2),
        num_samples=1000, quick_num_samples=300,
        quick_overrides=["train.max_steps=120", "ctm.num_grid=10"], timing_batch=64,
        calibrate_guidance=1.0),
    # Multi-student distillation (issue 8): every student gets the config's steps and batch;
    # the narrow students spend the first steps on TSM, the adversarial ones the last quarter
    # on stage 2.
    "toy2d-msd": _msd_preset("toy2d", 4000, 1000, ["train.max_steps=100", "msd.num_pairs=256",
                                                   "msd.tsm_steps=20", "msd.gan_start=75"], 256),
    # the narrow students get fifteen times the steps (600 TSM + 8400 DM): at the shared 600 they
    # stay 4.9x the full-width students' score, at 3000 1.51x, at 5400 1.34x, and their steps
    # are cheaper (README)
    "digits-msd": _msd_preset("digits", 1000, 300, ["train.max_steps=40", "msd.num_pairs=64",
                                                    "msd.tsm_steps=10", "msd.gan_start=30"], 64,
                              schedules={"msd-k4-w50": ["msd.tsm_steps=600",
                                                        "train.max_steps=9000"]},
                              eval_seeds=(0, 1, 2)),
    # SoundCTM text-to-sound (issue 9): the shipped teacher, CFG-distilled students
    "synthsounds": Preset(
        dataset="synthsounds", teacher_config="configs/teacher/synthsounds.yaml",
        students={"ctm": Student("configs/ctm/synthsounds.yaml"),
                  "ctm-l2": Student("configs/ctm/synthsounds.yaml", ["ctm.distance=l2"])},
        rows=_teacher_rows(18) + [
            Row("teacher", "heun-w3.5", "teacher",
                {"num_inference_steps": 18, "sampler": "heun", "guidance_scale": 3.5})]
        + _soundctm_rows(), num_samples=384, quick_num_samples=96,
        quick_overrides=["train.max_steps=20", "train.batch_size=8", "ctm.num_grid=6"],
        timing_batch=16),
    # MSD of the synthsounds teacher (issue 8): prompts split by their pooled text embedding,
    # students distilled against the teacher at omega = 3 (configs/msd/synthsounds.yaml); 300
    # steps each and 128 pairs instead of the config's 1000 and 512, so that the five students
    # fit an hour on a CPU
    "synthsounds-msd": _msd_preset(
        "synthsounds", 384, 96, ["train.max_steps=20", "train.batch_size=8",
                                 "msd.num_pairs=32", "msd.tsm_steps=5", "msd.gan_start=15"],
        16, variants=("dmd2-k1", "msd-k4"), full=["train.max_steps=300", "msd.num_pairs=128"],
        teacher_rows=_teacher_rows(18) + [
            Row("teacher", "heun-w3", "teacher",
                {"num_inference_steps": 18, "sampler": "heun", "guidance_scale": 3.0})]),
}


def config_hash(cfg) -> str:
    """A hash of what the run trains: the keys that differ from their defaults (so a key added
    in a later version does not invalidate the cache) and the weights of the teacher and the
    other folders it reads, not where the run writes or whether it resumed."""
    defaults = flatten(to_dict(Config()))
    values = {k: v for k, v in flatten(to_dict(cfg)).items()
              if k not in ("output_dir", "train.resume") and v != defaults.get(k)}
    values.update({k: v["weights"] for k, v in folder_weights(cfg).items()})
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def stale_keys(folder: Path, cfg) -> list[str]:
    """How a cached run's config.json differs from ``cfg`` ("key (cached -> now)"), leaving
    out where it ran, on how many threads and whether it resumed, and the paths of the teacher
    and other folders (the hash reads their weights)."""
    saved_file = folder / "config.json"
    if not saved_file.is_file():
        return []
    return list(changed_keys(json.loads(saved_file.read_text()), cfg,
                             {"output_dir", "train.resume", "train.threads",
                              *FOLDER_KEYS}).values())


def train_cached(name: str, config: str, overrides: list[str], cache_dir: Path, log) -> Path:
    """Train once per resolved config; later runs with the same config reuse the folder."""
    from ..train import run_training
    from ..training.loop import checkpoints

    cfg = load_config(REPO_ROOT / config, overrides)
    folder = cache_dir / f"{name}-{config_hash(cfg)}"
    model = folder / "model"
    changed = stale_keys(folder, cfg)
    if changed:
        # the hash reads only non-default keys: a changed default keeps the name, not the run
        aside = folder.with_name(folder.name + ".stale")
        n = 1
        while aside.exists():
            n += 1
            aside = folder.with_name(f"{folder.name}.stale{n}")
        folder.rename(aside)
        log(f"{name}: the cached run was trained with {', '.join(changed)}; moved it to "
            f"{aside} and training again")
    if (model / "model_index.json").is_file():
        log(f"{name}: reusing {model}")
        return model
    cfg.output_dir = str(folder)
    # an interrupted training of this config picks up from its last checkpoint (an MSD run's
    # are in its students' folders)
    cfg.train.resume = any(checkpoints(run.parent) for run in folder.rglob("checkpoints"))
    log(f"{name}: {'resuming' if cfg.train.resume else 'training'} {config} "
        f"{' '.join(overrides)} -> {model}")
    return run_training(cfg)


def teacher_folder(name: str, config: str, extra: list[str], cache_dir: Path, log) -> Path:
    """The shipped teacher when the package has one (``configs/teacher/X.yaml`` is shipped as
    ``teachers/X``), else trained."""
    from ..assets import ASSETS

    shipped = ASSETS / "teachers" / Path(config).stem
    if (shipped / "model_index.json").is_file():
        log(f"{name}: shipped {shipped}")
        return shipped
    return train_cached(name, config, extra, cache_dir, log)


def is_ctm_student(folder: Path) -> bool:
    index = json.loads((folder / "model_index.json").read_text())
    return index.get("scheduler", [None, None])[1] == "CTMScheduler"


def calibrate_cached(folder: Path, dataset: str, guidance: float, num_samples: int,
                     log) -> dict:
    """A CTM student's single-jump start, chosen on the train split once per model folder and
    setting (its calibration.json) and written into its scheduler."""
    from ..pipelines import load_pipeline
    from .calibrate import (MAX_GRAIN_INCREASE, START_KINDS, calibrate_one_step_sigma,
                            chosen_start, save_calibration, start_name)

    saved = folder / "calibration.json"
    wanted = {"dataset": dataset, "call_kwargs": {"guidance_scale": guidance},
              "num_samples": num_samples, "max_grain_increase": MAX_GRAIN_INCREASE,
              "kinds": list(START_KINDS)}
    report = json.loads(saved.read_text()) if saved.is_file() else {}
    if any(report.get(key) != value for key, value in wanted.items()):
        pipe = load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            report = calibrate_one_step_sigma(pipe, dataset, num_samples=num_samples,
                                              progress=False, guidance_scale=guidance)
        save_calibration(pipe, folder, report)
        log(f"{folder}: single jump from sigma {start_name(chosen_start(report))} (train split, "
            f"omega {guidance:g})")
    return {"one_step_sigma": report["one_step_sigma"], "start": report["start"],
            "scores": {start_name(row): round(row["score"], 5) for row in report["starts"]},
            "refused": [start_name(row) for row in report["starts"] if not row["eligible"]],
            "grain_limit": report["grain_limit"]}


def spread(conditions: list, n: int) -> list:
    """n conditions evenly spaced through a test split: toy2d's is ordered by class and
    synthsounds' by family, so their first n are one class (one MSD student) or only tones."""
    n = min(n, len(conditions))
    return [conditions[i * len(conditions) // n] for i in range(n)]


def time_pipelines(calls: list[tuple], conditions: list, repeats: int,
                   min_seconds: float = 1.0) -> list[tuple[float, float]]:
    """Median milliseconds per sample of each ``(pipeline, call)`` on a batch of
    ``conditions``: (end to end, the model alone). End to end adds the vocoder of audio
    pipelines, timed on the call's own output. Each call is timed at least ``repeats`` times
    and more until ``min_seconds`` have been timed (five 1-step calls gave a median that moved
    15 % between runs), in rounds: per round each pipeline still short of that gets calls for
    ``min_seconds / repeats`` (at least one), so a slow teacher and a fast student finish
    after about the same rounds, and a drift of the machine's speed hits every row alike
    (timed one row after the other, rows of one network read up to 18 % apart)."""
    from ..generate import sample

    text = isinstance(conditions[0], str)
    args = (None, conditions) if text else (conditions, None)
    for pipe, call in calls:
        sample(pipe, *args, 1, 0, **call)  # warm-up
    model = [[] for _ in calls]
    total = [[] for _ in calls]

    def short(i: int) -> bool:
        done = len(total[i])
        return done < repeats or (sum(total[i]) < min_seconds and done < 100 * repeats)

    # CUDA runs asynchronously: the clock is read once the device has finished
    finishes = [torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
                for pipe, _ in calls]
    while any(short(i) for i in range(len(calls))):
        for i, ((pipe, call), finish) in enumerate(zip(calls, finishes)):
            vocoder = getattr(pipe, "vocoder", None)
            this_round = 0.0
            while short(i) and (this_round == 0 or this_round < min_seconds / repeats):
                finish()
                start = time.perf_counter()
                output = sample(pipe, *args, 1, len(total[i]), **call)
                finish()
                model[i].append(time.perf_counter() - start)
                if vocoder is not None:
                    vocoder(output.latents)
                    finish()
                    total[i].append(time.perf_counter() - start)
                else:  # the same call: one clock reading, so the two columns agree exactly
                    total[i].append(model[i][-1])
                this_round += total[i][-1]
    per_sample = 1000 / len(conditions)
    return [(per_sample * statistics.median(t), per_sample * statistics.median(m))
            for t, m in zip(total, model)]


VOCODERS = {"before (least squares, 64 Griffin-Lim)": {"griffin_lim_iters": 64,
                                                       "mel_inversion_iters": 0},
            "default (NNLS 30, 16 Griffin-Lim)": {}}


def vocoder_report(test, batch: int, repeats: int) -> list[dict]:
    """The vocoder alone: domain FAD of the vocoded real test split (re-encoded) against the
    test split itself, and milliseconds per clip at ``batch``."""
    from ..pipelines.audio import MelVocoder
    from .evaluate import _domain_embedding
    from .fad import fad

    report = []
    for name, settings in VOCODERS.items():
        vocoder = MelVocoder(**{**(test.vocoder or {}), **settings})
        torch.manual_seed(0)
        vocoded = vocoder.encode(torch.cat([vocoder(x) for x in test.x.split(64)]))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            vocoder(test.x[:batch])
            times.append(time.perf_counter() - start)
        report.append({"vocoder": name, **dict(vocoder.config),
                       "fad_vocoded_real": round(float(fad(test.x, vocoded,
                                                           _domain_embedding())), 4),
                       "ms_per_clip": round(1000 * statistics.median(times) / batch, 3)})
    return report


def control_errors(pipe, prompts: list, row: Row, control) -> dict:
    """The control error of a control row's samples and of the same call, prompts and seed
    without control (a guided row's own steps and gamma), and the network calls per sample
    each costs."""
    from ..diffusion import NFECounter
    from ..generate import sample

    result = {}
    for key, extra in (("uncontrolled", {}), ("controlled", {"control": control})):
        call = {**row.call, **extra}
        with NFECounter(pipe.network) as counter:
            output = sample(pipe, None, prompts, 1, 0, **call)
        errors = control.error(pipe.vocoder(output.latents), pipe.vocoder)
        result[key] = {**{k: round(v, 4) for k, v in errors.items()},
                       "network_calls_per_sample": round(counter.rows / len(prompts), 2)}
    return result


def student_parameters(pipe) -> int:
    """The size of the network one sample goes through (one student of an MSD pipeline)."""
    net = pipe.network
    one = net.networks[0] if hasattr(net, "networks") else net
    return sum(p.numel() for p in one.parameters())


def guidance_of(row: dict) -> float:
    return float(row.get("guidance", row["call"].get("guidance_scale", 1.0)))


def guidance_response(pipe, conditions: list, call: dict, low: float, high: float) -> float:
    """How much a pipeline's samples move with the guidance scale: the RMS change between
    omega = ``low`` and ``high``, same conditions and noise. A CFG-distilled student that
    ignores its omega input scores 0 whatever its FID."""
    from ..generate import sample

    text = isinstance(conditions[0], str)
    args = (None, conditions) if text else (conditions, None)
    a, b = (sample(pipe, *args, 1, 0, **{**call, "guidance_scale": w}).samples.float()
            for w in (low, high))
    return float((a - b).pow(2).mean().sqrt())


def guidance_responses(preset: Preset, pipes: dict, folders: dict,
                       conditions: list) -> list[dict]:
    """For each CFG-distilled student, its 1-step response to omega over the range it was
    distilled on, beside its teacher's Heun response over the same range."""
    out, teacher_rms = [], {}  # students of one teacher over one range share its Heun solves
    for row in preset.rows:
        pipe = pipes[row.source]
        if (row.control is not None or row.call.get("num_inference_steps") != 1
                or not getattr(getattr(pipe, "unet", None), "has_guidance", False)
                or any(r["model"] == row.source for r in out)):
            continue
        ctm = json.loads((Path(folders[row.source]).parent / "config.json").read_text())["ctm"]
        low, high = ctm["guidance_min"], ctm["guidance_max"]
        teacher = preset.reference(row)
        heun = next(r for r in preset.rows
                    if r.source == teacher and r.method.startswith("heun"))
        student = guidance_response(pipe, conditions, row.call, low, high)
        if (teacher, low, high) not in teacher_rms:
            teacher_rms[teacher, low, high] = guidance_response(pipes[teacher], conditions,
                                                                heun.call, low, high)
        reference = teacher_rms[teacher, low, high]
        out.append({"model": row.source, "row": row.model, "teacher": teacher,
                    "omega": [low, high], "rms": round(student, 5),
                    "teacher_rms": round(reference, 5), "ratio": round(student / reference, 4)})
    return out


def distilled_guidance(folder: Path) -> float:
    """The teacher's omega an MSD run's students were distilled against (its msd.guidance):
    they take no guidance scale, it is in their weights."""
    return float(json.loads((Path(folder).parent / "config.json").read_text())["msd"]["guidance"])


def teacher_row_for(rows: list[dict], row: dict) -> dict:
    """The Heun row of the row's own teacher it is read against: the one at the same guidance
    scale omega (a CFG-distilled student at omega = 3 against the teacher at omega = 3)."""
    teacher = row.get("teacher", "teacher")
    heun = [r for r in rows if r["model"] == teacher and r["method"].startswith("heun")]
    return next((r for r in heun if guidance_of(r) == guidance_of(row)), heun[0])


AVERAGED = ("score", "precision", "recall", "cond_acc", "SW2", "am_depth_ratio",
            "fm_depth_ratio", "grain_ratio", "pitch_acc", "loudness_acc",
            "attribute_acc")  # a row's results that are means over its runs


def mean_result(results: list[dict]) -> dict:
    """One row's evaluations (each training seed x evaluation seed) as one: the scalars of
    AVERAGED are means, the rest the first run's."""
    out = dict(results[0])
    for key in AVERAGED:
        if out.get(key) is not None:
            out[key] = statistics.fmean(float(r[key]) for r in results)
    return out


def score_spread(scores: list[list[float]]) -> dict:
    """The spread of a row's scores, one list per training seed over the evaluation seeds: the
    standard deviation over evaluation seeds (the sampling noise, averaged over training seeds)
    and over training seeds (of each seed's mean); None where there is only one."""
    eval_sd = (statistics.fmean(statistics.stdev(s) for s in scores)
               if len(scores[0]) > 1 else None)
    seed_sd = statistics.stdev(statistics.fmean(s) for s in scores) if len(scores) > 1 else None
    return {"score_std_eval": None if eval_sd is None else round(eval_sd, 5),
            "score_std_seed": None if seed_sd is None else round(seed_sd, 5)}


def run_bench(preset: str | Preset, out: Path, quick: bool = False,
              cache_dir: Path = Path("runs/bench-cache"), repeats: int = 5, log=print,
              seeds: tuple[int, ...] | None = None,
              eval_seeds: tuple[int, ...] | None = None) -> dict:
    """Train or reuse every model of ``preset`` (a name of PRESETS, or a Preset), evaluate
    each row, and write results.json, results.md and the plots into ``out``.

    ``seeds`` (training seeds of every student) and ``eval_seeds`` replace the preset's; in
    ``quick`` mode, without them, only the first of each is used."""
    from ..data import load_dataset
    from ..pipelines import load_pipeline
    from .evaluate import evaluate_pipeline

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        preset_name, preset = preset, PRESETS[preset]
    else:
        preset_name = preset.dataset
    if eval_seeds is None:
        eval_seeds = preset.eval_seeds[:1] if quick else preset.eval_seeds
    out.mkdir(parents=True, exist_ok=True)
    # one cache per dataset: a student two presets share (same name and config) trains once
    cache_dir = Path(cache_dir) / preset.dataset
    torch.manual_seed(0)
    start = time.time()

    extra = preset.quick_overrides if quick else preset.full_overrides
    teachers = {"teacher": preset.teacher_config, **preset.other_teachers}
    folders = {name: teacher_folder(name, config, extra, cache_dir, log)
               for name, config in teachers.items()}
    runs = {name: {None: folder} for name, folder in folders.items()}  # source -> seed -> model
    train_seconds, train_quiet, calibration = {}, {}, {}
    for key, student in preset.students.items():
        runs[key] = {seed: train_cached(key, student.config,
                                        student.overrides + extra
                                        + [f"teacher={folders[student.teacher]}", f"seed={seed}"],
                                        cache_dir, log)
                     for seed in seeds or (student.seeds[:1] if quick else student.seeds)}
        folders[key] = next(iter(runs[key].values()))
        if preset.calibrate_guidance is not None and is_ctm_student(folders[key]):
            num = preset.quick_num_samples if quick else preset.num_samples
            calibration[key] = {seed: calibrate_cached(folder, preset.dataset,
                                                       preset.calibrate_guidance, num, log)
                                for seed, folder in runs[key].items()}
        timing = folders[key].parent / "train_time.json"
        if timing.is_file():
            record = json.loads(timing.read_text())
            # quiet is known for the last part only: a resumed run's is unknown
            train_seconds[key] = record["seconds"]
            train_quiet[key] = record.get("quiet") if not record.get("resumed_at") else None

    test = load_dataset(preset.dataset, "test")
    timing_conditions = spread(test.captions if test.captions else test.y.tolist(),
                               preset.timing_batch)
    num_samples = preset.quick_num_samples if quick else preset.num_samples
    pipes, rows, samples, timed = {}, [], {}, []
    for row in preset.rows:
        for folder in runs[row.source].values():
            if folder not in pipes:
                pipes[folder] = load_pipeline(folder)
                pipes[folder].set_progress_bar_config(disable=True)
        pipe = pipes[folders[row.source]]
        call = dict(row.call)
        if row.control is not None:
            call["control"] = make_control(row.control, pipe.vocoder)
        log(f"{row.model} ({row.method}): evaluating {num_samples} samples x "
            f"{len(runs[row.source])} training x {len(eval_seeds)} evaluation seeds")
        with torch.no_grad():
            evaluations = [[evaluate_pipeline(pipes[folder], preset.dataset, num_samples,
                                              seed=seed, progress=False, **call)
                            for seed in eval_seeds] for folder in runs[row.source].values()]
        result = mean_result([r for runs_of_seed in evaluations for r in runs_of_seed])
        scores = [[round(float(r["score"]), 5) for r in runs_of_seed]
                  for runs_of_seed in evaluations]
        extra = {}
        if row.control is not None:
            extra["control"] = row.control
            extra["control_error"] = control_errors(pipe, timing_conditions, row,
                                                    call["control"])
        guidance = (distilled_guidance(folders[row.source]) if row.method in ("msd", "dmd2")
                    else call.get("guidance_scale", 1.0))
        rows.append({
            "model": row.model, "method": row.method, "teacher": preset.reference(row),
            "guidance": guidance,
            "params": student_parameters(pipe),
            "nfe": int(round(result["nfe"])), "ms_per_sample": None,  # timed below
            "ms_per_sample_model": None,
            "speedup": None, "score_name": result["score_name"],
            "score": round(float(result["score"]), 5), "score_ratio": None,
            **score_spread(scores),
            "seeds": [s for s in runs[row.source] if s is not None], "scores": scores,
            "cond_acc": None if result["cond_acc"] is None else round(result["cond_acc"], 4),
            "precision": round(result["precision"], 4), "recall": round(result["recall"], 4),
            "call": row.call, "score_floor": result.get("score_floor"),
            **({"sw2": round(result["SW2"], 5)} if "SW2" in result else {}),
            **{k: result[k] for k in ("am_depth_ratio", "fm_depth_ratio",
                                      "modulation_per_family", "grain_ratio", "pitch_acc",
                                      "loudness_acc", "attribute_acc", "attribute_acc_real")
               if result.get(k) is not None}, **extra,
        })
        samples[f"{row.model}/{row.method}"] = (pipe, call)
        timed.append((pipe, call))
    log(f"timing {len(rows)} rows at batch {len(timing_conditions)}, interleaved")
    with torch.no_grad():
        timings = time_pipelines(timed, timing_conditions, repeats)
    for r, (ms, ms_model) in zip(rows, timings):
        r["ms_per_sample"], r["ms_per_sample_model"] = round(ms, 4), round(ms_model, 4)
    for r in rows:
        base = teacher_row_for(rows, r)
        r["speedup"] = round(base["ms_per_sample"] / r["ms_per_sample"], 2)
        r["score_ratio"] = round(r["score"] / base["score"], 4) if base["score"] else None
        if len(r["seeds"]) > 1 and base["score"]:
            r["score_ratio_by_seed"] = [round(statistics.fmean(s) / base["score"], 4)
                                        for s in r["scores"]]
    log("guidance response of the CFG-distilled students")
    with torch.no_grad():
        responses = guidance_responses(preset, {k: pipes[f] for k, f in folders.items()
                                                 if f in pipes},
                                       folders, timing_conditions)

    results = {
        "preset": preset_name, "quick": quick,
        "device": f"{'cuda' if torch.cuda.is_available() else 'cpu'} "
                  f"({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "num_samples": num_samples, "eval_seeds": list(eval_seeds),
        "timing_batch": preset.timing_batch, "repeats": repeats,
        "train_seconds": train_seconds,
        "train_quiet": train_quiet,  # False: trained beside other work; None: not recorded
        "models": {k: str(v) for k, v in folders.items()},
        "seed_models": {k: {str(seed): str(f) for seed, f in r.items()}
                        for k, r in runs.items() if len(r) > 1},
        "rows": rows, "guidance_response": responses,
        "calibration": {k: {str(seed): c for seed, c in by_seed.items()}
                        for k, by_seed in calibration.items()},
        "seconds": round(time.time() - start, 1),
    }
    if test.kind == "audio":
        results["vocoder"] = vocoder_report(test, preset.timing_batch, repeats)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    from .bench_plots import plot_bench

    plot_bench(preset, samples, rows, out)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} ({results['seconds']}s)")
    return results


def _errors_text(errors: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in errors.items() if k != "network_calls_per_sample")


def seeds_text(results: dict) -> str:
    """What a table's scores are means of, and what their ± is."""
    eval_seeds = results.get("eval_seeds", [0])
    seeded = any(len(r.get("seeds", ())) > 1 for r in results["rows"])
    if len(eval_seeds) == 1 and not seeded:
        return ""
    text = (f" Scores are means over {len(eval_seeds)} evaluation seeds (the same noise and "
            "labels for every row)")
    if seeded:
        text += " and, where a student has several, over its training seeds"
    return text + ("; ± is the standard deviation over training seeds, else over evaluation "
                   "seeds.")


def score_text(row: dict) -> str:
    spread = row.get("score_std_seed") or row.get("score_std_eval")
    return f"{row['score']:.4g}" + (f" ± {spread:.2g}" if spread else "")


def results_markdown(results: dict) -> str:
    from .calibrate import chosen_start, start_name

    rows = results["rows"]
    score_name = rows[0]["score_name"]
    lines = [
        f"# Benchmark: {results['preset']}{' (quick)' if results['quick'] else ''}",
        "",
        f"Device: {results['device']}. Scores on {results['num_samples']} samples; speed is the "
        f"median of at least {results['repeats']} calls (and at least 1 s of them) at batch "
        f"{results['timing_batch']}, the rows timed in interleaved rounds. "
        f"`speedup` and `score_ratio` are relative to the teacher's Heun row at the same "
        f"guidance scale ω "
        f"(lower {score_name} is better). Precision and recall: k-NN (k = 5), higher is better; "
        f"a blurred model loses precision, a dropped mode recall." + seeds_text(results),
        "",
        f"| model | method | params | NFE | ms/sample | speedup | {score_name} | ratio | "
        f"precision | recall | cond acc |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    has_sw2 = "sw2" in rows[0]
    if has_sw2:
        lines[-2] += " SW2 |"
        lines[-1] += " ---: |"
    for r in rows:
        acc = "–" if r["cond_acc"] is None else f"{100 * r['cond_acc']:.1f} %"
        lines.append(f"| {r['model']} | {r['method']} | {r['params']:,} | {r['nfe']} | "
                     f"{r['ms_per_sample']:.3f} | {r['speedup']:.1f}× | {score_text(r)} | "
                     f"{r['score_ratio']:.3g} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{acc} |" + (f" {r['sw2']:.4g} |" if has_sw2 else ""))
    seeded = [r for r in rows if len(r.get("seeds", ())) > 1]
    all_seeds = sorted({seed for r in seeded for seed in r["seeds"]})  # rows may have fewer
    if seeded:
        lines += ["", f"Training seeds ({score_name} of each seed's student, mean over the "
                  "evaluation seeds, and its ratio to the teacher):", "",
                  "| model | method | " + " | ".join(f"seed {s}" for s in all_seeds)
                  + " |", "| --- | --- |" + " ---: |" * len(all_seeds)]
        for r in seeded:
            by_seed = {seed: f"{statistics.fmean(s):.4g} ({ratio:.3g}×)" for seed, s, ratio
                       in zip(r["seeds"], r["scores"], r["score_ratio_by_seed"])}
            lines.append(f"| {r['model']} | {r['method']} | "
                         + " | ".join(by_seed.get(seed, "–") for seed in all_seeds) + " |")
    if any(r.get("ms_per_sample_model", r["ms_per_sample"]) != r["ms_per_sample"] for r in rows):
        lines[2] += (" For audio, ms/sample and speedup are end to end (the vocoder included); "
                     "`ms_per_sample_model` in results.json leaves the vocoder out.")
        lines += ["", "| model | method | ms/sample (model) | ms/sample (vocoder) | speedup (model) |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for r in rows:
            base = teacher_row_for(rows, r)
            lines.append(f"| {r['model']} | {r['method']} | {r['ms_per_sample_model']:.3f} | "
                         f"{r['ms_per_sample'] - r['ms_per_sample_model']:.3f} | "
                         f"{base['ms_per_sample_model'] / r['ms_per_sample_model']:.1f}× |")
    if any("am_depth_ratio" in r for r in rows):
        lines += ["", "Modulation depth against the real clips of the same captions (1 = as deep "
                  "as the data, below 1 = flattened; `modulation_per_family` in results.json "
                  "has each family):", "",
                  "| model | method | loudness (AM) depth | pitch (FM) depth |",
                  "| --- | --- | ---: | ---: |"]
        lines += [f"| {r['model']} | {r['method']} | {r['am_depth_ratio']:.3f} | "
                  f"{r['fm_depth_ratio']:.3f} |" for r in rows if "am_depth_ratio" in r]
    if any("grain_ratio" in r for r in rows):
        lines += ["", "Grain of the dark background (silent bins) against the real data's: the "
                  "mean change between neighbouring pixels or mel bins that are both dark; 1 = "
                  "as smooth as the data, above 1 speckled, which the scores above do not see:",
                  "", "| model | method | grain ratio |", "| --- | --- | ---: |"]
        lines += [f"| {r['model']} | {r['method']} | {r['grain_ratio']:.2f} |"
                  for r in rows if "grain_ratio" in r]
    attributed = [r for r in rows if "attribute_acc" in r]
    if attributed:
        lines += ["", "Caption attributes: the share of clips with the pitch (low / mid / high) "
                  "and loudness (quiet / loud) their captions name, each read as the nearest "
                  "median of the real clips of the same family and speed (the family accuracy "
                  "above is near 100 % for every row, so it cannot show how closely a row "
                  "follows its captions); the real clips score "
                  f"{100 * attributed[0]['attribute_acc_real']:.1f} % on both:", "",
                  "| model | method | pitch | loudness | both |",
                  "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['model']} | {r['method']} | {100 * r['pitch_acc']:.1f} % | "
                  f"{100 * r['loudness_acc']:.1f} % | {100 * r['attribute_acc']:.1f} % |"
                  for r in attributed]
    controlled = [r for r in rows if r.get("control_error")]
    if controlled:
        lines += ["", "Training-free control (same prompts and seed, without and with control; "
                  "errors measured on the vocoded audio):", "",
                  "| model | control | error without | error with | network calls per sample |",
                  "| --- | --- | --- | --- | ---: |"]
        for r in controlled:
            err = r["control_error"]
            lines.append(f"| {r['model']} | {r['control']} | {_errors_text(err['uncontrolled'])} "
                         f"| {_errors_text(err['controlled'])} | "
                         f"{err['controlled']['network_calls_per_sample']:g} |")
    if results.get("vocoder"):
        lines += ["", f"Vocoder alone ({results['vocoder'][0]['num_samples']} samples per clip; "
                  "real test audio vocoded and re-encoded, against the test split):", "",
                  "| vocoder | domain FAD of vocoded real audio | ms per clip |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {v['vocoder']} | {v['fad_vocoded_real']:.3g} | {v['ms_per_clip']:.2f} |"
                  for v in results["vocoder"]]
    if results.get("guidance_response"):
        lines += ["", "Response to the guidance scale ω (RMS change of the samples between the "
                  "ends of the ω range the student was distilled on, same conditions and noise; "
                  "the student's 1 step against its teacher's Heun; a student that ignores ω "
                  "scores 0 whatever its FID):", "",
                  "| model | ω | student | teacher | ratio |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {g['row']} | {g['omega'][0]:g} → {g['omega'][1]:g} | {g['rms']:.4g} | "
                  f"{g['teacher_rms']:.4g} | {g['ratio']:.3g} |"
                  for g in results["guidance_response"]]
    if results.get("calibration"):
        lines += ["", f"Where each CTM student's single jump starts: chosen on the train split "
                  f"(its {score_name} from each start, a seed the rows do not use; "
                  f"`gendistill calibrate`), so the test split above stays unseen; a start "
                  f"marked * was refused for its grain (above `grain_limit` in results.json: "
                  f"the default start's grain times 1 + `--max-grain-increase`) or a score "
                  f"that is not finite:", "",
                  "| student | training seed | start σ | train-split score from each start |",
                  "| --- | ---: | ---: | --- |"]
        lines += [f"| {k} | {seed} | {start_name(chosen_start(c))} | "
                  + ", ".join(f"{sigma}: {v:.3g}{'*' if sigma in c.get('refused', ()) else ''}"
                              for sigma, v in c["scores"].items()) + " |"
                  for k, by_seed in results["calibration"].items()
                  for seed, c in by_seed.items()]
    floor = rows[0].get("score_floor")
    if floor is not None:
        lines += ["", f"Reference: {score_name} of real data against real data = {floor:.4g}."]
    if results["train_seconds"]:
        busy = results.get("train_quiet", {})
        lines += ["", "Training time: " + ", ".join(
            f"{k} {v / 60:.1f} min" + (" (beside other work)" if busy.get(k) is False else "")
            for k, v in results["train_seconds"].items()) + "."]
    return "\n".join(lines) + "\n"
