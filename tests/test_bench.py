"""The benchmark harness end to end on a tiny preset (tiny teacher, tiny CTM student)."""
import json
from pathlib import Path

import pytest

from gendistill.eval.bench import PRESETS, Preset, Row, Student, results_markdown, run_bench
from gendistill.eval.calibrate import chosen_start, start_name


@pytest.mark.slow
def test_bench_trains_caches_and_writes_results(tmp_path, monkeypatch):
    import gendistill.eval.bench as bench

    def tiny_teacher(name, config, extra, cache, log):
        flow = ["diffusion.parameterization=flow"] if name == "teacher-flow" else []
        return bench.train_cached(name, config, extra + ["network.width=32", "network.depth=2",
                                                         *flow], cache, log)

    monkeypatch.setattr(bench, "teacher_folder", tiny_teacher)
    heun = {"num_inference_steps": 6, "sampler": "heun"}
    preset = Preset(
        dataset="toy2d", teacher_config="configs/teacher/toy2d.yaml",
        students={"ctm": Student("configs/ctm/toy2d.yaml", ["ctm.num_grid=6",
                                                            "ctm.guidance_max=3"]),
                  "ctm-flow": Student("configs/ctm/toy2d.yaml", ["ctm.num_grid=6"],
                                      teacher="teacher-flow")},
        other_teachers={"teacher-flow": "configs/teacher/toy2d.yaml"},
        rows=[Row("teacher", "heun", "teacher", heun),
              Row("teacher", "euler-1", "teacher", {"num_inference_steps": 1, "sampler": "euler"}),
              Row("ctm-1", "ctm", "ctm", {"num_inference_steps": 1}),
              Row("teacher-flow", "heun", "teacher-flow", heun),
              Row("ctm-1-flow", "ctm", "ctm-flow", {"num_inference_steps": 1})],
        num_samples=200, quick_num_samples=200, quick_overrides=["train.max_steps=8",
                                                                 "train.batch_size=32"],
        timing_batch=16, calibrate_guidance=1.0)
    logs = []
    res = run_bench(preset, tmp_path / "out", quick=True, cache_dir=tmp_path / "cache",
                    repeats=2, log=logs.append, seeds=(0, 1), eval_seeds=(0, 1))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"] == res["rows"]
    keys = {"model", "method", "params", "nfe", "ms_per_sample", "speedup", "score_name",
            "score", "score_ratio", "cond_acc", "precision", "recall", "sw2"}
    for row in saved["rows"]:
        assert keys <= set(row)
    heun, euler, ctm, heun_flow, ctm_flow = saved["rows"]
    assert (heun["nfe"], euler["nfe"], ctm["nfe"]) == (11, 1, 1)  # 6 Heun steps = 2*6 - 1 calls
    assert heun["speedup"] == 1.0 and heun["score_ratio"] == 1.0
    # each student is distilled from, and read against, its own teacher
    assert (ctm["teacher"], heun_flow["teacher"], ctm_flow["teacher"]) == \
        ("teacher", "teacher-flow", "teacher-flow")
    assert heun_flow["score_ratio"] == 1.0
    assert ctm_flow["score_ratio"] == round(ctm_flow["score"] / heun_flow["score"], 4)
    flow_student = json.loads((bench.Path(res["models"]["ctm-flow"]) / "unet" /
                               "config.json").read_text())
    assert flow_student["teacher_scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert heun["score_name"] == "MMD²" and heun["cond_acc"] is None
    # every row from both evaluation seeds, every student from both training seeds
    assert saved["eval_seeds"] == [0, 1]
    assert (heun["seeds"], ctm["seeds"]) == ([], [0, 1])
    assert len(heun["scores"]) == 1 and len(ctm["scores"]) == 2
    assert all(len(s) == 2 for s in ctm["scores"])
    assert ctm["score"] == pytest.approx(sum(map(sum, ctm["scores"])) / 4, abs=1e-5)
    weights = [(Path(m) / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
               for m in res["seed_models"]["ctm"].values()]
    assert weights[0] != weights[1]                         # two different students
    assert heun["score_std_seed"] is None and ctm["score_std_seed"] is not None
    assert ctm["score_ratio_by_seed"] == [round(sum(s) / 2 / heun["score"], 4)
                                          for s in ctm["scores"]]
    assert res["seed_models"]["ctm"]["0"] == res["models"]["ctm"]
    assert len({*res["seed_models"]["ctm"].values(), *res["seed_models"]["ctm-flow"].values()}) == 4
    assert "| model | method | seed 0 | seed 1 |" in (tmp_path / "out" / "results.md").read_text()
    # rows from different training seeds: a column per seed, "–" where a row has none
    other = json.loads(json.dumps(saved))
    other["rows"][2]["seeds"] = [0, 2]
    text = bench.results_markdown(other)
    assert "| model | method | seed 0 | seed 1 | seed 2 |" in text
    assert f"| {ctm['model']} | ctm | " in text and " | – | " in text
    # the CFG-distilled student's response to omega over its range, beside its teacher's
    (response,) = saved["guidance_response"]
    assert (response["model"], response["teacher"], response["omega"]) == ("ctm", "teacher",
                                                                          [1.0, 3.0])
    assert response["teacher_rms"] > 0
    assert response["ratio"] == pytest.approx(response["rms"] / response["teacher_rms"],
                                              abs=1e-4)
    assert "| ctm-1 | 1 → 3 |" in (tmp_path / "out" / "results.md").read_text()
    for name in ("results.md", "samples.png", "score_vs_nfe.png"):
        assert (tmp_path / "out" / name).stat().st_size > 500
    # every CTM student's single-jump start was chosen on the train split and is in its folder
    for key in ("ctm", "ctm-flow"):
        for seed, folder in res["seed_models"][key].items():
            chosen = saved["calibration"][key][seed]
            best = min(chosen["scores"], key=chosen["scores"].get)  # toy2d: no grain check
            assert start_name(chosen_start(chosen)) == best
            scheduler = json.loads((Path(folder) / "scheduler" / "scheduler_config.json")
                                   .read_text())
            assert scheduler["one_step_sigma"] == chosen["one_step_sigma"]
            assert (Path(folder) / "start").is_dir() == (chosen["start"] == "gaussian")
    assert "| ctm | 0 | " in (tmp_path / "out" / "results.md").read_text()
    # a second run reuses both trained models and their calibration
    logs.clear()
    again = run_bench(preset, tmp_path / "out2", quick=True, cache_dir=tmp_path / "cache",
                      repeats=1, log=logs.append)
    assert sum("reusing" in line for line in logs) == 4
    assert not any("single jump from" in line for line in logs)
    assert again["calibration"]["ctm"]["0"] == saved["calibration"]["ctm"]["0"]


def test_presets_have_the_required_rows():
    for name in ("toy2d", "digits"):
        rows = {(r.model, r.method) for r in PRESETS[name].rows}
        assert {("teacher", "heun"), ("teacher", "euler-1"), ("ctm-1", "ctm"), ("ctm-2", "ctm"),
                ("ctm-4-g0.5", "ctm")} <= rows
    assert {("ctm-1-l2", "ctm"), ("ctm-1-no-gan", "ctm")} <= \
        {(r.model, r.method) for r in PRESETS["toy2d"].rows}
    assert {("teacher", "heun-w3"), ("ctm-1-w3", "ctm"), ("teacher-vp", "heun"),
            ("teacher-flow", "heun"), ("teacher-dit", "heun"), ("ctm-1-vp", "ctm"),
            ("ctm-1-flow", "ctm"), ("ctm-1-dit", "ctm")} <= \
        {(r.model, r.method) for r in PRESETS["digits"].rows}
    assert {("teacher", "heun"), ("teacher", "euler-1")} <= \
        {(r.model, r.method) for r in PRESETS["synthsounds"].rows}


def test_timing_conditions_spread_over_an_ordered_split():
    from gendistill.eval.bench import spread

    ordered = [c for c in range(4) for _ in range(5)]  # a test split sorted by class
    assert spread(ordered, 4) == [0, 1, 2, 3]
    assert spread(ordered, 100) == ordered


def test_markdown_table():
    row = dict(model="teacher", method="heun", params=10, nfe=35, ms_per_sample=1.0,
               speedup=1.0, score_name="MMD²", score=0.1, score_ratio=1.0, cond_acc=None,
               precision=0.9, recall=0.8, sw2=0.03,
               score_floor=0.01)
    md = results_markdown({"preset": "toy2d", "quick": True, "device": "cpu", "num_samples": 10,
                           "repeats": 1, "timing_batch": 4, "train_seconds": {}, "rows": [row]})
    assert "| teacher | heun | 10 | 35 |" in md and "(quick)" in md
    timed = results_markdown({"preset": "toy2d", "quick": True, "device": "cpu",
                              "num_samples": 10, "repeats": 1, "timing_batch": 4,
                              "train_seconds": {"ctm": 120, "ctm-l2": 60, "old": 30},
                              "train_quiet": {"ctm": False, "ctm-l2": True, "old": None},
                              "rows": [row]})
    assert "Training time: ctm 2.0 min (beside other work), ctm-l2 1.0 min, old 0.5 min." in timed
    calibrated = {"preset": "digits", "quick": True, "device": "cpu", "num_samples": 10,
                  "repeats": 1, "timing_batch": 4, "train_seconds": {}, "rows": [row],
                  "calibration": {"ctm": {"0": {"one_step_sigma": 10.0, "refused": ["5"],
                                                "scores": {"80": 1.0, "10": 0.8, "5": 0.5}}}}}
    assert "| ctm | 0 | 10 | 80: 1, 10: 0.8, 5: 0.5* |" in results_markdown(calibrated)
    audio = dict(row, score_name="domain FAD", am_depth_ratio=0.8, fm_depth_ratio=1.1,
                 pitch_acc=0.9, loudness_acc=0.95, attribute_acc=0.875, attribute_acc_real=0.948)
    md = results_markdown({"preset": "synthsounds", "quick": True, "device": "cpu",
                           "num_samples": 10, "repeats": 1, "timing_batch": 4,
                           "train_seconds": {}, "rows": [audio]})
    assert "| teacher | heun | 0.800 | 1.100 |" in md
    assert "| teacher | heun | 90.0 % | 95.0 % | 87.5 % |" in md and "score 94.8 %" in md


def test_score_spread_over_evaluation_and_training_seeds():
    from gendistill.eval.bench import score_spread, score_text

    spread = score_spread([[1.0, 3.0], [5.0, 7.0]])    # seed means 2 and 6
    assert spread == {"score_std_eval": pytest.approx(2 ** 0.5, abs=1e-5),
                      "score_std_seed": pytest.approx(8 ** 0.5, abs=1e-5)}
    assert score_spread([[1.0]]) == {"score_std_eval": None, "score_std_seed": None}
    assert score_text({"score": 4.0, **spread}) == "4 ± 2.8"
    assert score_text({"score": 4.0, "score_std_eval": 0.5, "score_std_seed": None}) == "4 ± 0.5"


def test_rows_are_read_against_the_teacher_at_the_same_guidance():
    from gendistill.eval.bench import teacher_row_for

    rows = [dict(model="teacher", method="heun", call={}),
            dict(model="teacher", method="heun-w3", call={"guidance_scale": 3.0}),
            dict(model="ctm-1", method="ctm", call={"num_inference_steps": 1}),
            dict(model="ctm-1-w3", method="ctm", call={"guidance_scale": 3.0})]
    assert teacher_row_for(rows, rows[2]) is rows[0]
    assert teacher_row_for(rows, rows[3]) is rows[1]
    # a student of another teacher is read against that teacher's Heun row
    rows += [dict(model="teacher-vp", method="heun", call={}, teacher="teacher-vp"),
             dict(model="ctm-1-vp", method="ctm", call={}, teacher="teacher-vp")]
    assert teacher_row_for(rows, rows[5]) is rows[4]
    # an MSD row takes no guidance scale: it is read at the omega its run distilled against
    rows += [dict(model="msd-k4", method="msd", call={}, guidance=3.0)]
    assert teacher_row_for(rows, rows[6]) is rows[1]


def test_msd_rows_read_the_omega_their_run_distilled_against(tmp_path):
    from gendistill.config import REPO_ROOT, load_config, to_dict
    from gendistill.eval.bench import distilled_guidance

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    cfg = load_config(REPO_ROOT / "configs/msd/synthsounds.yaml")
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert distilled_guidance(run / "model") == 3.0
    rows = {(r.model, r.method) for r in PRESETS["synthsounds-msd"].rows}
    assert {("teacher", "heun"), ("teacher", "heun-w3"), ("dmd2-k1", "dmd2"),
            ("msd-k4", "msd")} == rows - {("teacher", "euler-1")}


def test_digits_msd_gives_only_the_narrow_students_a_longer_schedule():
    from gendistill.config import REPO_ROOT, load_config

    preset = PRESETS["digits-msd"]

    def resolved(name, extra=()):
        student = preset.students[name]
        return load_config(REPO_ROOT / student.config, student.overrides + list(extra))

    narrow, wide = resolved("msd-k4-w50"), resolved("msd-k4")
    assert narrow.msd.student_width == 0.5
    assert (narrow.train.max_steps, narrow.msd.tsm_steps) == (9000, 600)
    assert wide.train.max_steps == 600 and wide.msd.student_width == 1.0
    # --quick still trains every student briefly
    assert resolved("msd-k4-w50", preset.quick_overrides).train.max_steps == 40
    assert PRESETS["toy2d-msd"].students["msd-k4-w50"].overrides == ["msd.num_students=4",
                                                                    "msd.student_width=0.5"]
    assert preset.eval_seeds == (0, 1, 2)


def test_the_demo_runs_the_digits_rows_of_the_main_teacher_only():
    preset = PRESETS["digits"].main_teacher_only()
    assert preset.other_teachers == {} and set(preset.students) == {"ctm"}
    models = {r.model for r in preset.rows}
    assert {"teacher", "ctm-1", "ctm-1-w3"} <= models
    assert not any(m.endswith(("-vp", "-flow", "-dit")) for m in models)


def test_a_cached_run_trained_under_other_defaults_is_moved_aside_and_retrained(tmp_path,
                                                                               monkeypatch):
    """The cache's name hashes only non-default keys, so a changed default keeps the name; the
    run's own config.json tells the difference."""
    import gendistill.eval.bench as bench
    import gendistill.train
    from gendistill.config import REPO_ROOT, load_config, to_dict

    config = "configs/ctm/toy2d.yaml"
    cfg = load_config(REPO_ROOT / config, [])
    folder = tmp_path / f"ctm-{bench.config_hash(cfg)}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model_index.json").write_text("{}")
    saved = to_dict(cfg)
    saved["output_dir"] = "elsewhere"               # where it ran does not count
    del saved["ctm"]["embedding_lr_scale"]          # nor a key its version did not have
    (folder / "config.json").write_text(json.dumps(saved))
    assert bench.stale_keys(folder, cfg) == []
    trained = []
    monkeypatch.setattr(gendistill.train, "run_training", lambda c: trained.append(c) or "new")
    assert bench.train_cached("ctm", config, [], tmp_path, print) == folder / "model"
    assert trained == []

    saved["train"]["lr"] = cfg.train.lr / 2         # the default it was trained under
    (folder / "config.json").write_text(json.dumps(saved))
    assert bench.stale_keys(folder, cfg) == [f"train.lr ({cfg.train.lr / 2!r} -> "
                                             f"{cfg.train.lr!r})"]
    logs = []
    assert bench.train_cached("ctm", config, [], tmp_path, logs.append) == "new"
    assert trained[0].output_dir == str(folder) and not trained[0].train.resume
    assert (tmp_path / f"{folder.name}.stale" / "model" / "model_index.json").is_file()
    assert "train.lr" in logs[0] and ".stale" in logs[0]


def test_guidance_response_is_zero_for_a_student_blind_to_omega():
    """A student built from a guided teacher starts with a zero omega embedding: its samples do
    not move with omega, whatever the teacher's do."""
    import torch
    from diffusers import EDMEulerScheduler

    from gendistill.eval.bench import guidance_response
    from gendistill.models.networks import build_network
    from gendistill.models.student import CTMStudent
    from gendistill.pipelines import CTMPipeline, CTMScheduler, TeacherPipeline

    torch.manual_seed(0)
    net = build_network((2,), num_classes=4, width=32, depth=2)
    teacher = TeacherPipeline(net, EDMEulerScheduler())
    student = CTMPipeline(CTMStudent.from_teacher(net, 0.5, 0.002, embed_guidance=True),
                          CTMScheduler())
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    labels = [0, 1, 2, 3] * 4
    heun = {"num_inference_steps": 6, "sampler": "heun"}
    one = {"num_inference_steps": 1}
    assert guidance_response(student, labels, one, 1.0, 5.0) == 0.0
    kw = dict(class_labels=labels, output_type="latent", **heun)
    a, b = (teacher(generator=torch.Generator().manual_seed(0), guidance_scale=w, **kw).samples
            for w in (1.0, 5.0))
    assert guidance_response(teacher, labels, heun, 1.0, 5.0) == pytest.approx(
        float((a - b).pow(2).mean().sqrt()))
    torch.nn.init.normal_(student.unet.guidance_embedding.linear_2.weight, std=0.1)
    assert guidance_response(student, labels, one, 1.0, 5.0) > 0


def test_rows_are_timed_in_interleaved_rounds(monkeypatch):
    """time_pipelines times the pipelines in rounds (a drift of the machine's speed then hits
    every row alike), each at least ``repeats`` times and until min_seconds of it are timed;
    per round a fast call is repeated for min_seconds / repeats, so a slow and a fast row end
    after the same rounds. Per-sample milliseconds of a 4-step call exceed a 1-step call's.
    The clock is a fake one on which a call of n steps takes 4n ms: how many calls make a round
    must not depend on the machine's speed (on the real clock a slow row sometimes finished a
    round early)."""
    import itertools
    import time

    import gendistill.generate as generate
    from gendistill.assets import ASSETS
    from gendistill.eval.bench import time_pipelines
    from gendistill.pipelines import load_pipeline

    teacher = load_pipeline(ASSETS / "teachers" / "toy2d")
    teacher.set_progress_bar_config(disable=True)
    order, real, clock = [], generate.sample, [0.0]

    def timed_sample(pipe, *args, **call):
        order.append(call["num_inference_steps"])
        clock[0] += 0.004 * call["num_inference_steps"]
        return real(pipe, *args, **call)

    monkeypatch.setattr(generate, "sample", timed_sample)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    calls = [(teacher, {"num_inference_steps": 1}), (teacher, {"num_inference_steps": 4})]
    (fast, _), (slow, _) = time_pipelines(calls, [0, 1, 2, 3] * 16, repeats=3, min_seconds=0)
    assert order == [1, 4] * 4  # the warm-ups, then three rounds of one call each
    assert slow > fast > 0
    order.clear()
    slowest = [(teacher, {"num_inference_steps": 40})]
    time_pipelines(calls[:1] + slowest, [0, 1, 2, 3] * 16, repeats=3, min_seconds=0.3)
    rounds = [(steps, len(list(run))) for steps, run in itertools.groupby(order[2:])]
    assert [steps for steps, _ in rounds] == [1, 40] * (len(rounds) // 2)  # alternating
    assert all(n > 1 for steps, n in rounds if steps == 1)  # several fast calls per round
    assert order[2:].count(40) == len(rounds) // 2 == 3  # the slow row is in every round
