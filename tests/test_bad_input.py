"""Bad input, table-driven: each case is one line on stderr that names the key or flag and the
value, exit code 2, no traceback, and nothing written. In-process through ``main`` (fast), and a
few of them again in real subprocesses."""
import json
import subprocess
import sys

import pytest
from diffusers import EDMEulerScheduler

from gendistill.cli import main
from gendistill.models.networks import build_network
from gendistill.models.student import CTMStudent
from gendistill.pipelines import CTMPipeline, CTMScheduler, TeacherPipeline
from gendistill.pipelines.remote import save_with_remote_code

TOY = "configs/teacher/toy2d.yaml"
CTM = "configs/ctm/toy2d.yaml"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    net = build_network((2,), num_classes=4, width=16, depth=1)
    TeacherPipeline(net, EDMEulerScheduler()).save_pretrained(root / "teacher")
    student = CTMStudent.from_teacher(net, 0.5, 0.002, embed_guidance=True)
    save_with_remote_code(CTMPipeline(student, CTMScheduler()), root / "student")
    (root / "file").write_text("not a folder")
    for name, text in (("empty.yaml", ""), ("list.yaml", "- 1\n- 2\n"), ("scalar.yaml", "3\n")):
        (root / name).write_text(text)
    for name, index in (("noclass", {"unet": ["x", "y"]}), ("badjson", None)):
        (root / name).mkdir()
        (root / name / "model_index.json").write_text(
            "{not json" if index is None else json.dumps(index))
    return root


def T(*overrides, config=TOY):
    return ["train", config, *overrides]


