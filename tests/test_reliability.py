"""Training that fails safely, in subprocesses as a user runs it: non-finite steps, checkpoints cut
short or corrupt, resumes that would lose or mix work, two trainings into one folder."""
import os
import subprocess
import sys

import pytest

TINY = ["configs/teacher/toy2d.yaml", "network.width=32", "network.depth=2",
        "train.batch_size=64", "train.warmup_steps=1"]


def train(out, *overrides, verbose=False, config=TINY):
    return subprocess.run([sys.executable, "-m", "gendistill", *(["-v"] if verbose else []),
                           "train", *config, f"output_dir={out}", *overrides],
                          capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gendistill train: error")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_non_finite_steps_are_skipped_then_stop_with_exit_3(tmp_path):
    """A loss that turns NaN from step 3 on (a diverged run): steps 3-5 are skipped, the third
    in a row stops the run with exit 3, and the step-2 checkpoint is left as it was."""
    code = f"""
import sys, torch
from gendistill.cli import main
from gendistill.methods.teacher import TeacherTraining
loss = TeacherTraining.loss
def diverging(self, batch, step):
    value, logs = loss(self, batch, step)
    return (value * float("nan") if step >= 3 else value), logs
TeacherTraining.loss = diverging
sys.exit(main(["train", *{TINY!r}, "output_dir={tmp_path}", "train.max_steps=20",
               "train.checkpoint_every=2", "train.max_nonfinite=3"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = error_line(proc)
    assert "3 steps in a row with a non-finite loss or gradient" in line and "step-2" in line
    assert proc.stderr.count("update skipped") == 3
    assert (tmp_path / "checkpoints" / "step-2" / "COMPLETE").is_file()
    assert not (tmp_path / "model").exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = train(out, "train.max_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_only_the_newest_checkpoints_are_kept_and_marked_complete(run_dir):
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-4", "step-6"]
    assert all((run_dir / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)


def test_resume_falls_back_past_a_truncated_or_unfinished_checkpoint(run_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    (out / "checkpoints" / "step-6" / "optimizer.bin").write_bytes(b"")  # killed mid-write
    unfinished = out / "checkpoints" / "step-7.tmp"                      # killed before rename
    unfinished.mkdir()
    (unfinished / "optimizer.bin").write_bytes(b"junk")
    proc = train(out, "train.max_steps=9", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                 "train.resume=true", verbose=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step-6 is unreadable" in proc.stderr and "at step 4" in proc.stderr


def test_resume_never_moves_the_model_backwards(run_dir):
    before = (run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    proc = train(run_dir, "train.max_steps=5", "train.checkpoint_every=2", "train.resume=true")
    assert proc.returncode == 3 and "nothing to train" in error_line(proc)
    assert (run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() \
        == before


def test_resume_refuses_a_changed_config(run_dir):
    proc = train(run_dir, "train.max_steps=10", "train.resume=true", "train.batch_size=32")
    assert proc.returncode == 3
    line = error_line(proc)
    assert "train.batch_size (64 -> 32)" in line and "allow_config_change" in line
    proc = train(run_dir, "train.max_steps=10", "train.resume=true", "network.width=48")
    assert proc.returncode == 3 and "network.width (32 -> 48)" in error_line(proc)


def test_resume_follows_the_teachers_weights_not_its_path(run_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    teacher, moved, out = tmp_path / "teacher", tmp_path / "moved", tmp_path / "ctm"
    shutil.copytree(run_dir / "model", teacher)
    ctm = ["configs/ctm/toy2d.yaml", "ctm.num_grid=4", "train.batch_size=16",
           "train.checkpoint_every=1", "ctm.gan_weight=0"]
    proc = train(out, "train.max_steps=2", f"teacher={teacher}", config=ctm)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.move(teacher, moved)  # the same weights elsewhere: the run goes on
    proc = train(out, "train.max_steps=3", f"teacher={moved}", "train.resume=true", config=ctm)
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = moved / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1e-3}, weights)  # retrained in place
    before = (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    proc = train(out, "train.max_steps=4", f"teacher={moved}", "train.resume=true", config=ctm)
    assert proc.returncode == 3
    assert f"teacher {moved} holds other weights than the run started with ({teacher})" \
        in error_line(proc)
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() \
        == before


def test_a_fresh_run_does_not_overwrite_another_runs_checkpoints(run_dir, tmp_path):
    proc = train(run_dir, "train.max_steps=2")
    assert proc.returncode == 3 and "holds another run's checkpoints" in error_line(proc)
    assert (run_dir / "checkpoints" / "step-6").is_dir()


def test_overwrite_starts_afresh(tmp_path):
    assert train(tmp_path, "train.max_steps=4", "train.checkpoint_every=2").returncode == 0
    proc = train(tmp_path, "train.max_steps=2", "train.checkpoint_every=0",
                 "train.overwrite=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints" / "step-2").exists()


def test_a_second_training_into_a_locked_folder_stops(tmp_path):
    (tmp_path / ".lock").write_text(str(os.getpid()))  # this test process is alive
    proc = train(tmp_path, "train.max_steps=2")
    assert proc.returncode == 3 and "is locked by another training" in error_line(proc)
    (tmp_path / ".lock").write_text("999999999")  # a process that is gone: a stale lock
    assert train(tmp_path, "train.max_steps=2").returncode == 0
    assert not (tmp_path / ".lock").exists()


def test_output_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "f").write_text("x")
    proc = train(tmp_path / "f", "train.max_steps=2")
    assert proc.returncode == 2 and "is a file, not a folder" in error_line(proc)


LAUNCHERS = {"torchrun": ["torchrun", "--nproc_per_node", "2"],
             "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no"]}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_process_cpu_training_exits_0_with_the_same_weights(tmp_path, launcher):
    """Two real CPU processes (gloo): both train to the same weights, rank 0 alone writes, the
    run exits 0, and the warm-up counts updates as one process does (not once per process)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gendistill.config import REPO_ROOT, load_config

    command, *options = LAUNCHERS[launcher]
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), command), *options,
                           "-m", "gendistill", "--verbose", "train", *TINY,
                           f"output_dir={tmp_path}", "train.max_steps=4",
                           "train.checkpoint_every=2", "train.cpu=true",
                           "train.warmup_steps=8", "train.log_every=1"],
                          capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved") == 1
    assert "all 2 ranks hold the same weights" in proc.stdout + proc.stderr
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert (tmp_path / "checkpoints" / "step-2" / "COMPLETE").is_file()
    assert not (tmp_path / ".lock").exists()
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.*")).parent))
    lr = {e.step: e.value for e in events.Reload().Scalars("lr")}
    base = load_config(REPO_ROOT / TINY[0], []).train.lr
    assert lr[4] == pytest.approx(base * 5 / 8)  # after 4 updates, (4 + 1) / 8 of the lr


