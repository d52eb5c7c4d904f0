"""Two runs of one config and seed end bit-identical on CPU, in separate processes as a user runs
them (the network's initial weights too: it is built after seeding)."""
import subprocess
import sys

import pytest
from safetensors.torch import load_file

TINY_TEACHER = ["train.batch_size=64", "network.width=32", "network.depth=2",
                "train.checkpoint_every=0"]


def train(tmp_path, name, *overrides):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "gendistill", "train", *overrides,
                           f"output_dir={out}"], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "model"


def weights(model_dir):
    files = sorted(model_dir.rglob("*.safetensors"))
    assert files, f"no weights under {model_dir}"
    return {f"{f.relative_to(model_dir)}/{k}": v for f in files for k, v in load_file(f).items()}


def assert_identical(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].equal(wb[key]), f"{key} differs between two runs of one seed"


def test_teacher_runs_of_one_seed_are_bit_identical(tmp_path):
    args = ("configs/teacher/toy2d.yaml", "train.max_steps=4", *TINY_TEACHER)
    assert_identical(train(tmp_path, "a", *args), train(tmp_path, "b", *args))
    # and the seed matters: another seed starts from other weights
    other = weights(train(tmp_path, "c", *args, "seed=1"))
    assert any(not v.equal(other[k]) for k, v in weights(tmp_path / "a" / "model").items())


@pytest.mark.slow
def test_ctm_runs_of_one_seed_are_bit_identical(tmp_path):
    teacher = train(tmp_path, "teacher", "configs/teacher/toy2d.yaml", "train.max_steps=2",
                    *TINY_TEACHER)
    args = ("configs/ctm/toy2d.yaml", f"teacher={teacher}", "train.max_steps=3",
            "train.batch_size=32", "train.checkpoint_every=0")
    assert_identical(train(tmp_path, "a", *args), train(tmp_path, "b", *args))