CASES = [
    # training: ranges, finiteness and choices of config keys, checked before anything runs
    (T("train.max_steps=-3"), "train.max_steps: -3 is out of range [1, inf]"),
    (T("train.max_steps=0"), "train.max_steps: 0 is out of range"),
    (T("train.ema_decay=5"), "train.ema_decay: 5.0 is out of range [0, 1.0]"),
    (T("train.lr=0"), "train.lr: 0.0 is out of range (0, 1.0]"),
    (T("train.lr=nan"), "train.lr: expected a finite number, got nan"),
    (T("train.lr=inf"), "train.lr: expected a finite number, got inf"),
    (T("train.batch_size=0"), "train.batch_size: 0 is out of range"),
    (T("train.cond_dropout=1.5"), "train.cond_dropout: 1.5 is out of range [0, 1.0]"),
    (T("train.grad_clip=-1"), "train.grad_clip: -1.0 is out of range"),
    (T("train.threads=0"), "train.threads: 0 is out of range [1, 4096]"),
    (T("train.mixed_precision=fp8"), "train.mixed_precision: expected one of no, fp16, bf16"),
    (T("data.kind=bogus"), "data.kind: expected one of None, vector, image, audio, got 'bogus'"),
    (T("data.name=mnist"), "data.name: expected one of toy2d, digits, synthsounds, npz"),
    (T("data.name=npz"), "data.path: data.name=npz needs data.path=FILE.npz"),
    (T("method=gan"), "method: expected one of teacher, ctm, msd, got 'gan'"),
    (T("seed=-1"), "seed: -1 is out of range"),
    (T("network.channels=[0,32]"), "network.channels[]: 0 is out of range"),
    (T("edm.sigma_min=0"), "edm.sigma_min: 0.0 is out of range (0, inf]"),
    (T("edm.sigma_max=0.001"), "edm.sigma_max (0.001) must exceed edm.sigma_min (0.002)"),
    (T("ctm.num_grid=1", config=CTM), "ctm.num_grid: 1 is out of range [2, 10000]"),
    (T("ctm.max_jump=50", config=CTM), "ctm.max_jump: 50 is out of range [1, num_grid - 1 = 17]"),
    (T("ctm.guidance_min=0.5", config=CTM), "ctm.guidance_min: 0.5 is out of range"),
    (T("ctm.guidance_min=3", "ctm.guidance_max=2", config=CTM),
     "ctm.guidance_max (2.0) is below ctm.guidance_min (3.0)"),
    (T("ctm.target_ema=1.5", config=CTM), "ctm.target_ema: 1.5 is out of range"),
    (T("ctm.match_point=zz", config=CTM), "ctm.match_point: expected one of zs, z0"),
    (T("ctm.distance=cosine", config=CTM), "ctm.distance: expected one of teacher_feature"),
    (T("ctm.target_inner=both", config=CTM), "ctm.target_inner: expected one of ema, online"),
    (T("train.max_stepz=3"), "unknown key 'train.max_stepz'"),
    (T("seed=x"), "seed: expected int, got 'x'"),
    (["train", "{root}/empty.yaml"], "the config file is empty"),
    (["train", "{root}/list.yaml"], "expected a mapping of keys to values, got a list"),
    (["train", "{root}/scalar.yaml"], "expected a mapping of keys to values, got a int"),
    (T("output_dir={root}/file"), "output_dir: {root}/file is a file, not a folder"),
    (T("teacher={root}/student", "output_dir={root}/run-s", config=CTM),
     "holds a CTMPipeline, not a teacher"),
    (T("teacher=gendistill/assets/teachers/digits", "output_dir={root}/run-d", config=CTM),
     "teacher: the model makes samples of shape (1, 8, 8), dataset toy2d has (2,)"),
    (T("teacher={root}/nothere", config=CTM), "teacher: no model folder at"),
    # sampling flags
    (["generate", "{root}/teacher", "--guidance", "nan", "--out", "{root}/x.png"],
     "--guidance: nan is out of range [0.0, 100.0]"),
    (["generate", "{root}/teacher", "--guidance", "inf", "--out", "{root}/x.png"],
     "--guidance: inf is out of range"),
    (["generate", "{root}/student", "--nu", "nan", "--out", "{root}/x.png"],
     "--nu: nan is out of range [0.0, 2.0]"),
    (["generate", "{root}/student", "--nu", "1e9", "--out", "{root}/x.png"],
     "--nu: 1000000000.0 is out of range"),
    (["generate", "{root}/student", "--gamma", "2", "--out", "{root}/x.png"],
     "--gamma: 2.0 is out of range [0.0, 1.0]"),
    (["generate", "{root}/teacher", "--num-samples", "0", "--out", "{root}/x.png"],
     "--num-samples: 0 is out of range [1, 10000]"),
    (["generate", "{root}/teacher", "--num-samples", "-5", "--out", "{root}/x.png"],
     "--num-samples: -5 is out of range"),
    (["generate", "{root}/teacher", "--num-samples", "1000000000000", "--out", "{root}/x.png"],
     "--num-samples: 1000000000000 is out of range"),
    (["generate", "{root}/teacher", "--num-samples", "1e12", "--out", "{root}/x.png"],
     "argument --num-samples: invalid int value: '1e12'"),
    (["generate", "{root}/teacher", "--steps", "100000000", "--out", "{root}/x.png"],
     "--steps: 100000000 is out of range [1, 1000]"),
    (["generate", "{root}/teacher", "--steps", "0", "--out", "{root}/x.png"],
     "--steps: 0 is out of range"),
    (["generate", "{root}/teacher", "--seed", "-1", "--out", "{root}/x.png"],
     "--seed: -1 is out of range"),
    (["generate", "{root}/teacher", "--prompt", "a dog", "--out", "{root}/x.png"],
     "--prompt: the model is class-conditional (give --class N)"),
    (["generate", "{root}/teacher", "--class", "9", "--out", "{root}/x.png"],
     "--class: 9 is out of range [0, 3]"),
    (["generate", "{root}/noclass", "--out", "{root}/x.png"],
     "model_index.json: no _class_name"),
    (["generate", "{root}/badjson", "--out", "{root}/x.png"],
     "badjson/model_index.json: not a valid model index"),
    (["--threads", "0", "generate", "{root}/teacher", "--out", "{root}/x.png"],
     "--threads: 0 is out of range [1, 4096]"),
    (["evaluate", "{root}/teacher", "--dataset", "toy2d", "--num-samples", "1", "--out",
      "{root}/r.json"], "--num-samples: 1 is out of range [2, 1000000]"),
    (["evaluate", "{root}/teacher", "--dataset", "toy2d", "--batch-size", "0", "--out",
      "{root}/r.json"], "--batch-size: 0 is out of range [1, 65536]"),
    (["evaluate", "{root}/teacher", "--dataset", "digits", "--out", "{root}/r.json"],
     "the model makes samples of shape (2,), dataset digits has (1, 8, 8)"),
    (T("train.fsdp=true"), "train.fsdp=true shards the network over processes, but this run has "
                           "one"),
]


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, needle, models, capsys):
    args = [a.format(root=models) for a in args]
    before = sorted(p.name for p in models.iterdir())
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle.format(root=models) in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in models.iterdir()) == before


def test_a_few_cases_in_real_subprocesses(models):
    for args, needle in (CASES[0], CASES[36], CASES[44], CASES[49]):
        args = [a.format(root=models) for a in args]
        proc = subprocess.run([sys.executable, "-m", "gendistill", *args], capture_output=True,
                              text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_run_folder_stands_for_its_model(models, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (models / "teacher").rename(run / "model")
    try:
        assert main(["generate", str(run), "--num-samples", "2", "--steps", "2", "--out",
                     str(tmp_path / "s.npz")]) == 0
    finally:
        (run / "model").rename(models / "teacher")
    assert (tmp_path / "s.npz").is_file()
