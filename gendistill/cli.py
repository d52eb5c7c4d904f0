"""The ``gendistill`` command: train, generate, evaluate, calibrate, train-classifier, bench, demo.

Bad input (unknown config key, wrong type, missing file) prints one line naming it and exits 2;
a training that cannot go on (non-finite steps, nothing to resume, a locked or foreign
output_dir) prints one line and exits 3.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time

USAGE_ERROR = 2
TRAINING_ERROR = 3


class UsageError(Exception):
    pass


def set_threads(n: int):
    check_flag("--threads", n)
    import torch

    torch.set_num_threads(n)


def cmd_train(args) -> int:
    from .config import load_config
    from .train import run_training

    cfg = load_config(args.config, args.overrides)
    if args.threads is not None and cfg.train.threads is None:
        cfg.train.threads = args.threads
    folder = run_training(cfg)
    from .training.loop import is_first_process

    if is_first_process():  # one line, not one per process
        print(f"saved {folder}")
    return 0


def _load_model(path: str):
    from .pipelines import load_pipeline

    if not Path(path).is_dir():
        raise UsageError(f"model folder not found: {path}")
    # a run's output_dir stands for its model/
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# the allowed range of each numeric flag (a finite number inside it)
FLAG_RANGES = {"--steps": (1, 1000), "--guidance": (0.0, 100.0), "--gamma": (0.0, 1.0),
               "--nu": (0.0, 2.0), "--seed": (0, 2 ** 32 - 1), "--batch-size": (1, 65536),
               "--threads": (1, 4096)}


def check_flag(flag: str, value, low=None, high=None):
    """One-line error for a flag that is not finite or outside its range."""
    if value is None:
        return
    low, high = (low, high) if low is not None else FLAG_RANGES[flag]
    if not math.isfinite(value) or not low <= value <= high:
        raise UsageError(f"{flag}: {value} is out of range [{low}, {high}]")


def seed_list(text: str) -> tuple[int, ...]:
    """``0,1,2`` -> (0, 1, 2): distinct seeds in the range of ``--seed``."""
    low, high = FLAG_RANGES["--seed"]
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if len(set(seeds)) < len(seeds) or not all(low <= s <= high for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be distinct, in [{low}, {high}]")
    return seeds


def sigma_list(text: str) -> tuple[float, ...]:
    """``80,20,10`` -> (80.0, 20.0, 10.0): positive, finite noise levels."""
    try:
        sigmas = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")
    if not all(math.isfinite(s) and s > 0 for s in sigmas):
        raise argparse.ArgumentTypeError(f"{text!r}: noise levels must be finite and > 0")
    return sigmas


def start_kinds(text: str) -> tuple[str, ...]:
    """``noise,gaussian`` -> ("noise", "gaussian"): what a CTM student's jump may start from."""
    from .eval.calibrate import START_KINDS

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or set(kinds) - set(START_KINDS):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(START_KINDS)}, got "
                                         f"{text!r}")
    return kinds


def check_condition_flags(pipe, args):
    """--class for class-conditional models (a label they know), --prompt for text ones."""
    from .pipelines.base import null_class

    if args.class_label is not None:
        if pipe.conditioning != "class":
            raise UsageError(f"--class: the model is {pipe.conditioning}-conditional"
                             + (" (give --prompt TEXT)" if pipe.conditioning == "text" else ""))
        check_flag("--class", args.class_label, 0, null_class(pipe.network) - 1)
    if args.prompt is not None and pipe.conditioning != "text":
        raise UsageError(f"--prompt: the model is {pipe.conditioning}-conditional"
                         + (" (give --class N)" if pipe.conditioning == "class" else ""))


def accepts(pipe, argument: str) -> bool:
    """Whether the model's pipeline call takes ``argument``."""
    return argument in inspect.signature(type(pipe).__call__).parameters


def sampling_kwargs(pipe, args) -> dict:
    """Pipeline call arguments from the sampling flags; a flag the model's pipeline does not
    take (--sampler for a CTM student, --gamma for a teacher) is a usage error."""
    for flag in ("--steps", "--guidance", "--gamma", "--nu", "--seed"):
        check_flag(flag, getattr(args, flag[2:]))
    kwargs = {}
    for flag, value, key in (("--steps", args.steps, "num_inference_steps"),
                             ("--guidance", args.guidance, "guidance_scale"),
                             ("--sampler", args.sampler, "sampler"),
                             ("--gamma", args.gamma, "gamma"), ("--nu", args.nu, "nu")):
        if value is None:
            continue
        if not accepts(pipe, key):
            raise UsageError(f"{flag} does not apply to {type(pipe).__name__} models")
        kwargs[key] = value
    return kwargs


