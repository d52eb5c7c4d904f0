"""MSD on DMD2: the distribution-matching gradient, the fake score, TSM, the regression pairs,
the two time-scale rule, the students component and the whole run through the CLI."""
import json

import pytest
import torch
from torch import nn

from gendistill.config import Config
from gendistill.diffusion import Denoiser, EDMDenoiser, NFECounter, append_zero, karras_sigmas, \
    sample_heun
from gendistill.methods.dmd2 import (DMD2Training, cached_pairs, denoising_loss, dm_sigmas,
                                     distribution_matching_loss, narrow_network, select_weights,
                                     teacher_pairs)
from gendistill.models.msd import MSDStudents, one_step
from gendistill.models.networks import MLPNet, build_network
from gendistill.partition import Router, contiguous_partition
from test_cli import run  # the gendistill command in a subprocess, as a user runs it
from test_ctm import run_python  # python code in a fresh process


class GaussianDenoiser(Denoiser):
    """The optimal denoiser of N(mean, std^2 I) data: mean + std^2/(std^2+sigma^2) (x - mean)."""

    def __init__(self, std: float, mean: float = 0.0):
        super().__init__(nn.Identity(), null_cond=torch.tensor(0))
        self.std, self.mean = std, mean

    def denoise(self, x, sigma, cond):
        k = self.std ** 2 / (self.std ** 2 + sigma.view(-1, *[1] * (x.ndim - 1)) ** 2)
        return self.mean + k * (x - self.mean)


def test_dm_gradient_is_zero_when_the_fake_score_equals_the_teacher():
    x = torch.randn(16, 2, requires_grad=True)
    sigma = torch.rand(16) * 3 + 0.1
    loss, grad = distribution_matching_loss(x, GaussianDenoiser(1.0), GaussianDenoiser(1.0),
                                            sigma)
    assert torch.equal(grad, torch.zeros_like(grad)) and loss.item() == 0


def test_dm_gradient_is_the_normalised_score_difference_and_points_to_the_data():
    real, fake = GaussianDenoiser(0.5), GaussianDenoiser(2.0)  # the generator is too wide
    x = (torch.randn(256, 2) * 2.0).requires_grad_(True)
    sigma, noise = torch.full((256,), 1.0), torch.randn(256, 2)
    loss, grad = distribution_matching_loss(x, real, fake, sigma, noise=noise)
    x_sigma = x.detach() + noise
    p_real = x.detach() - real(x_sigma, sigma)
    p_fake = x.detach() - fake(x_sigma, sigma)
    expected = (p_real - p_fake) / p_real.abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, expected)
    loss.backward()
    torch.testing.assert_close(x.grad, grad / grad.numel())  # d L_DM / dx = grad / N
    # a descent step moves samples inward, towards the narrower real distribution
    assert (x.detach() * -grad).sum(1).mean() < 0


def test_dm_uses_the_teacher_under_cfg():
    class ShiftByClass(Denoiser):
        def denoise(self, x, sigma, cond):
            return x * 0 + cond.float().view(-1, 1)

    teacher = ShiftByClass(nn.Identity(), null_cond=torch.tensor(0))
    x = torch.zeros(4, 2)
    cond, sigma = torch.full((4,), 2), torch.ones(4)
    # D_w = D(null) + w (D(c) - D(null)) = 0 + 3 * 2 = 6; the fake score is unguided (2)
    _, grad = distribution_matching_loss(x, teacher, teacher, sigma, cond, guidance=3.0)
    p_real, p_fake = -6.0, -2.0
    torch.testing.assert_close(grad, torch.full((4, 2), (p_real - p_fake) / 6.0))


def test_denoising_losses_vanish_at_their_optimum():
    sigma = torch.rand(64) * 2 + 0.05
    teacher = GaussianDenoiser(0.7)
    # TSM: a student equal to the teacher has zero loss
    assert denoising_loss(teacher, torch.randn(64, 2), sigma, target=teacher).item() == 0
    # the fake score's DSM: the optimal denoiser of the samples beats any other
    x0 = torch.randn(20000, 2) * 0.7
    sigma = torch.full((20000,), 0.5)
    right = denoising_loss(GaussianDenoiser(0.7), x0, sigma)
    wrong = denoising_loss(GaussianDenoiser(1.4), x0, sigma)
    assert right < 0.9 * wrong


def test_dm_sigmas_stay_within_2_and_98_percent_of_the_grid():
    grid = karras_sigmas(1000)
    s = dm_sigmas(5000, grid, generator=torch.Generator().manual_seed(0))
    assert s.max() <= grid[20] and s.min() >= grid[979]


