"""End to end through the ``gendistill`` command, in subprocesses as a user runs it."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gendistill.cli import main


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "gendistill", *args], capture_output=True,
                          text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if check and proc.returncode != 0:
        raise AssertionError(f"gendistill {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    run("train", "configs/teacher/toy2d.yaml", f"output_dir={out}", "train.max_steps=12",
        "train.checkpoint_every=6", "train.batch_size=64", "network.width=32", "network.depth=2")
    return out


def test_train_writes_a_diffusers_folder_and_checkpoints(toy_teacher):
    index = json.loads((toy_teacher / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "TeacherPipeline"
    assert index["scheduler"] == ["diffusers", "EDMEulerScheduler"]
    assert (toy_teacher / "checkpoints" / "step-6" / "model" / "model_index.json").is_file()
    assert any((toy_teacher / "logs").rglob("events.out.tfevents.*"))
    assert json.loads((toy_teacher / "config.json").read_text())["train"]["max_steps"] == 12


def test_resume_continues_from_the_checkpoint(toy_teacher):
    proc = run("-v", "train", "configs/teacher/toy2d.yaml", f"output_dir={toy_teacher}",
               "train.max_steps=15", "train.checkpoint_every=6", "train.batch_size=64",
               "network.width=32", "network.depth=2", "train.resume=true")
    assert "at step 6" in proc.stderr  # the newest checkpoint is step-6 (12 was the end)
    assert json.loads((toy_teacher / "train_time.json").read_text())["steps"] == 15


def test_generate_png_and_npz(toy_teacher, tmp_path):
    model = toy_teacher / "model"
    run("generate", str(model), "--num-samples", "5", "--steps", "3", "--out",
        str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000
    run("generate", str(model), "--class", "2", "--num-samples", "6", "--steps", "3",
        "--sampler", "euler", "--guidance", "2.0", "--out", str(tmp_path / "s.npz"))
    arr = np.load(tmp_path / "s.npz")
    assert arr["x"].shape == (6, 2) and arr["y"].tolist() == [2] * 6


@pytest.mark.parametrize("args, needle", [
    (["train", "configs/teacher/toy2d.yaml", "train.max_stepz=3"], "unknown key 'train.max_stepz'"),
    (["train", "configs/teacher/toy2d.yaml", "seed=x"], "seed: expected int, got 'x'"),
    (["train", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "configs/teacher/toy2d.yaml", "data.name=npz", "data.path=/no/such.npz"],
     "data file not found: /no/such.npz"),
    (["generate", "/no/model", "--out", "x.png"], "model folder not found: /no/model"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
def test_xformers_on_cpu_is_a_clear_error(capsys):
    assert main(["train", "configs/teacher/toy2d.yaml", "train.xformers=true",
                 "train.max_steps=1"]) == 2
    assert "train.xformers=true needs a CUDA GPU" in capsys.readouterr().err


def test_help_on_every_command():
    for cmd in ([], ["train"], ["generate"], ["demo"]):
        proc = run(*cmd, "--help")
        assert "usage: gendistill" in proc.stdout


def test_generate_rejects_class_out_of_range(toy_teacher, capsys):
    assert main(["generate", str(toy_teacher / "model"), "--class", "9", "--out", "x.png"]) == 2
    assert "--class: 9 is out of range [0, 3]" in capsys.readouterr().err


def test_text_to_sound_teacher_end_to_end(tmp_path):
    """synthsounds: MiniLM captions -> UNet2DConditionModel teacher -> WAV via Griffin-Lim."""
    import soundfile as sf

    run("train", "configs/teacher/synthsounds.yaml", f"output_dir={tmp_path}",
        "train.max_steps=3", "train.batch_size=8", "network.channels=[8,16]")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder_name"] == "all-MiniLM-L6-v2"
    run("generate", str(tmp_path / "model"), "--prompt", "a loud fast siren", "--num-samples",
        "2", "--steps", "2", "--guidance", "3", "--out", str(tmp_path / "siren.wav"))
    wave, rate = sf.read(tmp_path / "siren-000.wav")
    assert rate == 16000 and wave.shape == (15872,) and (tmp_path / "siren.png").is_file()
    run("generate", str(tmp_path / "model"), "--prompt", "a quiet tone", "--num-samples", "3",
        "--steps", "2", "--out", str(tmp_path / "tone.npz"))
    arr = np.load(tmp_path / "tone.npz")
    assert arr["x"].shape == (3, 1, 32, 32) and list(arr["captions"]) == ["a quiet tone"] * 3


def test_ctm_distillation_through_the_cli(toy_teacher, tmp_path):
    """train ctm with teacher=PATH -> a CTMPipeline folder that generate and evaluate accept."""
    run("train", "configs/ctm/toy2d.yaml", f"teacher={toy_teacher / 'model'}",
        f"output_dir={tmp_path}", "train.max_steps=4", "train.batch_size=32", "ctm.num_grid=6")
    model = tmp_path / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "CTMPipeline"]
    run("generate", str(model), "--steps", "3", "--gamma", "0.5", "--num-samples", "4",
        "--out", str(tmp_path / "ctm.npz"))
    assert np.load(tmp_path / "ctm.npz")["x"].shape == (16, 2)
    run("evaluate", str(model), "--dataset", "toy2d", "--num-samples", "40", "--no-progress",
        "--out", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["nfe"] == 1 and result["score_name"] == "MMD²"
    # flags of the other family are refused with one line
    proc = run("generate", str(model), "--sampler", "euler", "--out", str(tmp_path / "x.png"),
               check=False)
    assert proc.returncode == 2 and "--sampler does not apply to CTMPipeline" in proc.stderr
    proc = run("train", "configs/ctm/toy2d.yaml", f"teacher={tmp_path / 'none'}", check=False)
    assert proc.returncode == 2 and "teacher: no model folder at" in proc.stderr
