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
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .evaluate import evaluate_pipeline

DEFAULT_STARTS = (80.0, 40.0, 20.0, 10.0, 7.0, 5.0)
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
                 if row["sigma"] == reference and row.get("grain") is not None), None)


def mark_eligible(sweep: list[dict], limit: float | None) -> None:
    """Each row's ``eligible``: a finite score and, under a limit, a measured grain at most
    ``limit``."""
    for row in sweep:
        grain = row.get("grain")
        row["eligible"] = math.isfinite(row["score"]) and (
            limit is None or (grain is not None and grain <= limit))


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
                             **call_kwargs) -> dict:
    """Score one jump from each start on the train split; return the sweep and the best start
    (``best_start``) as ``one_step_sigma``. With a finite ``max_grain_increase`` the default
    start is measured too and holds the others to its grain (``grain_limit``); None there means
    it gave no grain to hold them to (a dataset without the measure, or a failed jump), and the
    score alone chooses. ``call_kwargs`` go to the pipeline (guidance_scale)."""
    from tqdm.auto import tqdm

    from ..pipelines import CTMScheduler

    if not isinstance(pipe.scheduler, CTMScheduler):
        raise ValueError(f"calibration chooses a CTM student's start; this is a "
                         f"{type(pipe).__name__} with a {type(pipe.scheduler).__name__}")
    if not max_grain_increase >= 0:
        raise ValueError(f"max_grain_increase must be >= 0 (inf: no grain check), got "
                         f"{max_grain_increase}")
    sigma_min = pipe.scheduler.config.sigma_min
    reference = reference_start(pipe.scheduler) if math.isfinite(max_grain_increase) else None
    sweep, failed = [], []
    for start in tqdm(candidate_starts(pipe.scheduler, starts, reference), desc="starts",
                      disable=not progress):
        try:
            result = evaluate_pipeline(pipe, dataset_name, num_samples, seed, split="train",
                                       progress=False, sigmas=[start, sigma_min], **call_kwargs)
        except ValueError as error:  # e.g. non-finite samples from this start: not a choice
            failed.append(f"sigma {start:g}: {error}")
            continue
        sweep.append({"sigma": start, "score": result["score"],
                      "precision": result.get("precision"), "recall": result.get("recall"),
                      "grain": result.get("grain")})
    if not any(math.isfinite(row["score"]) for row in sweep):
        raise ValueError(f"no start gave a finite score ({'; '.join(failed) or 'all NaN'})")
    limit = None if reference is None else grain_limit(sweep, reference, max_grain_increase)
    mark_eligible(sweep, limit)
    best = best_start(sweep)
    return {"dataset": dataset_name, "split": "train", "seed": seed,
            "num_samples": result["num_samples"], "score_name": result["score_name"],
            "call_kwargs": call_kwargs, "max_grain_increase": max_grain_increase,
            "grain_reference": reference, "grain_limit": limit, "starts": sweep,
            "failed": failed,
            "previous_one_step_sigma": pipe.scheduler.config.one_step_sigma,
            "one_step_sigma": best["sigma"]}


def save_calibration(pipe, folder, report: dict) -> None:
    """Write the chosen start into the folder's scheduler and the sweep beside it."""
    from ..pipelines import CTMScheduler

    folder = Path(folder)
    pipe.scheduler = CTMScheduler.from_config(pipe.scheduler.config,
                                              one_step_sigma=report["one_step_sigma"])
    pipe.scheduler.save_pretrained(folder / "scheduler")
    # written whole, then renamed: a crash leaves the old file or none, never half of one
    tmp = folder / f"calibration.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(folder / "calibration.json")
