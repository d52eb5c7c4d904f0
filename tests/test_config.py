from pathlib import Path

import pytest

from gendistill.config import Config, ConfigError, load_config, parse_overrides

CFG = "configs/teacher/digits.yaml"


def test_overrides_are_typed_and_nested():
    cfg = load_config(CFG, ["train.max_steps=7", "train.lr=1e-3", "seed=3", "output_dir=x",
                            "network.channels=[8,16]", "train.resume=true", "data.path=null"])
    assert isinstance(cfg, Config)
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-3 and cfg.seed == 3
    assert cfg.output_dir == "x" and cfg.network.channels == [8, 16] and cfg.train.resume is True
    assert cfg.data.path is None


@pytest.mark.parametrize("override, needle", [
    ("train.max_step=5", "unknown key 'train.max_step'"),
    ("nope=1", "unknown key 'nope'"),
    ("train.max_steps=abc", "train.max_steps: expected int, got 'abc'"),
    ("train.lr=fast", "train.lr: expected float"),
    ("train.resume=maybe", "train.resume: expected bool"),
    ("method=gan", "method: expected one of teacher, ctm, msd, got 'gan'"),
    ("train=3", "train: expected a mapping"),
    ("noequals", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(CFG, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nothere.yaml"):
        load_config("nothere.yaml")


def test_parse_overrides_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"},
                                                               "d": [1, 2]}


@pytest.mark.parametrize("name", ["toy2d", "digits", "synthsounds"])
def test_shipped_teacher_configs_load(name):
    cfg = load_config(f"configs/teacher/{name}.yaml")
    assert cfg.method == "teacher" and cfg.data.name == name


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").rglob("*.yaml")))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.method == path.split("/")[1]


def test_an_adversarial_stage_that_never_starts_is_an_error():
    """msd.gan_start at or past train.max_steps would silently train without stage 2."""
    with pytest.raises(ConfigError, match=r"msd.gan_start \(450\) leaves no adversarial steps "
                                          r"before train.max_steps \(400\)"):
        load_config("configs/msd/digits.yaml", ["msd.adversarial=true", "train.max_steps=400"])
    assert load_config("configs/msd/digits.yaml", ["train.max_steps=400"]).msd.gan_start == 450


def test_input_folders_are_known_by_their_weights_not_their_paths(tmp_path):
    import shutil

    from gendistill.config import folder_weights

    run = tmp_path / "run"
    (run / "model" / "unet").mkdir(parents=True)
    (run / "model" / "model_index.json").write_text("{}")
    (run / "model" / "unet" / "w.safetensors").write_bytes(b"weights")
    (run / "checkpoints" / "step-2").mkdir(parents=True)  # a run's checkpoints are not read
    (run / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"older")
    cfg = load_config("configs/ctm/digits.yaml", [f"teacher={run}"])
    found = folder_weights(cfg)
    assert list(found) == ["teacher"] and found["teacher"]["path"] == str(run)
    assert len(found["teacher"]["weights"]) == 1
    shutil.copytree(run / "model", tmp_path / "moved")
    moved = folder_weights(load_config("configs/ctm/digits.yaml", [f"teacher={tmp_path}/moved"]))
    assert moved["teacher"]["weights"] == found["teacher"]["weights"]
    (run / "model" / "unet" / "w.safetensors").write_bytes(b"retrained")
    assert folder_weights(cfg)["teacher"]["weights"] != found["teacher"]["weights"]
    assert folder_weights(load_config("configs/ctm/digits.yaml")) == {}  # the shipped teacher
