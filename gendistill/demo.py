"""The main job (``make demo``).

1. the digits teacher's class-by-row grid (Heun, 18 steps) and the toy2d teacher's scatter plot;
2. the shipped, fully distilled 1-step CTM students beside their teachers (the real result);
   for text-to-sound, WAVs of the shipped SoundCTM student and the teacher on the same prompts
   and a spectrogram sheet comparing them;
3. a quick CTM distillation of the digits teacher run here and now (``gendistill bench digits
   --quick``: 120 steps, minutes), labelled as such: it shows the machinery, not the quality.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .assets import builtin_student, builtin_teacher
from .config import REPO_ROOT, load_config
from .data import load_dataset
from .generate import sample, write_samples
from .pipelines import TeacherPipeline, load_pipeline
from .plots import save_scatter, save_spectrograms


def teacher_folder(name: str, retrain: bool) -> Path:
    if not retrain:
        return builtin_teacher(name)
    from .train import run_training

    cfg = load_config(REPO_ROOT / "configs" / "teacher" / f"{name}.yaml",
                      [f"output_dir=runs/demo-teacher-{name}"])
    return run_training(cfg)


def teacher_samples(out: Path, retrain: bool):
    with torch.no_grad():
        start = time.time()
        digits = TeacherPipeline.from_pretrained(teacher_folder("digits", retrain))
        digits.set_progress_bar_config(disable=True)
        result = sample(digits, num_per_condition=10, seed=0, num_inference_steps=18)
        write_samples(digits, result, out / "digits_teacher.png", rows=10)
        print(f"wrote {out / 'digits_teacher.png'}: 10 classes x 10 samples, Heun 18 steps "
              f"(35 network calls each), {time.time() - start:.1f}s")

        start = time.time()
        toy = TeacherPipeline.from_pretrained(teacher_folder("toy2d", retrain))
        toy.set_progress_bar_config(disable=True)
        result = sample(toy, num_per_condition=1000, seed=0, num_inference_steps=18)
        truth = load_dataset("toy2d", "test")
        labels = torch.tensor(result.conditions)
        save_scatter(out / "toy2d_teacher.png", result.latents.numpy(), labels.numpy(),
                     truth.class_names, title="toy2d teacher, Heun 18 steps",
                     reference=truth.sample_true(labels, torch.Generator().manual_seed(0)).numpy(),
                     ref_labels=labels.numpy())
        print(f"wrote {out / 'toy2d_teacher.png'}: 4 classes x 1000 samples, "
              f"{time.time() - start:.1f}s")


def shipped_students(out: Path):
    """The shipped 1-step students beside their shipped teachers, same conditions and seed."""
    from .eval.bench_plots import plot_samples

    for name in ("toy2d", "digits"):
        start = time.time()
        teacher, student = (load_pipeline(f) for f in (builtin_teacher(name),
                                                         builtin_student(name)))
        for pipe in (teacher, student):
            pipe.set_progress_bar_config(disable=True)
        path = out / f"{name}_teacher_vs_ctm.png"
        with torch.no_grad():
            plot_samples(name, {"teacher, Heun 18 steps (35 calls)":
                                (teacher, {"num_inference_steps": 18, "sampler": "heun"}),
                                "CTM student, 1 step (1 call)":
                                (student, {"num_inference_steps": 1})}, path)
        print(f"wrote {path}: shipped teacher vs shipped 1-step CTM student, "
              f"{time.time() - start:.1f}s")


DEMO_PROMPTS = ["a loud high siren, fast", "a quiet low tone, slow", "a loud mid chirp, fast",
                "noise burst sound, high pitch, loud and slow", "a quiet high pluck, fast",
                "a loud low tremolo, slow"]


def text_to_sound(out: Path):
    """The shipped synthsounds teacher (Heun 18 steps, omega 3.5) and its 1-step SoundCTM
    student on the same prompts and seed: WAVs of both and one spectrogram sheet."""
    from .eval.bench_plots import write_wavs

    start = time.time()
    teacher, student = (load_pipeline(f) for f in (builtin_teacher("synthsounds"),
                                                     builtin_student("synthsounds")))
    folder = out / "text_to_sound"
    rows = {}
    for name, wavs, pipe, call in (
            ("teacher, Heun 18 steps", "teacher", teacher,
             {"num_inference_steps": 18, "sampler": "heun"}),
            ("SoundCTM student, 1 step", "student", student, {"num_inference_steps": 1})):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            result = sample(pipe, None, DEMO_PROMPTS, 1, 0, guidance_scale=3.5, **call)
        rows[name] = result.latents.float()
        write_wavs(folder / wavs, pipe.vocoder(rows[name]), pipe.vocoder.config.sample_rate,
                   DEMO_PROMPTS)
    save_spectrograms(folder / "teacher_vs_soundctm.png",
                      {k: v.numpy() for k, v in rows.items()}, [p[:28] for p in DEMO_PROMPTS])
    print(f"wrote {folder}: WAVs of the shipped teacher and 1-step SoundCTM student (omega 3.5) "
          f"on {len(DEMO_PROMPTS)} prompts and teacher_vs_soundctm.png, "
          f"{time.time() - start:.1f}s")


def run_demo(out: Path, retrain: bool = False, distill: bool = True):
    from .eval.bench import PRESETS, run_bench

    out.mkdir(parents=True, exist_ok=True)
    teacher_samples(out, retrain)
    shipped_students(out)
    text_to_sound(out)
    if not distill:
        return
    bench_dir = out / "demo-digits-quick"
    print("quick distillation of the digits teacher (120 steps: the machinery, not the "
          "quality of the shipped student)")
    # the EDM teacher's rows: the other teachers' students would triple the demo's time
    results = run_bench(PRESETS["digits"].main_teacher_only(), bench_dir, quick=True,
                        cache_dir=Path("runs/demo-cache"))
    print(f"wrote {bench_dir / 'samples.png'} (teacher rows vs the quick CTM student's rows)")
    print((bench_dir / "results.md").read_text())
    return results
