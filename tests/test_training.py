import pytest
import torch
from torch import nn

from gendistill.training.ema import EMA
from gendistill.training.loop import lr_decay


def test_ema_update_rule_and_warmup():
    model = nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.99, warmup=False)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.99 * start + 0.01 * model.weight)

    warm = EMA(model, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)       # (1 + 0) / (10 + 0)
    for _ in range(5):
        warm.update(model)
    assert warm.current_decay() == pytest.approx(6 / 15)
    assert int(warm.state_dict()["num_updates"]) == 5      # checkpointed with the weights
    for _ in range(20000):
        warm.num_updates += 1
    assert warm.current_decay() == 0.999


def test_lr_decay_is_flat_or_a_cosine_to_zero_at_the_last_step():
    assert [lr_decay("constant", s, 100) for s in (0, 50, 100)] == [1.0, 1.0, 1.0]
    assert lr_decay("cosine", 0, 100) == 1.0
    assert lr_decay("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_decay("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_decay("cosine", 150, 100) == pytest.approx(0.0, abs=1e-12)  # a resume past the end


@pytest.mark.parametrize("load, quiet", [(0.0, True), (50.0, False), (None, None)])
def test_train_time_says_whether_the_machine_was_quiet(tmp_path, monkeypatch, load, quiet):
    """train_time.json keeps the machine's mean load while the run trained, the cores the run
    itself kept busy, and whether the rest (other work) stayed within OTHER_LOAD_MARGIN, so
    that a time measured beside other work is not read as the run's speed. Where the OS gives
    no load (Windows), all three are None."""
    import json
    import os

    import numpy as np

    from gendistill.config import Config, build, validate
    from gendistill.train import run_training
    from gendistill.training import loop

    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32))
    monkeypatch.setattr(loop, "machine_load", lambda: load)
    monkeypatch.setattr(loop, "LOAD_LAG_SECONDS", 0.0)  # a 3-step run reads from its start
    cfg = validate(build(Config, dict(
        method="teacher", output_dir=str(tmp_path / "run"), data=dict(name="npz", path=str(npz)),
        network=dict(width=16, depth=1), train=dict(max_steps=3, batch_size=16,
                                                    checkpoint_every=0, threads=1))))
    run_training(cfg)
    timing = json.loads((tmp_path / "run" / "train_time.json").read_text())
    assert timing["mean_load"] == load and timing["quiet"] is quiet
    assert (timing["own_cores"] is None) == (load is None)
    assert load is None or 0 <= timing["own_cores"] <= os.cpu_count()


def test_the_machine_load_is_none_where_the_os_has_none(monkeypatch):
    import os

    from gendistill.training.loop import machine_load

    assert machine_load() >= 0  # Linux
    monkeypatch.delattr(os, "getloadavg")  # as on Windows
    assert machine_load() is None


def test_a_callers_own_accelerator_is_checked_as_the_loops_own(tmp_path):
    """train(..., accelerator=...) from Python meets the checks the CLI's run meets: here
    train.fsdp=true on one process, refused before anything is written."""
    from accelerate import Accelerator

    from gendistill.config import ConfigError, load_config
    from gendistill.training.loop import train

    cfg = load_config("configs/teacher/toy2d.yaml", [f"output_dir={tmp_path / 'run'}",
                                                     "train.fsdp=true"])
    with pytest.raises(ConfigError, match="train.fsdp=true shards the network over processes"):
        train(cfg, method=None, loader=None, accelerator=Accelerator(cpu=True))
    assert not (tmp_path / "run").exists()


def test_a_player_frozen_under_fsdp_gets_its_gradient_in_its_own_step(tmp_path):
    """FSDP2 (a real one-process gloo group): a player whose root keeps its gathered weights
    after forward, read inside frozen() by a loss never backpropagated (a skipped step), still
    gets every weight's gradient in its own next step."""
    import subprocess
    import sys

    script = tmp_path / "frozen_fsdp.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from torch import nn\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "from gendistill.training.loop import frozen\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'group'}', rank=0, "
        "world_size=1)\n"
        "torch.manual_seed(0)\n"
        "player = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))\n"
        "fully_shard(player, reshard_after_forward=False)\n"
        "x = torch.randn(5, 3, requires_grad=True)\n"
        "with frozen(player):\n"
        "    player(x).sum()\n"
        "player(x).sum().backward()\n"
        "print('missing', sum(p.grad is None for p in player.parameters()))\n"
        "dist.destroy_process_group()\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "missing 0" in proc.stdout
