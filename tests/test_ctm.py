"""CTM / SoundCTM pieces on tiny networks, and the pipeline's save / load contract."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gendistill.diffusion import EDMDenoiser, karras_sigmas, sample_heun
from gendistill.methods.ctm import (adaptive_weight, l2_distance, normalized_feature_distance,
                                    sample_ctm_times, teacher_feature_distance, teacher_solve)
from gendistill.models.networks import build_network
from gendistill.models.student import CTMStudent
from gendistill.pipelines import CTMPipeline, CTMScheduler
from gendistill.pipelines.remote import save_with_remote_code


def tiny_unet(classes=10):
    return build_network((1, 8, 8), num_classes=classes, channels=(8, 16))


def test_time_sampling_follows_p_k_proportional_to_k():
    n, grid = 200_000, 18
    times = sample_ctm_times(n, grid, generator=torch.Generator().manual_seed(0))
    i, k, j = times.i, times.k, times.j
    assert (k >= 1).all() and (k <= grid - 1).all()
    assert (i >= 0).all() and (i + k <= j).all() and (j <= grid - 1).all()
    freq = torch.bincount(k, minlength=grid)[1:].float() / n
    expected = torch.arange(1, grid).float() / torch.arange(1, grid).sum()
    torch.testing.assert_close(freq, expected, atol=3e-3, rtol=0)
    # i is uniform on {0..N-1-k}: for k = N-1 it is always 0
    assert (i[k == grid - 1] == 0).all()
    # K caps the jump
    assert sample_ctm_times(1000, grid, max_jump=3).k.max() <= 3


def test_untrained_student_is_the_teacher():
    net = tiny_unet()
    student = CTMStudent.from_teacher(net, 0.5, 0.002, embed_guidance=True)
    teacher = EDMDenoiser(net, 0.5)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    t = torch.tensor([80.0, 5.0, 1.0, 0.1])
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, 0.0, y, 3.0), teacher(x, t, y))  # G(x,t,0) = D
        torch.testing.assert_close(student(x, t, t, y, 2.0), x)                 # G(x,t,t) = x
        g = student(x, t, t / 2, y, 1.5, return_denoised=True)
        torch.testing.assert_close(student(x, t, t / 2, y, 1.5), 0.5 * x + 0.5 * g)


def test_student_works_for_mlp_and_text_unets():
    mlp = build_network((2,), num_classes=4, width=16, depth=2)
    s = CTMStudent.from_teacher(mlp, 0.5, 0.002, embed_guidance=False)
    assert s(torch.randn(3, 2), 1.0, 0.5, torch.tensor([0, 1, 2])).shape == (3, 2)
    text = build_network((1, 8, 8), cross_attention_dim=32, channels=(8, 16))
    s = CTMStudent.from_teacher(text, 0.5, 0.002, embed_guidance=True)
    out = s(torch.randn(2, 1, 8, 8), 1.0, 0.5, torch.randn(2, 5, 32), torch.tensor([2.0, 4.0]))
    assert out.shape == (2, 1, 8, 8)


def test_teacher_feature_distance_zero_for_identical_and_differentiable():
    teacher = EDMDenoiser(tiny_unet(), 0.5).requires_grad_(False)
    a, y, sigma = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), torch.full((3,), 0.7)
    assert teacher_feature_distance(teacher, a, a, sigma, y).abs().max() < 1e-10
    est = (a + 0.3 * torch.randn_like(a)).requires_grad_(True)
    d = teacher_feature_distance(teacher, est, a, sigma, y)
    assert d.shape == (3,) and (d > 0).all()
    d.sum().backward()
    assert est.grad is not None and est.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_normalisation_is_per_channel_vector():
    a = torch.randn(2, 4, 3, 3)
    # scaling each position's channel vector leaves the distance unchanged
    scale = torch.rand(2, 1, 3, 3) + 0.5
    assert normalized_feature_distance([a * scale], [a]).abs().max() < 1e-10
    assert (normalized_feature_distance([a], [-a]) > 0).all()
    torch.testing.assert_close(l2_distance(a, a + 1), torch.ones(2))


def test_adaptive_weight_matches_its_definition():
    layer = nn.Linear(3, 1)
    x = torch.randn(8, 3)
    main = (layer(x) ** 2).mean()
    aux = (layer(2 * x) - 1).abs().mean()
    w = adaptive_weight(main, aux, layer.weight)
    g1 = torch.autograd.grad(main, layer.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(aux, layer.weight, retain_graph=True)[0]
    assert w.item() == pytest.approx((g1.norm() / (g2.norm() + 1e-4)).item(), rel=1e-6)
    assert not w.requires_grad
    zero_aux = (layer.bias * 0).sum()
    assert adaptive_weight(main, zero_aux + 0 * layer.weight.sum(), layer.weight) <= 1e3


def test_batched_teacher_solve_equals_heun_per_sample():
    teacher = EDMDenoiser(tiny_unet(), 0.5, null_cond=torch.tensor(10))
    grid = karras_sigmas(10)
    x, y = torch.randn(3, 1, 8, 8) * 5, torch.tensor([1, 2, 3])
    start, steps = torch.tensor([0, 2, 5]), torch.tensor([3, 1, 4])
    out = teacher_solve(teacher, x, grid, start, steps, y, guidance=torch.tensor([1.0, 2.0, 3.0]))
    for b, w in enumerate([1.0, 2.0, 3.0]):
        sl = grid[start[b]:start[b] + steps[b] + 1]
        ref = sample_heun(teacher, x[b:b + 1], sl, y[b:b + 1], guidance=w)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-4, atol=1e-4)


def test_gamma_sampling_schedule():
    sched = CTMScheduler()
    sched.set_timesteps(4, gamma=0.0)
    t0, s0 = sched.jump(0)
    assert t0 == pytest.approx(80.0) and s0 == pytest.approx(float(sched.sigmas[1]))
    x = torch.zeros(2, 3)
    assert torch.equal(sched.step(x, 0), x)  # gamma = 0: no renoising
    sched.set_timesteps(4, gamma=1.0)
    assert sched.jump(1)[1] == pytest.approx(0.002)  # consistency multistep jumps to sigma_min
    z = sched.step(torch.zeros(20000, 1), 1, torch.Generator().manual_seed(0))
    expected = (float(sched.sigmas[2]) ** 2 - 0.002 ** 2) ** 0.5
    assert z.std().item() == pytest.approx(expected, rel=0.03)
    assert torch.equal(sched.step(x, 3), x)  # nothing after the last jump
    with pytest.raises(ValueError, match="gamma must be in"):
        sched.set_timesteps(2, gamma=1.5)


def make_pipe(embed_guidance=False):
    net = tiny_unet()
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    student = CTMStudent.from_teacher(net, 0.5, 0.002, embed_guidance)
    torch.nn.init.normal_(student.s_embedding.linear_2.weight, std=0.1)
    pipe = CTMPipeline(student, CTMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_nu_interpolation_is_one_batched_call():
    pipe = make_pipe(embed_guidance=True)
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    kw = dict(class_labels=[1, 2], output_type="latent", guidance_scale=2.0)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cond = pipe(generator=g(), nu=1.0, **kw).samples
    uncond = pipe(generator=g(), nu=0.0, **kw).samples
    calls.clear()
    mid = pipe(generator=g(), nu=0.5, **kw).samples
    assert calls == [4]
    torch.testing.assert_close(mid, uncond + 0.5 * (cond - uncond))


def test_unguided_student_rejects_guidance():
    with pytest.raises(ValueError, match="not CFG-distilled"):
        make_pipe()(class_labels=[1], guidance_scale=3.0)


def run_python(code: str, cwd):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_round_trip_and_diffusers_remote_code_loading(tmp_path):
    pipe = make_pipe(embed_guidance=True)
    folder = tmp_path / "student"
    save_with_remote_code(pipe, folder)
    kw = dict(class_labels=[0, 4, 7], num_inference_steps=3, gamma=0.5, guidance_scale=2.5,
              output_type="pt")
    expected = pipe(generator=torch.Generator().manual_seed(7), **kw).samples
    torch.save(expected, tmp_path / "expected.pt")
    call = ("pipe(class_labels=[0, 4, 7], num_inference_steps=3, gamma=0.5, guidance_scale=2.5,"
            " output_type='pt', generator=torch.Generator().manual_seed(7)).samples")
    # our own class, in a fresh process
    run_python(f"""
        import torch
        from gendistill.pipelines import CTMPipeline
        pipe = CTMPipeline.from_pretrained({str(folder)!r})
        out = {call}
        torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}),
                                   rtol=0, atol=1e-6)
    """, cwd=tmp_path)
    # diffusers' generic loader, the caller never imports gendistill
    out = run_python(f"""
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = {call}
        torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}),
                                   rtol=0, atol=1e-6)
        print(type(pipe).__name__)
    """, cwd=tmp_path)
    assert out.strip() == "CTMPipeline"


def test_tampered_shim_needs_explicit_trust(tmp_path):
    pipe = make_pipe()
    save_with_remote_code(pipe, tmp_path)
    (tmp_path / "pipeline.py").write_text("import os\nfrom gendistill.pipelines import "
                                          "CTMPipeline\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        CTMPipeline.from_pretrained(tmp_path)


def test_lpips_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    from gendistill.config import ConfigError
    from gendistill.methods.ctm import lpips_distance

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="needs torchvision's VGG16 weights"):
        lpips_distance(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))


@pytest.mark.slow
def test_short_distillation_improves_the_one_step_jump(tmp_path):
    """300 CTM steps on the shipped toy2d teacher: the 1-step SW2 must fall well below the
    untrained student's (which is the teacher's Euler-1 jump), with exact toy2d samples as truth."""
    from gendistill.config import load_config
    from gendistill.eval.evaluate import evaluate_pipeline
    from gendistill.pipelines import load_pipeline
    from gendistill.train import run_training

    cfg = load_config("configs/ctm/toy2d.yaml", [f"output_dir={tmp_path}", "train.max_steps=300",
                                                 "train.checkpoint_every=0"])
    model = run_training(cfg)
    student = load_pipeline(model)
    student.set_progress_bar_config(disable=True)
    teacher = load_pipeline("gendistill/assets/teachers/toy2d")
    teacher.set_progress_bar_config(disable=True)
    kw = dict(num_samples=1000, progress=False, num_inference_steps=1)
    before = evaluate_pipeline(teacher, "toy2d", sampler="euler", **kw)["score"]
    after = evaluate_pipeline(student, "toy2d", **kw)["score"]
    assert after < 0.85 * before, (before, after)