def test_regression_pairs_come_from_the_same_noise_and_condition(tmp_path):
    teacher = toy_teacher()  # its ODE depends on the class: a misaligned condition shows
    conds = torch.arange(12) % 4
    pairs = teacher_pairs(teacher, conds, (2,), 1.0, num_steps=6, seed=0, batch_size=5)
    assert torch.equal(pairs["cond"], conds)
    sigmas = append_zero(karras_sigmas(6, teacher.sigma_min, teacher.sigma_max))
    for i in (0, 7, 11):
        again = sample_heun(teacher, pairs["noise"][i:i + 1], sigmas, conds[i:i + 1])
        torch.testing.assert_close(pairs["x"][i:i + 1], again)
        other = sample_heun(teacher, pairs["noise"][i:i + 1], sigmas, (conds[i:i + 1] + 1) % 4)
        assert (pairs["x"][i] - other[0]).abs().max() > 1e-3
    # cached: the same key reuses the file, another key makes new pairs
    calls = []

    def make():
        calls.append(1)
        return dict(pairs)

    path = tmp_path / "pairs.pt"
    cached_pairs(path, {"n": 12}, make)
    cached_pairs(path, {"n": 12}, make)
    assert len(calls) == 1
    cached_pairs(path, {"n": 13}, make)
    assert len(calls) == 2


def test_regression_pairs_are_made_again_for_another_teacher_at_the_same_path(tmp_path):
    """The pairs cache is keyed by the teacher's weights and parameterisation, not its path: a
    teacher retrained into the same folder does not reuse the old teacher's ODE endpoints."""
    from gendistill.config import load_config
    from gendistill.data import load_dataset
    from gendistill.methods.msd import regression_pairs

    cfg = load_config("configs/msd/toy2d.yaml", ["msd.num_pairs=8", "msd.pair_steps=3",
                                                 "teacher=runs/the-same-folder"])
    ds = load_dataset("toy2d", "train")
    teacher = toy_teacher()
    first = regression_pairs(cfg, teacher, ds, None, tmp_path)
    assert regression_pairs(cfg, teacher, ds, None, tmp_path)["x"].equal(first["x"])
    with torch.no_grad():
        next(teacher.net.parameters()).add_(0.5)  # retrained: other weights, same path
    again = regression_pairs(cfg, teacher, ds, None, tmp_path)
    assert not again["x"].equal(first["x"])
    assert again["x"].equal(teacher_pairs(teacher, again["cond"], (2,), cfg.msd.guidance,
                                          cfg.msd.pair_steps, cfg.seed, 256)["x"])
    # the same weights under another sigma_data (a retrained scheduler config): other pairs
    teacher.sigma_data = 1.0
    assert not regression_pairs(cfg, teacher, ds, None, tmp_path)["x"].equal(again["x"])


def toy_teacher(classes=4):
    torch.manual_seed(0)
    return EDMDenoiser(MLPNet(in_dim=2, width=32, depth=2, num_class_embeds=classes + 1),
                       null_cond=torch.tensor(classes))


def toy_training(**msd):
    cfg = Config(method="msd")
    for k, v in msd.items():
        setattr(cfg.msd, k, v)
    teacher = toy_teacher()
    pairs = {"noise": torch.randn(8, 2) * 80, "cond": torch.arange(8) % 4, "x": torch.randn(8, 2)}
    return DMD2Training(cfg, teacher, pairs), teacher


def test_students_start_from_the_teacher_and_narrow_ones_are_smaller():
    method, teacher = toy_training()
    x, sigma, c = torch.randn(5, 2), torch.rand(5) + 0.1, torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(method.fake(x, sigma, c), teacher(x, sigma, c))
    torch.testing.assert_close(method.student_denoiser()(x, sigma, c), teacher(x, sigma, c))
    narrow = narrow_network(teacher.net, 0.5)
    assert narrow.config.width == 16
    unet = build_network((1, 8, 8), num_classes=10, channels=(32, 64))
    small = narrow_network(unet, 0.25)
    assert list(small.config.block_out_channels) == [8, 16]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(unet) / 8