def add_sampling_flags(p: argparse.ArgumentParser):
    p.add_argument("--steps", type=int, metavar="N",
                   help="solver steps (teacher default 18) or student jumps (CTM default 1)")
    p.add_argument("--guidance", type=float, metavar="W", help="CFG scale w (1 = none)")
    p.add_argument("--sampler", choices=["heun", "euler"], help="teacher ODE solver (heun)")
    p.add_argument("--gamma", type=float, metavar="G",
                   help="CTM gamma-sampling: 0 deterministic .. 1 consistency multistep")
    p.add_argument("--nu", type=float, metavar="NU",
                   help="CTM nu-interpolation between unconditional (0) and conditional (1)")


def read_array(flag: str, path: str):
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag}: cannot read {path} as a .npy array ({e})") from None
    if not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"{flag}: {path} holds {array.dtype}, not numbers")
    return array


def mask_from_flag(spec: str, pipe):
    """--mask: a .npy (n_mels, frames) array in [0, 1], or LO:HI, the mel bins to mark (all
    frames)."""
    import torch

    from .pipelines.control import band_mask

    if spec.endswith(".npy"):
        return torch.as_tensor(read_array("--mask", spec), dtype=torch.float)
    try:
        low, high = (int(v) for v in spec.split(":"))
    except ValueError:
        raise UsageError(f"--mask: give FILE.npy or LO:HI mel bins, got {spec!r}") from None
    try:
        return band_mask(pipe.vocoder.config.n_mels, pipe.vocoder.num_frames, low, high)
    except ValueError as err:
        raise UsageError(f"--mask: {err}") from None


def control_from_args(pipe, args):
    """A control object from --loudness / --mask (None without them)."""
    from .pipelines.control import LoudnessControl, SpectralMaskControl, control_unsupported

    if args.loudness is None and args.mask is None:
        return None
    flag = "--loudness" if args.loudness is not None else "--mask"
    if getattr(pipe, "vocoder", None) is None or not accepts(pipe, "control"):
        raise UsageError(f"{flag}: training-free control needs an audio CTM student")
    if (why := control_unsupported(pipe)) is not None:
        raise UsageError(f"{flag}: {why}")
    check_flag("--control-steps", args.control_steps, 1, 10_000)
    common = dict(method=args.control_method, steps=args.control_steps)
    if args.loudness is not None:
        return LoudnessControl(target=read_array(flag, args.loudness), **common)
    return SpectralMaskControl(mask=mask_from_flag(args.mask, pipe), keep=args.mask_keep,
                               **common)


def cmd_generate(args) -> int:
    from .generate import sample, write_samples

    check_flag("--num-samples", args.num_samples, 1, 10_000)
    pipe = _load_model(args.model_dir)
    pipe.set_progress_bar_config(disable=args.no_progress, desc="sampling", leave=False)
    kwargs = sampling_kwargs(pipe, args)
    check_condition_flags(pipe, args)
    if args.negative_prompt is not None:
        if not accepts(pipe, "negative_prompt"):
            raise UsageError(f"--negative-prompt does not apply to {type(pipe).__name__} models")
        kwargs["negative_prompt"] = args.negative_prompt
    control = control_from_args(pipe, args)
    if control is not None:
        kwargs["control"] = control
    classes = [args.class_label] if args.class_label is not None else None
    prompts = [args.prompt] if args.prompt is not None else None
    output = sample(pipe, classes, prompts, args.num_samples, args.seed, **kwargs)
    rows = 1 if classes or prompts else max(1, len(output.conditions) // args.num_samples)
    for path in write_samples(pipe, output, args.out, rows=rows):
        print(f"wrote {path}")
    if control is not None:
        error = control.error(pipe.vocoder(output.latents.float()), pipe.vocoder)
        print("control: " + ", ".join(f"{k} {v:.4g}" for k, v in error.items()))
    if output.students is not None:  # MSD: which student answered each condition
        answered = dict(zip(output.conditions, output.students))
        print("; ".join(f"{c!r}: student {k}" for c, k in answered.items()))
    return 0


def write_json(path: str, obj) -> None:
    """A results file, its folder made if needed."""
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2) + "\n")


