"""Where a CTM student's single jump starts, chosen on validation data.

A student's 1-step quality depends on the noise level its jump starts from (README, "Where the
single jump starts"). The scheduler's default, sigma = 10, is one value for every student; a
student whose teacher was barely trained above sigma = 5 (the digits DiT) jumps better from
lower. ``calibrate_one_step_sigma`` scores the single jump from each candidate start on the
dataset's train split (its conditions and its real samples as the reference, from a seed the
evaluations do not use), so the start is chosen without looking at the test split that
``evaluate`` and the bench report. A start that wins on the score by adding grain (speckle in
the dark background or silent mel bins, which the classifier's features do not see) is not
chosen: only starts whose grain is within ``max_grain_increase`` of the default start's
(sigma = 10) compete.

Each start is tried twice: from noise (sigma z) and from the Gaussian start (sigma_max z
carried down by the data's Gaussian approximation, ``gendistill.models.start``, fitted here to
the train split), which keeps the jump's input on the data's marginal where pure noise is
not (digits' class means lie 0.6 sigma from zero at sigma = 10), so lower starts pay.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .evaluate import evaluate_pipeline

DEFAULT_STARTS = (80.0, 40.0, 20.0, 10.0, 7.0, 5.0, 3.0, 2.0, 1.5)
START_KINDS = ("noise", "gaussian")
CALIBRATION_SEED = 1000  # evaluations use seeds 0, 1, 2, ...
# train split, 1 step: the sound student's grain from 7 / 5 is 1.23x / 1.62x that from 10 where
# its FAD prefers 5; the digits DiT's from 7 1.04x (README, "Where the single jump starts")
MAX_GRAIN_INCREASE = 0.1


def reference_start(scheduler) -> float:
    """The start whose grain every choice is held to: the scheduler's default single jump
    (sigma = 10, or sigma_max below it)."""
    from ..pipelines.ctm import DEFAULT_ONE_STEP_SIGMA

    return min(DEFAULT_ONE_STEP_SIGMA, scheduler.config.sigma_max)


def candidate_starts(scheduler, starts=DEFAULT_STARTS, reference: float | None = None
                     ) -> list[float]:
    """The starts inside the student's range (sigma_min, sigma_max], a start above it taken as
    sigma_max, and ``reference`` when given, largest first."""
    cfg = scheduler.config
    kept = {min(float(s), cfg.sigma_max) for s in starts if s > cfg.sigma_min}
    if not kept:
        raise ValueError(f"no start in the student's range ({cfg.sigma_min:g}, "
                         f"{cfg.sigma_max:g}]: {', '.join(f'{s:g}' for s in starts)}")
    return sorted(kept | ({reference} if reference is not None else set()), reverse=True)


def grain_limit(sweep: list[dict], reference: float,
                max_grain_increase: float = MAX_GRAIN_INCREASE) -> float | None:
    """(1 + ``max_grain_increase``) times the grain of the row at sigma ``reference``; None (no
    limit) where ``max_grain_increase`` is infinite, or that row is missing or has no grain
    (the dataset has no grain measure, or the jump made nothing dark)."""
    if not math.isfinite(max_grain_increase):
        return None
    return next((row["grain"] * (1 + max_grain_increase) for row in sweep
                 if row["sigma"] == reference and row.get("start", "noise") == "noise"
                 and row.get("grain") is not None), None)


def mark_eligible(sweep: list[dict], limit: float | None) -> None:
    """Each row's ``eligible``: of a kind that competes (the grain reference is measured from
    noise even when only Gaussian starts compete), a finite score and, under a limit, a
    measured grain at most ``limit``."""
    for row in sweep:
        grain = row.get("grain")
        row["eligible"] = row.get("competes", True) and math.isfinite(row["score"]) and (
            limit is None or (grain is not None and grain <= limit))


def start_name(row: dict) -> str:
    """A sweep row's start as people read it: "10", or "3 (gaussian)"."""
    kind = row.get("start", "noise")
    return f"{row['sigma']:g}" + ("" if kind == "noise" else f" ({kind})")


def chosen_start(report: dict) -> dict:
    """A calibration's choice as a sweep row (``start_name`` reads it)."""
    return {"sigma": report["one_step_sigma"], "start": report.get("start", "noise")}


def fit_gaussian_start(pipe, dataset_name: str):
    """The Gaussian start of the dataset's train split in the pipeline's network space, per class
    for a class-conditional pipeline."""
    from ..data import load_dataset
    from ..models.start import GaussianStart

    train = load_dataset(dataset_name, "train")
    with torch.no_grad():
        x = pipe.encode(train.x.to(pipe.device, pipe.dtype)).cpu()
    if pipe.conditioning == "class":
        return GaussianStart.fit(x, train.y, train.num_classes).to(pipe.device)
    return GaussianStart.fit(x).to(pipe.device)