def test_narrow_students_start_from_the_teachers_leading_channels_or_at_random():
    unet = build_network((1, 8, 8), num_classes=10, channels=(32, 64))
    teacher = unet.state_dict()
    small = select_weights(narrow_network(unet, 0.5), unet).state_dict()
    conv = "down_blocks.0.resnets.0.conv1.weight"
    assert small[conv].shape == (16, 16, 3, 3) and teacher[conv].shape == (32, 32, 3, 3)
    for name, tensor in small.items():  # every tensor: the teacher's leading slice
        torch.testing.assert_close(tensor, teacher[name][tuple(slice(0, n) for n in tensor.shape)])
    method, teacher_denoiser = toy_training(student_width=0.5, tsm_steps=1)
    weight = method.model.state_dict()["conv_in.weight"]
    torch.testing.assert_close(weight, teacher_denoiser.net.state_dict()["conv_in.weight"][:16])
    method, _ = toy_training(student_width=0.5, tsm_steps=1, student_init="random")
    assert not torch.equal(method.model.state_dict()["conv_in.weight"], weight)


def test_two_time_scale_rule_and_stages():
    method, _ = toy_training(gen_update_ratio=5, tsm_steps=3, student_width=0.5,
                             adversarial=True, gan_start=10)
    batch = (torch.randn(8, 2), torch.arange(8) % 4)
    assert [method.stage(s) for s in (0, 2, 3, 9, 10)] == ["tsm", "tsm", "dm", "dm",
                                                            "adversarial"]
    generator_steps = [s for s in range(3, 15) if method.loss(batch, s)[0] is not None]
    assert generator_steps == [3, 8, 13]                      # 1 in 5 after TSM
    assert all(method.auxiliary_loss(batch, s)[0] is not None for s in range(3, 15))
    assert method.auxiliary_loss(batch, 0)[0] is None          # TSM: no fake score yet
    loss, logs = method.loss(batch, 13)
    assert "gan" in logs and "regression" in logs
    _, logs = method.auxiliary_loss(batch, 13)
    assert {"head", "fake_dsm"} <= set(logs)


def test_students_component_routes_a_mixed_batch_with_one_call_per_sample():
    nets = [MLPNet(in_dim=2, width=16, depth=1, num_class_embeds=5) for _ in range(2)]
    router = Router.for_classes(contiguous_partition(4, 2))
    students = MSDStudents.from_networks(nets, router, EDMDenoiser(nets[0], 0.5))
    noise = torch.randn(6, 2) * 80
    labels = torch.tensor([3, 0, 1, 2, 2, 0])
    counters = [NFECounter(n) for n in students.networks]
    with counters[0], counters[1]:
        out = students(noise, labels, router(labels))
    assert [c.rows for c in counters] == [3, 3]                # each sample: one network call
    for i in range(6):
        k = int(router(labels[i:i + 1]))
        torch.testing.assert_close(out[i:i + 1], one_step(EDMDenoiser(nets[k], 0.5),
                                                           noise[i:i + 1], labels[i:i + 1]))
    torch.testing.assert_close(students(noise, labels), out)    # class labels route themselves


TINY = ["train.max_steps=12", "train.batch_size=32", "msd.num_pairs=32", "msd.pair_steps=4",
        "train.checkpoint_every=0", "msd.num_students=2"]


@pytest.fixture(scope="module")
def msd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("msd")
    # the parts as separate jobs, then a run that only assembles
    run("train", "configs/msd/toy2d.yaml", f"output_dir={out}", *TINY, "msd.student=1")
    assert not (out / "model").exists()
    assert (out / "students" / "student-1" / "model" / "config.json").is_file()
    proc = run("train", "configs/msd/toy2d.yaml", f"output_dir={out}", *TINY, "msd.student=0")
    return out, proc


def test_parts_train_as_separate_jobs_and_a_later_run_assembles(msd_run):
    out, _ = msd_run
    stamp = (out / "students" / "student-0" / "model").stat().st_mtime
    proc = run("-v", "train", "configs/msd/toy2d.yaml", f"output_dir={out}", *TINY)
    assert "student 0: done" in proc.stderr and "student 1: done" in proc.stderr
    assert (out / "students" / "student-0" / "model").stat().st_mtime == stamp  # not retrained
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "MSDPipeline"]
    assert json.loads((out / "partition.json").read_text())["assignment"] == [0, 0, 1, 1]
    # the regression pairs span the whole conditioning space, not one student's part
    pairs = torch.load(out / "teacher_pairs.pt", weights_only=True)
    assert sorted(set(pairs["cond"].tolist())) == [0, 1, 2, 3]


def test_generate_reports_the_student_and_evaluate_reads_msd_folders(msd_run, tmp_path):
    out, _ = msd_run
    proc = run("generate", str(out), "--class", "3", "--num-samples", "4",
               "--out", str(tmp_path / "s.png"))
    assert "3: student 1" in proc.stdout
    run("evaluate", str(out), "--dataset", "toy2d", "--num-samples", "40",
        "--out", str(tmp_path / "e.json"), "--no-progress")
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["nfe"] == 1