def launch_two(out, config, *overrides):
    """``gendistill train`` on two real CPU processes (torchrun, gloo)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "gendistill", "--verbose",
                           "train", *config, f"output_dir={out}", "train.cpu=true", *overrides],
                          capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


ADVERSARIES = {
    "msd-adversarial": ["configs/msd/toy2d.yaml", "msd.num_students=2", "msd.num_pairs=32",
                        "msd.pair_steps=4", "msd.adversarial=true", "msd.gan_start=4",
                        "msd.gen_update_ratio=2"],
    "ctm-gan": ["configs/ctm/toy2d.yaml", "ctm.num_grid=6", "ctm.gan_weight=1",
                "ctm.gan_start=4"],
    "ctm-dm": ["configs/ctm/toy2d.yaml", "ctm.num_grid=6", "ctm.gan_weight=0",
               "ctm.dm_weight=1", "ctm.dm_start=4"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ADVERSARIES)
def test_two_process_training_keeps_the_second_player_in_step(tmp_path, method):
    """A fake score (DMD2, CTM's DM term) or discriminator (CTM's GAN) trains on every rank's
    samples through the data-parallel wrapper, and the generator's loss puts no gradient in it:
    two real gloo processes end with the same weights in both players (the run compares the
    generator, its EMA and the second player across ranks). MSD's two students train one after
    the other in the same process group, and rank 0 alone assembles the pipeline."""
    teacher = tmp_path / "teacher"
    assert train(teacher, "train.max_steps=2").returncode == 0
    proc = launch_two(tmp_path / "run", ADVERSARIES[method], f"teacher={teacher}",
                      "train.batch_size=32", "train.max_steps=8", "train.checkpoint_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all 2 ranks hold the same weights" in proc.stdout + proc.stderr


def exported_weights(run) -> dict:
    from safetensors.torch import load_file

    return {(str(f.relative_to(run)), key): value
            for f in sorted((run / "model").rglob("*.safetensors"))
            for key, value in load_file(f).items()}


SHARDED = {"teacher": TINY,
           # CTM with DMD's term from step 4: the target network, and a fake score sharded as
           # a second player, checkpointed at step 4 before its optimiser has stepped
           "ctm-dm": ["configs/ctm/toy2d.yaml", "ctm.num_grid=6", "train.batch_size=32",
                      "train.lr=1e-2", "ctm.gan_weight=0", "ctm.dm_weight=1", "ctm.dm_start=4"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", SHARDED)
def test_fsdp_trains_the_data_parallel_weights_and_resumes_exactly(tmp_path, method):
    """train.fsdp=true on two real gloo processes: each rank holds half the network; the run
    ends with the weights data-parallel training ends with, to float rounding (the sharded
    gradient norm rounds differently); its checkpoint holds whole tensors, from which a resume
    ends bit-identical to the uninterrupted run."""
    import re
    import shutil

    import torch

    sharded, replicated, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    # 8 steps: RAdam (CTM's) moves the weights by its lr from its sixth step on
    steps = ["train.max_steps=8", "train.checkpoint_every=4", "train.warmup_steps=1"]
    logs = {}
    for out, fsdp in ((sharded, "true"), (replicated, "false")):
        proc = launch_two(out, SHARDED[method], *steps, f"train.fsdp={fsdp}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[fsdp] = proc.stdout + proc.stderr
    pattern = r"rank 0 holds (\d+) of the network's (\d+) weights"
    assert re.search(pattern, logs["false"]) is None
    held, total = map(int, re.search(pattern, logs["true"]).groups())
    assert total / 2 <= held < 0.6 * total  # half, and a shard's padding
    fsdp_w, ddp_w = exported_weights(sharded), exported_weights(replicated)
    assert fsdp_w.keys() == ddp_w.keys()
    start = exported_weights(sharded / "checkpoints" / "step-4")
    moved = max((fsdp_w[k] - start[k]).abs().max() for k in fsdp_w)  # in its last four steps
    assert moved > 1e-4
    # float rounding: 1e-8 here; a fake score whose optimiser the checkpoint had stepped once
    # at lr 0 (torch's gather does so to a fresh one) ended 3e-4 away
    assert max((fsdp_w[k] - ddp_w[k]).abs().max() for k in fsdp_w) < 1e-6
    saved = torch.load(sharded / "checkpoints" / "step-4" / "custom_checkpoint_0.pkl",
                       weights_only=False)
    assert sum(v.numel() for v in saved["model"].values() if v.is_floating_point()) >= total
    assert saved["optimizer"]["state"]  # the optimiser's moments, gathered with the weights
    if method == "ctm-dm":  # the fake score, gathered alike; its optimiser has not stepped
        fake = torch.load(sharded / "checkpoints" / "step-4" / "custom_checkpoint_2.pkl",
                          weights_only=False)
        assert fake["model"] and fake["optimizer"] is None
    shutil.copytree(sharded, resumed)
    shutil.rmtree(resumed / "model")
    proc = launch_two(resumed, SHARDED[method], *steps, "train.fsdp=true", "train.resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = exported_weights(resumed)
    assert all(torch.equal(again[k], fsdp_w[k]) for k in fsdp_w)


@pytest.mark.slow
def test_a_launch_whose_processes_do_not_join_is_refused(tmp_path):
    """accelerate's FSDP config on a machine without GPUs starts two processes that each train
    alone (distributed type NO) and race for one folder: refused, exit 2, nothing written."""
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("with two GPUs the FSDP launch forms a process group")
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\n"
                      "num_processes: 2\nmixed_precision: 'no'\n"
                      "fsdp_config:\n  fsdp_version: 2\n")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.run([accelerate, "launch", "--config_file", str(config), "-m",
                           "gendistill", "train", *TINY, f"output_dir={tmp_path / 'run'}",
                           "train.max_steps=2"], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr  # each rank's usage error
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gendistill train")]
    assert errors and all("launched as 2 processes (WORLD_SIZE) but accelerate made 1" in line
                          for line in errors)
    # the launcher's own traceback reports the failed ranks; none comes from the package
    assert "/gendistill/" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ranks_with_different_weights_stop_the_run(tmp_path):
    """Two real gloo processes whose weights differ in one entry on rank 1."""
    script = tmp_path / "drift.py"
    script.write_text(
        "import torch\n"
        "from accelerate import Accelerator\n"
        "from gendistill.training.loop import TrainingError, check_ranks_agree\n"
        "accelerator = Accelerator(cpu=True)\n"
        "net = torch.nn.Linear(3, 2)\n"
        "with torch.no_grad():\n"
        "    for p in net.parameters():\n"
        "        p.fill_(0.5)\n"
        "    check_ranks_agree(accelerator, net)\n"
        "    net.weight[0, 0] += 1e-7 * accelerator.process_index\n"
        "    try:\n"
        "        check_ranks_agree(accelerator, net)\n"
        "    except TrainingError as error:\n"
        "        print(f'rank {accelerator.process_index}: {error}')\n"
        # as the CLI does: a group left to the interpreter's exit aborts one run in five
        "from gendistill.cli import end_process_group\n"
        "end_process_group()\n")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", str(script)], capture_output=True,
                          text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: the 2 ranks ended with different weights" in proc.stdout


@pytest.mark.slow
def test_compiled_training_trains_the_eager_runs_weights(tmp_path):
    """train.compile=true (torch.compile, inductor: a real C++ build on CPU) ends where the eager
    run ends, to float rounding, and saves plain diffusers weights."""
    from safetensors.torch import load_file

    weights = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        proc = train(out, "train.max_steps=4", f"train.compile={str(compiled).lower()}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[compiled] = load_file(next((out / "model" / "unet").glob("*.safetensors")))
    assert weights[True].keys() == weights[False].keys()
    assert max((weights[True][k] - weights[False][k]).abs().max() for k in weights[True]) < 1e-5


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    """A cluster's preemption: SIGTERM mid-run saves a complete checkpoint and exits 3; the
    resumed run finishes."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "gendistill", "train", *TINY,
                             f"output_dir={tmp_path}", "train.max_steps=100000",
                             "train.checkpoint_every=0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    deadline = time.time() + 120
    while not (tmp_path / "logs").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # some steps into the loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    assert "stopped by SIGTERM at step" in err
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    assert (ckpt / "COMPLETE").is_file() and not (tmp_path / ".lock").exists()
    step = int(ckpt.name.split("-")[1])
    done = train(tmp_path, f"train.max_steps={step + 2}", "train.checkpoint_every=0",
                 "train.resume=true", verbose=True)
    assert done.returncode == 0 and f"at step {step}" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("config", ["teacher", "ctm", "msd"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, config):
    """A run killed with SIGKILL after a checkpoint and resumed ends with exactly the weights of
    the uninterrupted run: model, EMA, target network (CTM), fake score and its head (MSD),
    optimisers, LR schedule, RNG streams and the data order are all restored."""
    import json
    import signal
    import time

    from safetensors.torch import load_file

    run_of = {"teacher": ".", "ctm": ".", "msd": "students/student-0"}[config]
    if config == "teacher":
        args = [*TINY, "train.lr_schedule=cosine"]  # its lr follows the restored step
    else:
        teacher = tmp_path / "teacher"
        assert train(teacher, "train.max_steps=2").returncode == 0
        args = (["configs/ctm/toy2d.yaml", "ctm.num_grid=6", "ctm.gan_weight=0"]
                if config == "ctm" else
                ["configs/msd/toy2d.yaml", "msd.num_students=1", "msd.num_pairs=32",
                 "msd.pair_steps=4", "msd.adversarial=true", "msd.gan_start=8"])
        args += [f"teacher={teacher}", "train.batch_size=32"]
    common = [*args, "train.max_steps=60", "train.checkpoint_every=5", "train.keep_checkpoints=0"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "gendistill", "train"]
    whole = subprocess.run([*cmd, *common, f"output_dir={tmp_path / 'whole'}"],
                           capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, *common, f"output_dir={killed}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (killed / run_of / "checkpoints" / "step-10" / "COMPLETE").is_file():
        assert proc.poll() is None and time.time() < deadline, "finished before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    resumed = subprocess.run([*cmd, *common, f"output_dir={killed}", "train.resume=true"],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for f in (tmp_path / "whole" / "model").rglob("*.safetensors"):
        a, b = load_file(f), load_file(killed / "model" / f.relative_to(tmp_path / "whole" /
                                                                          "model"))
        assert all(a[k].equal(b[k]) for k in a), f"{f.name} differs after the resume"
    # the training time counts the part before the kill too (the checkpoint keeps it)
    timing = json.loads((killed / run_of / "train_time.json").read_text())
    assert timing["resumed_at"] >= 10 and timing["seconds"] > timing["seconds_this_run"] > 0


def test_a_run_from_before_a_key_existed_resumes_while_the_key_keeps_its_default(tmp_path):
    """Upgrading gendistill mid-run adds config keys: their defaults are the old behaviour, so
    the resume goes on; a new key set to anything else is a change like any other."""
    import json

    from gendistill.config import REPO_ROOT, load_config, to_dict
    from gendistill.training.loop import TrainingError, check_resumable

    cfg = load_config(REPO_ROOT / TINY[0], TINY[1:])
    saved = to_dict(cfg)
    del saved["edm"]["p_mean"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resumable(tmp_path, cfg)
    cfg.edm.p_mean = -1.0
    with pytest.raises(TrainingError, match=r"edm\.p_mean \(not in the run's config -> -1\.0\)"):
        check_resumable(tmp_path, cfg)
