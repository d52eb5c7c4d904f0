"""The GPU paths in one short run, for a machine with a CUDA GPU (nothing else needs one).

For each precision / attention / compile setting it distils the shipped digits teacher for a few
CTM steps (the teacher always in fp32, whatever the setting), records its steps per second (the
training loop's own clock; compilation included) and checks that the saved student loads and samples finite digits; then it times the
teacher (Heun 18) and a 1-step student per sample. One JSON report:

    python scripts/gpu_check.py --out runs/gpu-check.json [--steps 40]

``--device cpu`` runs the same script on a CPU (fp32 and bf16 only) to check the script itself.
A setting that fails (fp16 on a CPU, xformers not installed) is recorded with its error and the
others still run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SETTINGS = {
    "fp32": [],
    "bf16": ["train.mixed_precision=bf16"],
    "fp16": ["train.mixed_precision=fp16"],
    "bf16+xformers": ["train.mixed_precision=bf16", "train.xformers=true"],
    "bf16+compile": ["train.mixed_precision=bf16", "train.compile=true"],
}
CPU_SETTINGS = ("fp32", "bf16")


def distil(name: str, overrides: list[str], steps: int, work: Path, cpu: bool) -> dict:
    """One short CTM run in its own process (accelerate's state is one per process)."""
    out = work / name
    command = [sys.executable, "-m", "gendistill", "train", "configs/ctm/digits.yaml",
               f"output_dir={out}", f"train.max_steps={steps}", "train.checkpoint_every=0",
               "train.overwrite=true", f"train.log_every={steps}",
               f"train.cpu={str(cpu).lower()}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        return {"error": lines[-1], "exit_code": proc.returncode}
    loop = json.loads((out / "train_time.json").read_text())["seconds"]
    return {"wall_seconds": round(seconds, 1), "loop_seconds": loop,
            "steps_per_second": round(steps / max(loop, 1e-9), 3),
            "model": str(out / "model"), **sample_check(out / "model", cpu)}


def sample_check(model: Path, cpu: bool) -> dict:
    from gendistill.pipelines import load_pipeline

    pipe = load_pipeline(model).to("cpu" if cpu else "cuda")
    pipe.set_progress_bar_config(disable=True)
    x = pipe(class_labels=list(range(10)), guidance_scale=1.0, output_type="latent").latents
    return {"samples_finite": bool(torch.isfinite(x).all()),
            "samples_range": [round(float(x.min()), 3), round(float(x.max()), 3)]}


def sampling_speed(student: Path | None, cpu: bool, batch: int) -> dict:
    from gendistill.assets import ASSETS
    from gendistill.eval.bench import time_pipelines
    from gendistill.pipelines import load_pipeline

    device = "cpu" if cpu else "cuda"
    labels = [i % 10 for i in range(batch)]

    def ms_per_sample(pipe, call: dict) -> float:
        pipe.set_progress_bar_config(disable=True)
        return round(time_pipelines([(pipe.to(device), call)], labels, repeats=5)[0][1], 4)

    report = {"batch": batch, "teacher_heun18_ms": ms_per_sample(
        load_pipeline(ASSETS / "teachers" / "digits"), {"num_inference_steps": 18})}
    for dtype in (torch.float32, torch.bfloat16):
        report[f"student_1step_ms_{str(dtype).split('.')[1]}"] = ms_per_sample(
            load_pipeline(student or ASSETS / "students" / "digits", dtype=dtype),
            {"num_inference_steps": 1, "guidance_scale": 1.0})
    report["speedup_fp32"] = round(report["teacher_heun18_ms"]
                                   / report["student_1step_ms_float32"], 1)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check.json"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256, help="batch of the speed timing")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here (use --device cpu to check the script)")
    work = args.out.parent / (args.out.stem + "-runs")
    report = {"device": "cpu" if cpu else torch.cuda.get_device_name(0),
              "torch": torch.__version__, "steps": args.steps, "settings": {}}
    for name, overrides in SETTINGS.items():
        if cpu and name not in CPU_SETTINGS:
            continue
        print(f"== {name}", flush=True)
        report["settings"][name] = distil(name, overrides, args.steps, work, cpu)
        print(json.dumps(report["settings"][name]), flush=True)
    trained = report["settings"].get("bf16", {}).get("model")
    report["sampling"] = sampling_speed(Path(trained) if trained else None, cpu, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["sampling"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