def cmd_evaluate(args) -> int:
    from .eval.evaluate import _check_dataset, evaluate_pipeline, summary_line

    _check_dataset(args.dataset)
    check_flag("--num-samples", args.num_samples, 2, 1_000_000)
    check_flag("--batch-size", args.batch_size)
    pipe = _load_model(args.model_dir)
    kwargs = sampling_kwargs(pipe, args)
    result = evaluate_pipeline(pipe, args.dataset, args.num_samples, args.seed,
                               batch_size=args.batch_size,
                               inception_weights=args.inception_weights,
                               vggish_weights=args.vggish_weights, clap_model=args.clap_model,
                               progress=not args.no_progress, **kwargs)
    result = {"model": str(args.model_dir), **result}
    write_json(args.out, result)
    print(summary_line(result))
    print(f"wrote {args.out}")
    return 0


def cmd_calibrate(args) -> int:
    from .eval.calibrate import (DEFAULT_STARTS, START_KINDS, calibrate_one_step_sigma,
                                 chosen_start, save_calibration, start_name)
    from .eval.evaluate import _check_dataset
    from .pipelines import model_folder

    _check_dataset(args.dataset)
    check_flag("--num-samples", args.num_samples, 2, 1_000_000)
    check_flag("--guidance", args.guidance)
    check_flag("--seed", args.seed)
    pipe = _load_model(args.model_dir)
    kwargs = {} if args.guidance is None else {"guidance_scale": args.guidance}
    if args.max_grain_increase is not None:
        kwargs["max_grain_increase"] = args.max_grain_increase
    report = calibrate_one_step_sigma(pipe, args.dataset, args.starts or DEFAULT_STARTS,
                                      args.num_samples, args.seed,
                                      progress=not args.no_progress,
                                      kinds=args.start_kinds or START_KINDS,
                                      **kwargs)
    limit = report["grain_limit"]
    for row in report["starts"]:
        grain = "" if row["grain"] is None else f", grain {row['grain']:.4g}"
        if not row["eligible"]:
            above = limit is not None and row["grain"] is not None and row["grain"] > limit
            grain += f": above {limit:.4g}, not a choice" if above else ": not a choice"
        print(f"start sigma {start_name(row)}: {report['score_name']} {row['score']:.4g} "
              f"(train split){grain}")
    if (limit is None and report["grain_reference"] is not None
            and any(row["grain"] is not None for row in report["starts"])):
        print(f"no grain check: the start {report['grain_reference']:g} gave no grain to hold "
              f"the others to; chosen by {report['score_name']} alone")
    if args.out:
        write_json(args.out, report)
    best = chosen_start(report)
    folder = model_folder(args.model_dir)
    if args.dry_run:
        print(f"best start: {start_name(best)} (not saved: --dry-run)")
        return 0
    try:
        save_calibration(pipe, folder, report)
    except OSError as error:  # e.g. a read-only installed package
        raise UsageError(f"cannot write the calibration into {folder}: {error}") from None
    previous = report["previous_one_step_sigma"]
    before = {"sigma": previous, "start": report["previous_start"]}
    start = f", {folder / 'start'}" if report["start"] == "gaussian" else ""
    print(f"one_step_sigma {'sigma_max' if previous is None else start_name(before)} -> "
          f"{start_name(best)}: wrote {folder / 'scheduler'}{start} and "
          f"{folder / 'calibration.json'}")
    return 0


def cmd_train_classifier(args) -> int:
    import json

    from .eval.classifier import train_classifier

    folder = train_classifier(args.name, out_dir=args.out, epochs=args.epochs, seed=args.seed,
                              progress=not args.no_progress)
    cfg = json.loads((folder / "config.json").read_text())
    print(f"{args.name} classifier: test accuracy {cfg['test_accuracy']:.4f} "
          f"(train {cfg['train_accuracy']:.4f})")
    print(f"saved {folder}")
    return 0