def test_msd_pipeline_loads_in_a_fresh_process_with_diffusers_alone(msd_run, tmp_path):
    from gendistill.pipelines import MSDPipeline

    out, _ = msd_run
    pipe = MSDPipeline.from_pretrained(out / "model")
    expected = pipe(class_labels=[3, 0, 2, 1], output_type="pt",
                    generator=torch.Generator().manual_seed(5))
    assert expected.students == [1, 0, 1, 0]
    torch.save(expected.samples, tmp_path / "expected.pt")
    stdout = run_python(f"""
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(out / 'model')!r}, trust_remote_code=True)
        out = pipe(class_labels=[3, 0, 2, 1], output_type='pt',
                   generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(out.samples, torch.load({str(tmp_path / 'expected.pt')!r}),
                                   rtol=0, atol=1e-6)
        print(type(pipe).__name__, out.students)
    """, cwd=tmp_path)
    assert stdout.strip() == "MSDPipeline [1, 0, 1, 0]"


def test_bad_msd_settings_are_one_line_errors(tmp_path):
    proc = run("train", "configs/msd/toy2d.yaml", f"output_dir={tmp_path}", "msd.num_students=5",
               check=False)
    assert proc.returncode == 2 and "5 students for 4 conditions" in proc.stderr
    proc = run("train", "configs/msd/toy2d.yaml", f"output_dir={tmp_path}", "msd.student=4",
               check=False)
    assert proc.returncode == 2 and "msd.student: 4 is out of range" in proc.stderr
    proc = run("train", "configs/msd/toy2d.yaml", f"output_dir={tmp_path}",
               "msd.partition=spectral", check=False)
    assert proc.returncode == 2 and "msd.partition: expected one of" in proc.stderr


def test_prompt_students_route_by_the_pooled_text_embedding(monkeypatch):
    from diffusers import UNet2DConditionModel

    from gendistill.pipelines import MSDPipeline, load_text_encoder
    from gendistill.pipelines.text import MINILM, TextEncoder

    prompts = ["a low hum", "a bright bell", "rain on a roof", "a dog barking",
               "a deep drone", "a short click", "birds at dawn", "a car horn"]
    _states, pooled = load_text_encoder(MINILM)(prompts)
    router = Router.for_prompts(pooled, 2)
    nets = [build_network((1, 8, 8), cross_attention_dim=384, channels=(8, 16))
            for _ in range(2)]
    assert isinstance(nets[0], UNet2DConditionModel)
    pipe = MSDPipeline(students=MSDStudents.from_networks(nets, router, EDMDenoiser(nets[0], 0.5)),
                       text_encoder_name=MINILM)
    calls = []
    encode = TextEncoder.__call__
    monkeypatch.setattr(TextEncoder, "__call__",
                        lambda self, *a, **k: calls.append(a[0]) or encode(self, *a, **k))
    out = pipe(prompt=prompts, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert calls == [prompts]  # one encoder call gives the students' and the router's states
    assert out.students == router(pooled).tolist()
    assert sorted(out.students) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert out.samples.shape == (8, 1, 8, 8)
    with pytest.raises(ValueError, match="text conditions need student="):
        pipe.students(torch.randn(2, 1, 8, 8), _states[:2])


def test_resume_continues_unfinished_students_and_starts_the_rest(tmp_path):
    args = ["train", "configs/msd/toy2d.yaml", f"output_dir={tmp_path}", *TINY]
    run(*args, "msd.student=0", "train.checkpoint_every=6", "train.max_steps=7")
    proc = run("-v", *args, "train.checkpoint_every=6", "train.resume=true")
    assert "resumed from" in proc.stderr                      # student 0, from its step 6
    assert (tmp_path / "students" / "student-1" / "model").is_dir()  # student 1, afresh
    assert (tmp_path / "model" / "model_index.json").is_file()


def test_students_trained_on_another_partition_are_refused(tmp_path):
    """Parts trained as separate jobs must route as this run does: a partition.json that another
    machine's k-means or prompt split wrote differently is an error naming the file."""
    from gendistill.config import ConfigError
    from gendistill.methods.msd import check_partition

    saved = tmp_path / "partition.json"
    router = Router.for_classes([0, 0, 1, 1])
    check_partition(saved, router, overwrite=False)  # nothing saved yet
    saved.write_text(json.dumps(router.state))
    check_partition(saved, router, overwrite=False)
    saved.write_text(json.dumps(Router.for_classes([0, 1, 0, 1]).state))
    with pytest.raises(ConfigError, match="partition.json: this run computes another partition"):
        check_partition(saved, router, overwrite=False)
    check_partition(saved, router, overwrite=True)