def best_start(sweep: list[dict]) -> dict:
    """The eligible row (``mark_eligible``) of lowest score."""
    eligible = [row for row in sweep if row["eligible"]]
    if not eligible:
        raise ValueError("no start has a finite score and at most the grain limit (the default "
                         "start's grain times 1 + max_grain_increase)")
    return min(eligible, key=lambda row: row["score"])


def calibrate_one_step_sigma(pipe, dataset_name: str, starts=DEFAULT_STARTS,
                             num_samples: int | None = None, seed: int = CALIBRATION_SEED,
                             progress: bool = True,
                             max_grain_increase: float = MAX_GRAIN_INCREASE,
                             kinds=START_KINDS, **call_kwargs) -> dict:
    """Score one jump from each start of each kind (``START_KINDS``) on the train split; return
    the sweep and the best start (``best_start``) as ``one_step_sigma`` and ``start``, and leave
    the pipeline sampling from it (its ``start`` component fitted, or None for noise). With a
    finite ``max_grain_increase`` the default start (from noise) is measured too and holds the
    others to its grain (``grain_limit``); None there means it gave no grain to hold them to (a
    dataset without the measure, or a failed jump), and the score alone chooses.
    ``call_kwargs`` go to the pipeline (guidance_scale)."""
    from tqdm.auto import tqdm

    from ..pipelines import CTMScheduler

    if not isinstance(pipe.scheduler, CTMScheduler):
        raise ValueError(f"calibration chooses a CTM student's start; this is a "
                         f"{type(pipe).__name__} with a {type(pipe.scheduler).__name__}")
    if not max_grain_increase >= 0:
        raise ValueError(f"max_grain_increase must be >= 0 (inf: no grain check), got "
                         f"{max_grain_increase}")
    unknown = set(kinds) - set(START_KINDS)
    if unknown or not kinds:
        raise ValueError(f"start kinds must be among {', '.join(START_KINDS)}, got "
                         f"{', '.join(map(str, kinds)) or 'none'}")
    sigma_min = pipe.scheduler.config.sigma_min
    reference = reference_start(pipe.scheduler) if math.isfinite(max_grain_increase) else None
    previous = "noise" if pipe.start is None else "gaussian"
    components = {"noise": None}
    if "gaussian" in kinds:
        components["gaussian"] = fit_gaussian_start(pipe, dataset_name)
    # the grain reference is a noise start: measured even when only Gaussian starts compete
    trials = [(kind, sigma) for kind in START_KINDS if kind in components
              for sigma in candidate_starts(pipe.scheduler, starts,
                                            reference if kind == "noise" else None)
              if (kind in kinds or sigma == reference)
              # from its sigma_max the Gaussian start is the noise itself: no second trial
              and not (kind == "gaussian" and sigma >= components[kind].config.sigma_max)]
    sweep, failed = [], []
    for kind, start in tqdm(trials, desc="starts", disable=not progress):
        pipe.register_modules(start=components[kind])
        try:
            result = evaluate_pipeline(pipe, dataset_name, num_samples, seed, split="train",
                                       progress=False, sigmas=[start, sigma_min], **call_kwargs)
        except ValueError as error:  # e.g. non-finite samples from this start: not a choice
            failed.append(f"sigma {start:g} ({kind}): {error}")
            continue
        sweep.append({"sigma": start, "start": kind, "score": result["score"],
                      "precision": result.get("precision"), "recall": result.get("recall"),
                      "grain": result.get("grain"), "competes": kind in kinds})
    if not any(math.isfinite(row["score"]) for row in sweep):
        raise ValueError(f"no start gave a finite score ({'; '.join(failed) or 'all NaN'})")
    limit = None if reference is None else grain_limit(sweep, reference, max_grain_increase)
    mark_eligible(sweep, limit)
    best = best_start(sweep)
    pipe.register_modules(start=components[best["start"]])
    return {"dataset": dataset_name, "split": "train", "seed": seed,
            "num_samples": result["num_samples"], "score_name": result["score_name"],
            "call_kwargs": call_kwargs, "max_grain_increase": max_grain_increase,
            "grain_reference": reference, "grain_limit": limit, "starts": sweep,
            "failed": failed,
            "previous_one_step_sigma": pipe.scheduler.config.one_step_sigma,
            "previous_start": previous, "kinds": list(kinds),
            "one_step_sigma": best["sigma"], "start": best["start"]}


def save_calibration(pipe, folder, report: dict) -> None:
    """Write the chosen start into the folder's scheduler (and its Gaussian start, or none) and
    the sweep beside it."""
    from ..pipelines import CTMScheduler
    from ..pipelines.remote import save_component

    folder = Path(folder)
    pipe.scheduler = CTMScheduler.from_config(pipe.scheduler.config,
                                              one_step_sigma=report["one_step_sigma"])
    pipe.scheduler.save_pretrained(folder / "scheduler")
    save_component(folder, "start", pipe.start)
    # written whole, then renamed: a crash leaves the old file or none, never half of one
    tmp = folder / f"calibration.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(folder / "calibration.json")