def cmd_bench(args) -> int:
    from .eval.bench import run_bench

    run_bench(args.preset, Path(args.out), quick=args.quick, cache_dir=Path(args.cache),
              seeds=args.seeds, eval_seeds=args.eval_seeds)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), retrain=args.retrain, distill=not args.no_distill)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit code 2 as before."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gendistill", description=(
        "Distil diffusion teachers into 1-step generators (CTM / SoundCTM, MSD)."))
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: the cores divided among the local "
                   "training processes; 1 when another busy process shares the cores). For "
                   "train, train.threads=N in the config does the same")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a teacher or a student from a YAML config",
                       description="Train the method the config names. Overrides are dotted "
                       "key=value pairs, e.g. train.max_steps=100 output_dir=runs/x.")
    t.add_argument("config", help="YAML config, e.g. configs/teacher/digits.yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample a saved model folder to PNG / WAV / NPZ",
                       description="Sample a model folder. Images -> PNG grid (one row per class "
                       "when no --class is given), audio -> WAV (+ spectrogram PNG), 2-D -> "
                       "scatter PNG; any kind -> .npz (x plus y or captions).")
    g.add_argument("model_dir", help="a folder written by gendistill train")
    cond = g.add_mutually_exclusive_group()
    cond.add_argument("--class", dest="class_label", type=int, metavar="N",
                      help="class label (default: every class, one row each)")
    cond.add_argument("--prompt", metavar="TEXT", help="text prompt (text-conditional models)")
    g.add_argument("--num-samples", type=int, default=8, metavar="N",
                   help="samples per condition (default 8)")
    add_sampling_flags(g)
    g.add_argument("--negative-prompt", metavar="TEXT", help="CTM students: nu interpolates "
                   "from this prompt instead of the empty one (needs --nu other than 1)")
    ctrl = g.add_argument_group("training-free control (audio CTM students)")
    steer = ctrl.add_mutually_exclusive_group()
    steer.add_argument("--loudness", metavar="FILE.npy", help="target RMS envelope, one value "
                       "per frame (resampled to the output's frames)")
    steer.add_argument("--mask", metavar="FILE.npy|LO:HI", help="spectral mask: an (n_mels, "
                       "frames) array in [0, 1], or the mel bins LO:HI over all frames")
    ctrl.add_argument("--mask-keep", choices=["inside", "outside"], default="inside",
                      help="keep the energy inside the mask (default) or out of it")
    ctrl.add_argument("--control-method", choices=["noise", "guided"], default="noise",
                      help="noise: optimise the initial noise through the 1-step student "
                      "(default); guided: loss-guided gamma-sampling (needs --steps >= 2)")
    ctrl.add_argument("--control-steps", type=int, default=20, metavar="N",
                      help="gradient steps of the control (default 20)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--out", required=True, metavar="PATH", help="output .png, .wav or .npz")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="score a model folder on a built-in dataset -> JSON",
                       description="Generate samples spread evenly over the dataset's conditions "
                       "and score them: toy2d -> RBF-MMD² at the modes' scale + sliced W2 vs the "
                       "true distribution; digits -> domain FID vs the test split + conditional "
                       "accuracy + grain; synthsounds -> domain FAD + conditional accuracy (test "
                       "captions) + the pitch and loudness the captions name + grain + "
                       "modulation depth; every dataset -> k-NN precision / recall (k = 5; in "
                       "the domain classifier's features for digits and synthsounds). NFE is "
                       "counted from real network calls.")
    e.add_argument("model_dir", help="a model folder (gendistill train output or diffusers)")
    e.add_argument("--dataset", required=True, metavar="NAME", help="toy2d, digits or synthsounds")
    e.add_argument("--num-samples", type=int, metavar="N", help="samples in all (default: "
                   "toy2d 2000, digits 1000, synthsounds 384)")
    add_sampling_flags(e)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="samples per pipeline call (default 256)")
    e.add_argument("--inception-weights", metavar="FILE", help="digits: also standard "
                   "Inception FID with this torch-fidelity Inception weights file")
    e.add_argument("--vggish-weights", metavar="FILE", help="synthsounds: also FAD with a "
                   "VGGish state_dict (.pt / .pth / .safetensors)")
    e.add_argument("--clap-model", metavar="DIR", help="synthsounds: also FAD with a "
                   "transformers CLAP checkpoint folder")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--out", required=True, metavar="PATH", help="results .json")
    e.set_defaults(func=cmd_evaluate)

    k = sub.add_parser("calibrate", help="choose where a CTM student's single jump starts",
                       description="Score a CTM student's 1-step samples from each start "
                       "(--starts) on the dataset's train split, never the test split that "
                       "evaluate reports, and write the best start into the folder's scheduler "
                       "(one_step_sigma) with the sweep in calibration.json. Each start is "
                       "tried from noise and from the Gaussian start (the train split's "
                       "Gaussian approximation carries sigma_max noise down to it); a winning "
                       "Gaussian start is saved as the folder's start/ component.")
    k.add_argument("model_dir", help="a CTM student folder (or its run's output_dir)")
    k.add_argument("--dataset", required=True, metavar="NAME",
                   help="toy2d, digits or synthsounds")
    k.add_argument("--starts", type=sigma_list, metavar="S,S,...",
                   help="candidate noise levels (default 80,40,20,10,7,5,3,2,1.5; above the "
                   "student's sigma_max: its sigma_max)")
    k.add_argument("--start-kinds", type=start_kinds, metavar="K,K",
                   help="what a jump starts from: noise, gaussian or both (default "
                   "noise,gaussian)")
    k.add_argument("--guidance", type=float, metavar="W",
                   help="CFG scale to calibrate at (default: the pipeline's own)")
    k.add_argument("--num-samples", type=int, metavar="N",
                   help="samples per start (default: as evaluate)")
    k.add_argument("--seed", type=int, default=1000, help="default 1000: evaluations use 0, 1, "
                   "2, ...")
    k.add_argument("--max-grain-increase", type=float, metavar="F",
                   help="only starts whose grain (digits, synthsounds) is at most 1 + F times "
                   "the grain from the default start (sigma 10, or sigma_max below it) "
                   "compete (default 0.1; inf: no grain check)")
    k.add_argument("--dry-run", action="store_true", help="report, do not change the folder")
    k.add_argument("--out", metavar="PATH", help="also write the sweep to this .json")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(func=cmd_calibrate)

    c = sub.add_parser("train-classifier", help="train a domain classifier for the metrics",
                       description="Train the small CNN behind domain FID / FAD and conditional "
                       "accuracy on a built-in dataset's train split; report its test accuracy. "
                       "Writes gendistill/assets/classifiers/NAME unless --out is given.")
    c.add_argument("name", help="digits or synthsounds")
    c.add_argument("--epochs", type=int, metavar="N", help="training epochs (recipe default)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", metavar="DIR", help="output folder (default: the shipped asset)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_train_classifier)

    b = sub.add_parser("bench", help="train/reuse teacher + students of a preset, measure all",
                       description="Train (or reuse, cached by config hash) the preset's teacher "
                       "and students, evaluate every row in one process, and write results.json, "
                       "results.md and plots into --out.")
    from .eval.bench import PRESETS

    b.add_argument("preset", choices=list(PRESETS))
    b.add_argument("--quick", action="store_true",
                   help="short trainings and fewer samples (a few minutes on a CPU)")
    b.add_argument("--out", required=True, metavar="DIR", help="results folder")
    b.add_argument("--cache", default="runs/bench-cache", metavar="DIR",
                   help="where trained models are cached (default runs/bench-cache)")
    b.add_argument("--seeds", type=seed_list, metavar="S,S,...",
                   help="train every student from each of these seeds and report the mean and "
                   "spread (default: the preset's, e.g. 0,1,2 for the digits ctm student)")
    b.add_argument("--eval-seeds", type=seed_list, metavar="S,S,...",
                   help="evaluate every row from each of these seeds (default: the preset's)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the main job: teacher samples, CTM distillation, table",
                       description="Sample the shipped digits and toy2d teachers (or --retrain "
                       "them), distil the digits teacher into 1-step CTM students and write the "
                       "teacher-vs-student grid and the benchmark table (bench digits --quick).")
    d.add_argument("--out", default="samples", help="output folder (default samples/)")
    d.add_argument("--no-distill", action="store_true",
                   help="only the teacher samples (skip the CTM distillation and its table)")
    d.add_argument("--retrain", action="store_true", help="train the teachers instead of "
                   "loading the shipped ones")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError
    from .data import DataError
    from .training import TrainingError

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # "Loading pipeline components" / "Loading weights" (a teacher's text encoder) are noise here
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        if args.threads is not None:
            set_threads(args.threads)
        return args.func(args)
    except TrainingError as e:  # a run that cannot go on: its saved checkpoints stay as they were
        print(f"gendistill {args.command}: error: {e}", file=sys.stderr)
        return TRAINING_ERROR
    except (UsageError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"gendistill {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except ValueError as e:
        print(f"gendistill {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        end_process_group()


def end_process_group():
    """Tear down a multi-process run's group on every way out, errors included: a gloo group
    left to the interpreter's exit can abort the process ("terminate called without an active
    exception") after the run itself has finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
