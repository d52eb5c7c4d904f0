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
from gendistill.models.networks import build_network, widen_network
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


def test_uniform_start_sampling_trains_every_start_as_often():
    n, grid = 200_000, 18
    times = sample_ctm_times(n, grid, generator=torch.Generator().manual_seed(0),
                             start_sampling="uniform")
    i, k, j = times.i, times.k, times.j
    assert (k >= 1).all() and (i + k <= j).all() and (j <= grid - 1).all()
    freq = torch.bincount(i, minlength=grid - 1).float() / n
    torch.testing.assert_close(freq, torch.full((grid - 1,), 1 / (grid - 1)), atol=3e-3, rtol=0)
    # given t, k ∝ k among the jumps that fit: from grid[14], k = 1, 2, 3 as 1 : 2 : 3
    fit = torch.bincount(k[i == 14], minlength=4)[1:].float() / (i == 14).sum()
    torch.testing.assert_close(fit, torch.tensor([1, 2, 3]) / 6, atol=1e-2, rtol=0)
    top = torch.bincount(k[i == 0], minlength=grid)[1:].float() / (i == 0).sum()
    expected = torch.arange(1, grid).float() / torch.arange(1, grid).sum()
    torch.testing.assert_close(top, expected, atol=1e-2, rtol=0)
    capped = sample_ctm_times(n, grid, max_jump=3, start_sampling="uniform")
    assert capped.k.max() <= 3 and (capped.i + capped.k <= grid - 1).all()
    assert (capped.i == grid - 2).any()  # the last start is drawn too
    with pytest.raises(ValueError, match="start_sampling"):
        sample_ctm_times(4, grid, start_sampling="top")


def test_final_jump_prob_sends_that_share_of_jumps_to_sigma_min():
    n, grid = 200_000, 18

    def draw(p):
        return sample_ctm_times(n, grid, generator=torch.Generator().manual_seed(0),
                                final_jump_prob=p)

    # the default's times are drawn as before: the key changes nothing when off
    before = sample_ctm_times(n, grid, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(vars(draw(0.0)).values(), vars(before).values()))
    assert (draw(1.0).j == grid - 1).all()
    half = draw(0.5)
    # half forced, plus the uniform draw's own share of j = N - 1 among the other half
    uniform_share = (before.j == grid - 1).float().mean()
    share = (half.j == grid - 1).float().mean()
    torch.testing.assert_close(share, 0.5 + 0.5 * uniform_share, atol=5e-3, rtol=0)
    assert torch.equal(half.i, before.i) and torch.equal(half.k, before.k)  # only s moves
    assert (half.i + half.k <= half.j).all()


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


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("kind", ["unet", "unet-one-head-scale-shift", "mlp"])
def test_a_widened_network_computes_the_same_function(kind, factor):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    if kind == "unet":  # attention in the second block and the middle, GroupNorm everywhere
        net, x = tiny_unet(), torch.randn(6, 1, 8, 8)
    elif kind.startswith("unet"):  # a head as wide as its block; the time embedding as FiLM
        net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, num_class_embeds=5,
                          block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                          attention_head_dim=None, resnet_time_scale_shift="scale_shift",
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        x = torch.randn(6, 1, 8, 8)
    else:
        net, x = build_network((2,), num_classes=4, width=16, depth=2), torch.randn(6, 2)
    y, t = torch.tensor([0, 1, 2, 3, 4, 1]), torch.tensor([80.0, 10.0, 3.0, 1.0, 0.3, 0.01])
    wide = widen_network(net, factor)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        torch.testing.assert_close(wide(x, t, y).sample, net(x, t, y).sample,
                                   atol=2e-5, rtol=1e-4)
    student = CTMStudent.from_teacher(wide, 0.5, 0.002, embed_guidance=True)
    with torch.no_grad():  # the wide student is its teacher at step 0
        torch.testing.assert_close(student(x, t, 0.0, y, 3.0), EDMDenoiser(net, 0.5)(x, t, y),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_widened_copies_learn_apart_only_with_the_split_noise(noise):
    torch.manual_seed(0)
    wide = widen_network(tiny_unet(), 2, noise=noise)
    optimiser = torch.optim.Adam(wide.parameters(), lr=1e-3)
    x, y, t = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)), torch.rand(8) * 5
    for _ in range(3):
        optimiser.zero_grad()
        (wide(x, t, y).sample - x).square().mean().backward()
        optimiser.step()
    first = wide.conv_in.weight  # output channel 2c and 2c + 1 are the copies of channel c
    gap = (first[0::2] - first[1::2]).abs().max().item()
    assert gap > 1e-5 if noise else gap == 0.0


def test_only_unets_and_mlps_widen():
    dit = build_network((1, 8, 8), num_classes=10, network_type="dit", width=32, depth=1,
                        heads=2)
    with pytest.raises(ValueError, match="widening supports"):
        widen_network(dit, 2)
    with pytest.raises(ValueError, match="whole number"):
        widen_network(tiny_unet(), 1.5)


def test_student_works_for_mlp_and_text_unets():
    mlp = build_network((2,), num_classes=4, width=16, depth=2)
    s = CTMStudent.from_teacher(mlp, 0.5, 0.002, embed_guidance=False)
    assert s(torch.randn(3, 2), 1.0, 0.5, torch.tensor([0, 1, 2])).shape == (3, 2)
    text = build_network((1, 8, 8), cross_attention_dim=32, channels=(8, 16))
    s = CTMStudent.from_teacher(text, 0.5, 0.002, embed_guidance=True)
    out = s(torch.randn(2, 1, 8, 8), 1.0, 0.5, torch.randn(2, 5, 32), torch.tensor([2.0, 4.0]))
    assert out.shape == (2, 1, 8, 8)


def test_guidance_in_text_scales_the_captions_departure_from_the_empty_prompt(tmp_path):
    """guidance_in_text: c_null + (1 + a(omega)) (c - c_null) with a zero at the start (the
    student is its teacher); once learned, omega moves the output through cross-attention alone
    (the time-embedding path held at zero), while the empty prompt (the unconditional student)
    stays the same at every omega. The empty prompt's states are saved with the student.
    Class-conditional networks refuse it."""
    torch.manual_seed(0)
    text = build_network((1, 8, 8), cross_attention_dim=32, channels=(8, 16))
    teacher = EDMDenoiser(text, 0.5)
    null = torch.randn(1, 5, 32)
    s = CTMStudent.from_teacher(text, 0.5, 0.002, embed_guidance=True, null_text=null)
    assert s.config.guidance_in_text and s.config.text_tokens == 5
    x, states, t = torch.randn(2, 1, 8, 8), torch.randn(2, 5, 32), torch.full((2,), 1.5)
    with torch.no_grad():
        torch.testing.assert_close(s.denoise(x, t, t, states, torch.tensor([2.0, 4.0])),
                                   teacher(x, t, states), atol=1e-5, rtol=0)
        torch.nn.init.normal_(s.guidance_text_gain.linear_2.weight, std=0.1)
        low, high = (s.denoise(x, t, t, states, torch.full((2,), w)) for w in (2.0, 5.0))
        empty = null.expand(2, 5, 32)
        empty_low, empty_high = (s.denoise(x, t, t, empty, torch.full((2,), w))
                                 for w in (2.0, 5.0))
    assert not s.guidance_embedding.linear_2.weight.any()
    assert (high - low).abs().max() > 1e-3
    torch.testing.assert_close(empty_low, empty_high, atol=1e-6, rtol=0)
    assert {n.split(".")[0] for n, p in s.named_parameters()
            if any(p is q for q in s.embedding_parameters())} == {
        "s_embedding", "guidance_embedding", "guidance_text_gain"}
    s.save_pretrained(tmp_path / "student")
    torch.testing.assert_close(CTMStudent.from_pretrained(tmp_path / "student").null_text,
                               null[0])
    for network, embed_guidance in ((tiny_unet(), True), (text, False)):
        with pytest.raises(ValueError, match="cross-attention on text token states"):
            CTMStudent.from_teacher(network, 0.5, 0.002, embed_guidance=embed_guidance,
                                    null_text=null)


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


def test_loading_copies_the_shims_under_the_shared_lock(tmp_path, monkeypatch):
    """diffusers rewrites one shared copy of each shim on every load, so two processes loading
    at once could import a half-written one: every copy happens while our lock is held (a
    second flock on its file is refused)."""
    import fcntl
    import shutil

    from gendistill.pipelines.base import shim_lock_path

    save_with_remote_code(make_pipe(), tmp_path / "student")
    copy, held = shutil.copyfile, []

    def copyfile(src, dst, *args, **kwargs):
        with open(shim_lock_path(), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    CTMPipeline.from_pretrained(tmp_path / "student")
    assert len(held) >= 2 and all(held)  # the pipeline's shim and the student's


def test_tampered_shim_needs_explicit_trust(tmp_path):
    pipe = make_pipe()
    save_with_remote_code(pipe, tmp_path)
    (tmp_path / "pipeline.py").write_text("import os\nfrom gendistill.pipelines import "
                                          "CTMPipeline\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        CTMPipeline.from_pretrained(tmp_path)


def test_lpips_without_weights_or_torchvision_is_a_clear_error(monkeypatch, tmp_path):
    from gendistill.config import ConfigError
    from gendistill.methods.ctm import lpips_distance, lpips_network

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    lpips_network.cache_clear()
    with pytest.raises(ConfigError, match="needs torchvision's VGG16 weights"):
        lpips_distance(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ConfigError, match="needs torchvision: pip install torchvision"):
        lpips_network()
    lpips_network.cache_clear()


def test_lpips_inputs_as_ctm_feeds_them():
    from gendistill.methods.ctm import lpips_inputs

    x = torch.linspace(-1.5, 1.5, 2 * 2 * 8 * 8).view(2, 2, 8, 8)  # out of [-1, 1], 2 channels
    y = lpips_inputs(x)
    assert y.shape == (4, 3, 224, 224)                   # one grey image per channel
    assert y.min() < -1.2 and y.max() > 1.2               # not clamped
    ref = nn.functional.interpolate(x[1:2, 0:1], size=224, mode="bilinear", align_corners=False)
    torch.testing.assert_close(y[2, 1], ref[0, 0])
    assert lpips_inputs(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 224, 224)


@pytest.mark.slow
def test_short_distillation_improves_the_one_step_jump(tmp_path):
    """150 CTM steps on the shipped toy2d teacher: the 1-step MMD² must fall far below the
    untrained student's (the teacher's Euler jump from the same start to sigma_min: 0.39;
    trained: 0.010), with exact toy2d samples as truth."""
    from gendistill.config import load_config
    from gendistill.eval.evaluate import evaluate_pipeline
    from gendistill.pipelines import load_pipeline
    from gendistill.train import run_training

    cfg = load_config("configs/ctm/toy2d.yaml", [f"output_dir={tmp_path}", "train.max_steps=150",
                                                 "train.checkpoint_every=0"])
    model = run_training(cfg)
    student = load_pipeline(model)
    student.set_progress_bar_config(disable=True)
    teacher = load_pipeline("gendistill/assets/teachers/toy2d")
    teacher.set_progress_bar_config(disable=True)
    c = student.scheduler.config
    kw = dict(num_samples=1000, progress=False)
    before = evaluate_pipeline(teacher, "toy2d", sampler="euler",
                               sigmas=[c.one_step_sigma, c.sigma_min], **kw)["score"]
    after = evaluate_pipeline(student, "toy2d", num_inference_steps=1, **kw)["score"]
    assert after < 0.1 * before, (before, after)


# ---------------------------------------------------------------- tests that catch wrong formulas

def test_student_reads_s_and_omega():
    """g(x, t, s, omega) changes with s (even between neighbouring grid points) and with omega
    once the extra embeddings are trained; without the hook into the time embedding it would
    not."""
    student = CTMStudent.from_teacher(build_network((2,), num_classes=4, width=32, depth=2),
                                      0.5, 0.002, embed_guidance=True)
    for emb in (student.s_embedding, student.guidance_embedding):
        torch.nn.init.normal_(emb.linear_2.weight, std=0.5)
    x, y, t = torch.randn(8, 2), torch.arange(8) % 4, torch.full((8,), 5.0)
    grid = karras_sigmas(18)
    with torch.no_grad():
        g = lambda s, w=2.0: student(x, t, s, y, w, return_denoised=True)  # noqa: E731
        for a, b in zip(grid[-6:-1], grid[-5:]):  # neighbouring small s are told apart
            assert (g(a) - g(b)).abs().max() > 1e-4
        assert (g(0.1, 2.0) - g(0.1, 4.0)).abs().max() > 1e-3


def test_a_shared_s_and_omega_are_embedded_once_and_jump_as_per_sample_values_do():
    """A sampler's one s and omega for the batch are embedded as one row, broadcast onto every
    sample: the jump equals the one from each sample's own copy; a per-sample omega still gets
    one row per sample."""
    for net in (build_network((2,), num_classes=4, width=32, depth=2), tiny_unet(4)):
        student = CTMStudent.from_teacher(net, 0.5, 0.002, embed_guidance=True)
        for emb in (student.s_embedding, student.guidance_embedding):
            torch.nn.init.normal_(emb.linear_2.weight, std=0.5)
        rows = []
        student.s_embedding.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
        shape = (2,) if net.config.get("in_dim") else (1, 8, 8)
        x, y, full = torch.randn(6, *shape), torch.arange(6) % 4, lambda v: torch.full((6,), v)
        omegas = torch.linspace(1.0, 5.0, 6)
        with torch.no_grad():
            torch.testing.assert_close(student(x, 5.0, 0.3, y, 2.5),
                                       student(x, full(5.0), full(0.3), y, full(2.5)))
            torch.testing.assert_close(student(x, 5.0, 0.3, y, omegas),
                                       student(x, full(5.0), full(0.3), y, omegas))
        assert rows == [1, 6, 6, 6]


def test_s_is_uniform_from_u_to_the_end_of_the_grid():
    n, grid = 300_000, 6
    times = sample_ctm_times(n, grid, generator=torch.Generator().manual_seed(1))
    pick = (times.i == 0) & (times.k == 1)
    counts = torch.bincount(times.j[pick], minlength=grid)[1:].float()
    torch.testing.assert_close(counts / counts.sum(), torch.full((grid - 1,), 1 / (grid - 1)),
                               atol=0.03, rtol=0)


def test_gamma_step_lands_at_sqrt_one_minus_gamma_squared():
    sched = CTMScheduler()
    sched.set_timesteps(3, gamma=0.6)
    t_next, sigma_min = float(sched.sigmas[1]), 0.002
    assert sched.jump(0)[1] == pytest.approx(0.8 * (t_next - sigma_min) + sigma_min)


def test_teacher_features_are_taken_at_the_given_level():
    teacher = EDMDenoiser(build_network((2,), num_classes=4, width=32, depth=2), 0.5)
    x, y = torch.randn(6, 2), torch.arange(6) % 4
    est = x + 0.1
    near, far = (teacher_feature_distance(teacher, est, x, torch.full((6,), s), y)
                 for s in (0.01, 80.0))
    assert (near - far).abs().max() > 1e-6


class Recorder(nn.Module):
    """Wraps a network and records (t, s, grad enabled) of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, s, *args, **kw):
        self.calls.append((torch.as_tensor(t).clone(), torch.as_tensor(s).clone(),
                           torch.is_grad_enabled()))
        return self.net(x, t, s, *args, **kw)

    @property
    def last_layer(self):
        return self.net.last_layer


def ctm_training(tmp_path, *overrides):
    from diffusers import EDMEulerScheduler

    from gendistill.config import load_config
    from gendistill.methods.ctm import CTMTraining
    from gendistill.pipelines import TeacherPipeline

    net = build_network((2,), num_classes=4, width=32, depth=2)
    teacher = TeacherPipeline(net, EDMEulerScheduler())
    cfg = load_config("configs/ctm/toy2d.yaml", [f"output_dir={tmp_path}", "ctm.num_grid=8",
                                                 *overrides])
    return CTMTraining(cfg, teacher, torch.tensor(4))


@pytest.mark.parametrize("inner", ["ema", "online"])
def test_ctm_loss_wiring(tmp_path, monkeypatch, inner):
    """The teacher runs from t = grid[i] for k steps; the target jumps u = grid[i+k] -> s =
    grid[j] with the EMA (or the online network, without gradient); the estimate jumps t -> s
    with gradient; the feature distance is taken at s; no gradient reaches the target."""
    import gendistill.methods.ctm as ctm

    method = ctm_training(tmp_path, f"ctm.target_inner={inner}", "train.cond_dropout=0")
    fixed = ctm.CTMTimes(torch.tensor([0, 2, 3]), torch.tensor([2, 1, 4]), torch.tensor([5, 3, 7]))
    monkeypatch.setattr(ctm, "sample_ctm_times", lambda *a, **k: fixed)
    solves, levels = [], []
    real_solve = ctm.teacher_solve

    def solve(teacher, x, grid, start, steps, *a):
        solves.append((start.clone(), steps.clone()))
        return real_solve(teacher, x, grid, start, steps, *a)

    monkeypatch.setattr(ctm, "teacher_solve", solve)
    real_features = method.teacher.features
    monkeypatch.setattr(method.teacher, "features",
                        lambda x, sigma, c=None: levels.append(sigma.clone()) or
                        real_features(x, sigma, c))
    method.model, method.target.model = Recorder(method.model), Recorder(method.target.model)
    loss, _ = method.loss((torch.randn(3, 2), torch.tensor([0, 1, 2])), step=0)
    grid = method.grid
    assert torch.equal(solves[0][0], fixed.i) and torch.equal(solves[0][1], fixed.k)
    u, s, t = grid[fixed.i + fixed.k], grid[fixed.j], grid[fixed.i]
    inner_net = method.target.model if inner == "ema" else method.model
    target_call = inner_net.calls[0]
    torch.testing.assert_close(target_call[0], u)
    torch.testing.assert_close(target_call[1], s)
    assert target_call[2] is False                      # the target is computed without grad
    estimate_call = next(c for c in method.model.calls if c[2] and c[0].shape == t.shape
                         and torch.equal(c[0], t))
    torch.testing.assert_close(estimate_call[1], s)
    assert len(levels) == 2 and all(torch.equal(lv, s) for lv in levels)
    loss.backward()
    assert all(p.grad is None for p in method.target.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.model.parameters())


def test_output_weighting_trains_the_network_in_edms_units(tmp_path, monkeypatch):
    """ctm.output_weighting multiplies each sample's distance by (c_out / |dg/dF|)^2 at t:
    exactly 1 for an EDM student (its loss is unchanged), (c_out / t)^2 for epsilon prediction,
    whose g = x - t F would otherwise let the largest t dominate every batch."""
    from diffusers import DDPMScheduler

    from gendistill.diffusion import edm_scalings
    from gendistill.diffusion.teachers import scheduler_config

    t = torch.tensor([0.01, 1.0, 10.0, 80.0])
    vp = CTMStudent.from_teacher(tiny_unet(), 0.5, 0.002, embed_guidance=False,
                                 teacher_scheduler=scheduler_config(DDPMScheduler()))
    torch.testing.assert_close(vp.output_weight(t), (edm_scalings(t, 0.5)[1] / t) ** 2)
    methods = []
    for overrides in (["ctm.output_weighting=true"], []):
        torch.manual_seed(0)
        methods.append(ctm_training(tmp_path, "train.cond_dropout=0", *overrides))
    weighted, plain = methods
    assert torch.equal(weighted.model.output_weight(t), torch.ones(4))
    batch = (torch.randn(8, 2), torch.arange(8) % 4)
    logs = []
    for method in (weighted, plain, weighted):
        torch.manual_seed(1)
        logs.append(method.loss(batch, step=0)[1]["ctm"])
        monkeypatch.setattr(weighted.model, "output_weight", lambda t: torch.full_like(t, 3.0))
    assert torch.equal(logs[0], logs[1])
    torch.testing.assert_close(logs[2], 3 * logs[1])


def test_the_new_embeddings_learn_at_their_own_rate(tmp_path):
    """ctm.embedding_lr_scale multiplies the lr of the s and omega embeddings only (the rest of
    the student starts trained, they start at zero)."""
    method = ctm_training(tmp_path, "ctm.embedding_lr_scale=10", "ctm.guidance_max=5")
    rest, embeddings = method.optimizer.param_groups
    student = method.model
    names = {id(p): n for n, p in student.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in embeddings["params"]} == {
        "s_embedding", "guidance_embedding"}
    assert len(rest["params"]) + len(embeddings["params"]) == len(list(student.parameters()))
    assert embeddings["lr"] == pytest.approx(10 * rest["lr"])
    assert rest["lr"] == method.cfg.train.lr


def test_guidance_in_text_without_text_states_is_a_config_error(tmp_path):
    from gendistill.config import ConfigError

    with pytest.raises(ConfigError, match="ctm.guidance_in_text needs CFG distillation"):
        ctm_training(tmp_path, "ctm.guidance_in_text=true", "ctm.guidance_max=5")


def test_sigma_max_caps_the_grid_the_dsm_levels_and_the_students_range(tmp_path, monkeypatch):
    """ctm.sigma_max: the CTM grid and the DSM levels stop there, and so does the exported
    scheduler; above the teacher's own sigma_max it is a config error naming the range."""
    import gendistill.methods.ctm as ctm
    from gendistill.config import ConfigError

    method = ctm_training(tmp_path, "ctm.sigma_max=10")
    assert float(method.grid[0]) == pytest.approx(10.0)
    assert float(method.grid[-1]) == pytest.approx(method.teacher.sigma_min)
    assert method.scheduler.config.sigma_max == pytest.approx(10.0)
    levels = []
    real_sampler = ctm.sample_half_lognormal
    monkeypatch.setattr(ctm, "sample_half_lognormal", lambda *a, **k: levels.append(
        k["sigma_max"]) or real_sampler(*a, **k))
    method.loss((torch.randn(8, 2), torch.arange(8) % 4), step=0)
    assert levels == [10.0]
    assert float(ctm_training(tmp_path).grid[0]) == pytest.approx(80.0)  # unset: the teacher's
    with pytest.raises(ConfigError, match=r"ctm.sigma_max must be in \(0.002, 80\]"):
        ctm_training(tmp_path, "ctm.sigma_max=100")


def test_teacher_targets_run_in_fp32_under_autocast():
    """The training loop's autocast must not reach the teacher's Heun targets or features."""
    teacher = EDMDenoiser(build_network((2,), num_classes=4, width=32, depth=2), 0.5)
    grid = karras_sigmas(6)
    x, y = torch.randn(4, 2) * 80, torch.arange(4)
    start, steps = torch.zeros(4, dtype=torch.long), torch.full((4,), 3)
    reference = teacher_solve(teacher, x, grid, start, steps, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = teacher_solve(teacher, x, grid, start, steps, y)
        feats = teacher.features(x, grid[start], y)
        with torch.no_grad():
            d = teacher_feature_distance(teacher, x.bfloat16(), x, grid[start], y)
    assert feats[0].dtype == torch.bfloat16  # autocast is on here ...
    assert mixed.dtype == torch.float32      # ... but not inside the teacher's solve
    torch.testing.assert_close(mixed, reference, rtol=0, atol=0)
    assert d.dtype == torch.float32


def test_feature_discriminator_on_unet_and_mlp_features():
    from gendistill.methods.ctm import discriminator_logits, hinge_discriminator_loss
    from gendistill.models.discriminator import FeatureDiscriminator

    for net, x, cond in ((tiny_unet(), torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])),
                         (build_network((2,), num_classes=4, width=32, depth=2),
                          torch.randn(3, 2), torch.tensor([0, 1, 2]))):
        teacher = EDMDenoiser(net, 0.5)
        feats = teacher.features(x, torch.ones(3), cond)
        disc = FeatureDiscriminator.for_features(feats)
        assert len(disc.heads) == len(feats) and disc(feats).shape == (3,)
        # ctm.gan_sigma: the teacher's features of x noised at that level, else at a random one
        torch.manual_seed(0)
        fixed = discriminator_logits(teacher.features, disc, x, cond, 0.1)
        torch.manual_seed(0)
        noised = x + 0.1 * torch.randn_like(x)
        torch.testing.assert_close(fixed, disc(teacher.features(noised, torch.full((3,), 0.1),
                                                                cond)))
        torch.manual_seed(0)
        assert not torch.allclose(discriminator_logits(teacher.features, disc, x, cond), fixed)
    # hinge: zero once real logits >= 1 and fake logits <= -1
    assert hinge_discriminator_loss(torch.tensor([1.5, 1.0]), torch.tensor([-2.0])) == 0
    assert hinge_discriminator_loss(torch.tensor([0.0]), torch.tensor([0.0])) == 2


@pytest.mark.parametrize("term", ["gan", "dm"])
def test_auxiliary_term_switches_on_at_its_start_and_never_trains_the_teacher(tmp_path, term):
    """ctm.gan_weight / ctm.dm_weight > 0: from gan_start / dm_start the generator gets the term
    on its 1-step samples with the adaptive weight in [0.01, 10], the auxiliary network (the
    discriminator's heads, or DMD's fake score) steps, and the teacher stays frozen. The fake
    score starts as the teacher, so the first DM loss is exactly zero."""
    from diffusers import EDMEulerScheduler

    from gendistill.config import load_config
    from gendistill.data import load_dataset
    from gendistill.methods.ctm import CTMTraining
    from gendistill.pipelines import TeacherPipeline
    from gendistill.train import data_loader
    from gendistill.training import train

    net = build_network((2,), num_classes=4, width=32, depth=2)
    teacher = TeacherPipeline(net, EDMEulerScheduler())
    teacher.set_progress_bar_config(disable=True)
    cfg = load_config("configs/ctm/toy2d.yaml", [
        f"output_dir={tmp_path}", "ctm.num_grid=6", "ctm.gan_weight=0", f"ctm.{term}_weight=1",
        f"ctm.{term}_start=2", "train.max_steps=4", "train.batch_size=16", "train.log_every=1",
        "train.checkpoint_every=0"])
    method = CTMTraining(cfg, teacher, torch.tensor(4))
    auxiliary = {k: v.clone() for k, v in method.auxiliary[0].state_dict().items()}
    teacher_weights = {k: v.clone() for k, v in net.state_dict().items()}
    logs = []
    real_loss = method.loss
    method.loss = lambda b, s: (lambda out: logs.append((s, out[1])) or out)(real_loss(b, s))
    ds = load_dataset("toy2d", "train")
    train(cfg, method, data_loader(ds.x, ds.y, 16, 0))
    assert [s for s, log in logs if term in log] == [2, 3]
    assert all(0.01 <= log[f"{term}_weight"] <= 10 for s, log in logs if s >= 2)
    if term == "dm":
        assert logs[2][1]["dm"] == 0 and logs[3][1]["dm"] > 0
    trained = method.auxiliary[0].state_dict()
    assert any(not v.equal(trained[k]) for k, v in auxiliary.items())
    assert all(v.equal(net.state_dict()[k]) for k, v in teacher_weights.items())


def test_dm_two_time_scale_rule_has_the_fake_score_step_alone(tmp_path):
    """ctm.gen_update_ratio = 2 (DMD2's rule, at 2): from dm_start the student steps, and its
    target network moves, every second iteration only; the fake score learns fresh 1-step
    samples on every iteration, those where the student sits out included."""
    from diffusers import EDMEulerScheduler

    from gendistill.config import load_config
    from gendistill.data import load_dataset
    from gendistill.methods.ctm import CTMTraining
    from gendistill.pipelines import TeacherPipeline
    from gendistill.train import data_loader
    from gendistill.training import train

    teacher = TeacherPipeline(build_network((2,), num_classes=4, width=32, depth=2),
                              EDMEulerScheduler())
    cfg = load_config("configs/ctm/toy2d.yaml", [
        f"output_dir={tmp_path}", "ctm.num_grid=6", "ctm.gan_weight=0", "ctm.dm_weight=1",
        "ctm.dm_start=2", "ctm.gen_update_ratio=2", "train.max_steps=7", "train.batch_size=16",
        "train.checkpoint_every=0", "train.log_every=2"])
    method = CTMTraining(cfg, teacher, torch.tensor(4))
    student_losses, fake_steps, target_moves, current = [], [], [], [None]
    real_loss, real_aux, real_update = method.loss, method.auxiliary_loss, method.target.update

    def loss(batch, step):
        current[0] = step
        out = real_loss(batch, step)
        student_losses.append((step, out[0] is not None, "dm" in out[1]))
        return out

    def auxiliary_loss(batch, step):
        out = real_aux(batch, step)
        if out[0] is not None:
            fake_steps.append(step)
        return out

    def update(model):
        target_moves.append(student_losses[-1][0])
        real_update(model)

    method.loss, method.auxiliary_loss, method.target.update = loss, auxiliary_loss, update
    # a latent teacher's VAE encodes the batch only where the student steps (the fake score's
    # samples need the latents' shape, not the data's latents)
    encoded, real_encode = [], method.teacher_pipe.encode
    method.teacher_pipe.encode = lambda x: encoded.append(current[0]) or real_encode(x)
    ds = load_dataset("toy2d", "train")
    train(cfg, method, data_loader(ds.x, ds.y, 16, 0))
    assert student_losses == [(0, True, False), (1, True, False), (2, True, True),
                              (3, False, False), (4, True, True), (5, False, False),
                              (6, True, True)]
    assert encoded == [0, 1, 2, 4, 6]
    assert fake_steps == [2, 3, 4, 5, 6]
    assert target_moves == [0, 1, 2, 4, 6]
    # every second iteration is logged, here always one where the student sat out: the log
    # still carries the student's newest DM loss and weight, not only the fake score's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("dm_weight")] == [4, 6, 7]
    assert [e.step for e in events.Scalars("fake_dsm")] == [4, 6, 7]


def test_gan_and_dm_terms_together_are_a_config_error():
    from gendistill.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="ctm.gan_weight and ctm.dm_weight"):
        load_config("configs/ctm/toy2d.yaml", ["ctm.gan_weight=1", "ctm.dm_weight=1"])
    with pytest.raises(ConfigError, match="ctm.gen_update_ratio .5. paces the student"):
        load_config("configs/ctm/toy2d.yaml", ["ctm.gen_update_ratio=5"])


def test_the_discriminator_learns_to_tell_shrunk_samples_from_real():
    """On the shipped toy2d teacher's features at a low ctm.gan_sigma, the heads learn to tell
    the data from the data shrunk by 0.7 (a blurred model's signature) within 200 steps: the
    hinge loss falls from near 2 (logits near zero) below 1, real logits above fake ones."""
    from gendistill.assets import ASSETS
    from gendistill.config import load_config
    from gendistill.data import load_dataset
    from gendistill.methods.ctm import CTMTraining
    from gendistill.pipelines import load_pipeline

    torch.manual_seed(0)
    teacher = load_pipeline(ASSETS / "teachers" / "toy2d")
    cfg = load_config("configs/ctm/toy2d.yaml", ["ctm.gan_weight=1", "ctm.gan_sigma=0.05"])
    method = CTMTraining(cfg, teacher, teacher.null_condition())
    discriminator, optimizer = method.auxiliary
    data = load_dataset("toy2d", "train")
    history = []
    for step in range(200):
        i = torch.randint(0, len(data.x), (256,))
        method.generated, method.generated_cond = 0.7 * data.x[i], data.y[i]
        loss, logs = method.auxiliary_loss((data.x[i], data.y[i]), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(logs)
    last = history[-20:]
    assert history[0]["disc"] > 1.6
    assert sum(float(h["disc"]) for h in last) / 20 < 1.0
    assert all(h["d_real"] > h["d_fake"] for h in last)


@pytest.mark.parametrize("scale", [0.7, 1.3])
def test_dm_gradient_moves_scaled_samples_back_towards_the_data(scale):
    """The fake score learns the samples it is given (the data shrunk by 0.7, a blurred
    model's signature, or spread by 1.3) through auxiliary_loss; the DM gradient the student
    then gets moves those samples towards the teacher's data: outwards, or inwards. Before
    the fake score has learned it is exactly zero."""
    from gendistill.assets import ASSETS
    from gendistill.config import load_config
    from gendistill.data import load_dataset
    from gendistill.methods.ctm import CTMTraining
    from gendistill.methods.dmd2 import distribution_matching_loss, dm_sigmas
    from gendistill.pipelines import load_pipeline

    torch.manual_seed(0)
    teacher = load_pipeline(ASSETS / "teachers" / "toy2d")
    cfg = load_config("configs/ctm/toy2d.yaml", ["ctm.gan_weight=0", "ctm.dm_weight=1"])
    method = CTMTraining(cfg, teacher, teacher.null_condition())
    fake_score, optimizer = method.auxiliary
    data = load_dataset("toy2d", "train")
    i = torch.randint(0, len(data.x), (1024,))
    x, cond = scale * data.x[i], data.y[i]

    def outward():
        sigma = dm_sigmas(len(x), method.dm_grid)
        _, grad = distribution_matching_loss(x, method.teacher, fake_score.denoiser, sigma, cond)
        return float((-grad * x).sum(1).mean())  # gradient descent moves x by -grad

    assert outward() == 0
    for step in range(300):
        j = torch.randint(0, len(x), (256,))
        method.generated, method.generated_cond = x[j], cond[j]
        loss, _ = method.auxiliary_loss((data.x[j], data.y[j]), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert outward() > 0.1 if scale < 1 else outward() < -0.1


def test_gan_judges_the_one_step_samples_the_pipeline_makes(tmp_path):
    """The GAN's fake samples are the exported pipeline's 1-step call at omega = 1 (from where
    its scheduler starts a single jump), not a jump from sigma_max the user never samples."""
    from diffusers import EDMEulerScheduler

    from gendistill.config import load_config
    from gendistill.methods.ctm import CTMTraining
    from gendistill.pipelines import TeacherPipeline, load_pipeline

    torch.manual_seed(0)
    net = build_network((2,), num_classes=4, width=32, depth=2)
    cfg = load_config("configs/ctm/toy2d.yaml", ["ctm.num_grid=6", "ctm.guidance_max=3"])
    method = CTMTraining(cfg, TeacherPipeline(net, EDMEulerScheduler()), torch.tensor(4))
    torch.nn.init.normal_(method.model.guidance_embedding.linear_2.weight, std=0.1)
    method.export(method.model, tmp_path / "student")
    pipe = load_pipeline(tmp_path / "student")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    with torch.no_grad():
        fake = method.one_step_samples(torch.zeros(4, 2), labels)
    torch.manual_seed(1)
    z = torch.randn(4, 2)
    sampled = {w: pipe(class_labels=labels.tolist(), num_inference_steps=1, latents=z,
                       guidance_scale=w).latents for w in (1.0, 3.0)}
    torch.testing.assert_close(fake, sampled[1.0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fake, sampled[3.0], atol=1e-3)


def test_shipped_toy2d_student_is_a_sharp_one_step_generator():
    """The shipped student keeps the modes its teacher has: the blur the old recipe left
    (MMD² 0.0064, precision 0.78) would fail here."""
    from gendistill.assets import builtin_student
    from gendistill.eval.evaluate import evaluate_pipeline
    from gendistill.pipelines import load_pipeline

    student = load_pipeline(builtin_student("toy2d"))
    student.set_progress_bar_config(disable=True)
    with torch.no_grad():
        r = evaluate_pipeline(student, "toy2d", 1000, 0, progress=False, num_inference_steps=1)
    assert r["nfe"] == 1
    assert r["score"] < 0.004 and r["precision"] > 0.88 and r["recall"] > 0.95, r
    # after training, g(x, t, s) depends on s: the jump to sigma_min lands far from the
    # denoiser's mean (s = t), and neighbouring small s are told apart
    g = torch.Generator().manual_seed(0)
    x, y = 80 * torch.randn(512, 2, generator=g), torch.arange(512) % 4
    net = student.unet
    with torch.no_grad():
        at = {s: net(x, 80.0, s, y, return_denoised=True) for s in (80.0, 1.0, 0.1, 0.002)}
    rms = lambda a, b: float((a - b).pow(2).sum(1).mean().sqrt())  # noqa: E731
    assert rms(at[0.002], at[80.0]) > 0.5 and rms(at[0.1], at[1.0]) > 0.1


def test_shipped_digits_student_and_the_demo_picture(tmp_path):
    """The shipped CFG-distilled digits student: one call, the requested class, omega an input;
    the demo draws it beside its teacher."""
    from gendistill.assets import builtin_student
    from gendistill.demo import shipped_students
    from gendistill.eval.accuracy import conditional_accuracy
    from gendistill.pipelines import load_pipeline

    student = load_pipeline(builtin_student("digits"))
    student.set_progress_bar_config(disable=True)
    assert student.unet.has_guidance
    labels = list(range(10)) * 5
    out = student(class_labels=labels, num_inference_steps=1, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).samples
    assert conditional_accuracy(out, torch.tensor(labels), "digits") > 0.9
    shipped_students(tmp_path)
    for name in ("digits", "toy2d"):
        assert (tmp_path / f"{name}_teacher_vs_ctm.png").stat().st_size > 5000


def test_one_jump_starts_at_one_step_sigma_and_longer_grids_at_sigma_max():
    sched = CTMScheduler()  # the defaults: sigma_max 80, one_step_sigma 10
    sched.set_timesteps(1)
    assert sched.sigmas.tolist() == pytest.approx([10.0, 0.002])
    sched.set_timesteps(2)
    assert float(sched.sigmas[0]) == pytest.approx(80.0)
    for one_step_sigma, start in ((None, 80.0), (200.0, 80.0)):  # off; capped at sigma_max
        sched = CTMScheduler(one_step_sigma=one_step_sigma)
        sched.set_timesteps(1)
        assert float(sched.sigmas[0]) == pytest.approx(start)
    # a student saved before the option existed samples with the default
    old = {"_class_name": "CTMScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0,
           "gamma": 0.0}
    assert CTMScheduler.from_config(old).config.one_step_sigma == 10.0
    with pytest.raises(ValueError, match="one_step_sigma must be above sigma_min"):
        CTMScheduler(one_step_sigma=0.0)


def test_gan_heads_on_a_classifier_read_its_maps_of_the_clean_samples(tmp_path):
    """ctm.gan_classifier: the discriminator's heads sit on the classifier's feature maps (each
    level's pooled map and the penultimate features) of the samples as they are (no noise
    unless ctm.gan_sigma); the gradient reaches the samples, never the classifier; both
    players' losses run. A missing folder, or one that takes other samples, is a one-line
    config error."""
    from gendistill.assets import ASSETS
    from gendistill.config import ConfigError, load_config
    from gendistill.data import load_dataset
    from gendistill.eval.classifier import load_classifier_from, train_classifier
    from gendistill.methods.ctm import CTMTraining, discriminator_logits
    from gendistill.pipelines import load_pipeline

    torch.manual_seed(0)
    folder = train_classifier("digits", tmp_path / "clf", epochs=1, seed=1, progress=False)
    classifier = load_classifier_from(folder)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    maps = classifier.feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [(3, 32, 4, 4), (3, 64, 2, 2), (3, 64)]
    torch.testing.assert_close(maps[-1], classifier.features(x))

    teacher = load_pipeline(ASSETS / "teachers" / "digits")
    teacher.set_progress_bar_config(disable=True)
    cfg = load_config("configs/ctm/digits.yaml", ["ctm.gan_weight=0.1",
                                                  f"ctm.gan_classifier={folder}"])
    method = CTMTraining(cfg, teacher, teacher.null_condition())
    disc = method.discriminator
    assert len(disc.heads) == len(maps)
    x.requires_grad_(True)
    logits = discriminator_logits(method.gan_features, disc, x, None, method.gan_sigma)
    torch.testing.assert_close(logits, disc(classifier.feature_maps(x)))  # clean: no noise
    logits.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.gan_classifier.parameters())

    data = load_dataset("digits", "train")
    batch = (data.x[:4], data.y[:4])
    loss, logs = method.loss(batch, 0)
    assert torch.isfinite(loss) and "gan" in logs and 0.01 <= logs["gan_weight"] <= 10
    loss, logs = method.auxiliary_loss(batch, 0)
    assert torch.isfinite(loss) and "disc" in logs

    with pytest.raises(ConfigError, match="set ctm.gan_weight > 0 too"):
        load_config("configs/ctm/digits.yaml", [f"ctm.gan_classifier={folder}"])
    missing = load_config("configs/ctm/digits.yaml", ["ctm.gan_weight=0.1",
                                                      f"ctm.gan_classifier={tmp_path}"])
    with pytest.raises(ConfigError, match="ctm.gan_classifier: .*no domain classifier"):
        CTMTraining(missing, teacher, teacher.null_condition())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="has no input_shape.*not a classifier folder"):
        CTMTraining(load_config("configs/ctm/digits.yaml", [
            "ctm.gan_weight=0.1", f"ctm.gan_classifier={foreign}"]), teacher,
            teacher.null_condition())
    toy = load_pipeline(ASSETS / "teachers" / "toy2d")
    other = load_config("configs/ctm/toy2d.yaml", [f"ctm.gan_classifier={folder}"])
    with pytest.raises(ConfigError, match=r"takes inputs of shape \(1, 8, 8\), the teacher's"):
        CTMTraining(other, toy, toy.null_condition())


def test_a_term_that_starts_after_the_last_step_is_warned_about(caplog, monkeypatch):
    """The toy2d config's GAN term starts at step 2,000: a 1,000-step run of it trains without
    the term, which is allowed (short toy runs) but said."""
    import logging

    from gendistill.assets import ASSETS
    from gendistill.config import load_config
    from gendistill.methods.ctm import CTMTraining
    from gendistill.pipelines import load_pipeline

    teacher = load_pipeline(ASSETS / "teachers" / "toy2d")
    with caplog.at_level(logging.WARNING, logger="gendistill.methods.ctm"):
        CTMTraining(load_config("configs/ctm/toy2d.yaml"), teacher, teacher.null_condition())
        assert not caplog.records
        short = load_config("configs/ctm/toy2d.yaml", ["train.max_steps=1000"])
        CTMTraining(short, teacher, teacher.null_condition())
    assert "ctm.gan_start (2000) is not below train.max_steps (1000): this run trains without " \
        "the GAN term" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # the other processes of a multi-process run stay quiet
    with caplog.at_level(logging.WARNING, logger="gendistill.methods.ctm"):
        CTMTraining(short, teacher, teacher.null_condition())
    assert not caplog.records


def test_a_gan_on_the_scoring_classifier_is_warned_about(caplog):
    """The shipped domain classifier is what the domain FID reads: a GAN on its features is
    allowed (a user's choice) but said, since that score then no longer judges independently."""
    import logging

    from gendistill.assets import ASSETS
    from gendistill.config import load_config
    from gendistill.eval.classifier import classifier_dir
    from gendistill.methods.ctm import CTMTraining
    from gendistill.pipelines import load_pipeline

    teacher = load_pipeline(ASSETS / "teachers" / "digits")
    cfg = load_config("configs/ctm/digits.yaml", [
        "ctm.gan_weight=0.1", f"ctm.gan_classifier={classifier_dir('digits')}"])
    with caplog.at_level(logging.WARNING, logger="gendistill.methods.ctm"):
        method = CTMTraining(cfg, teacher, teacher.null_condition())
    assert "is a shipped domain classifier: the domain FID reads its features" in caplog.text
    assert method.gan_classifier is not None


def fitted_start(scale=1.0):
    """A per-class Gaussian start for the tiny 8x8 students: class c's samples around c / 10."""
    from gendistill.models.start import GaussianStart

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    x = labels.view(-1, 1, 1, 1) / 10 + scale * torch.randn(200, 1, 8, 8, generator=g)
    return GaussianStart.fit(x, labels, 10, rank=16)


def test_the_gaussian_start_carries_sigma_max_noise_down_to_the_first_jump():
    """With a ``start`` the first jump reads start(sigma_max z, sigma_max, t_0, label) instead
    of t_0 z; from sigma_max (two or more jumps) that is sigma_max z itself, and a start fitted
    to data that is all zeros is the noise start."""
    from gendistill.models.start import GaussianStart

    pipe = make_pipe()
    seen = []
    pipe.unet.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(class_labels=[0, 4, 7], latents=z, output_type="latent")
    plain = pipe(**kw).samples
    pipe.register_modules(start=fitted_start())
    one = pipe(**kw).samples
    expected = pipe.start(80 * z, 80.0, 10.0, torch.tensor([0, 4, 7]))
    torch.testing.assert_close(seen[-1], expected)
    assert (expected - 10 * z).abs().mean() > 0.05 and not torch.allclose(one, plain)
    # each class its own moments: class 7's start sits around 0.7, class 0's around 0
    assert expected[2].mean() - expected[0].mean() > 0.3
    # computed in the start's float32, returned in the caller's dtype
    double = pipe.start(80 * z.double(), 80.0, 10.0, torch.tensor([0, 4, 7]))
    assert double.dtype == torch.float64 and torch.allclose(double.float(), expected, atol=1e-5)
    pipe.register_modules(start=None)
    two = pipe(num_inference_steps=2, **kw).samples
    pipe.register_modules(start=fitted_start())
    torch.testing.assert_close(pipe(num_inference_steps=2, **kw).samples, two)
    pipe.register_modules(start=GaussianStart.fit(torch.zeros(4, 1, 8, 8)))
    torch.testing.assert_close(pipe(**kw).samples, plain)
    with pytest.raises(ValueError, match="holds moments of 64 values per sample, got samples "
                                         r"of shape \(1, 4, 4\)"):
        pipe.start(torch.zeros(2, 1, 4, 4), 80.0, 10.0)
    with pytest.raises(ValueError, match="class 3 has 0"):
        GaussianStart.fit(torch.zeros(8, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2, 4, 4]), 10)


def test_a_student_trained_below_sigma_max_draws_its_noise_where_the_start_does():
    """A student whose range ends at 5 (``ctm.sigma_max=5``) starts every grid from the Gaussian
    start's own sigma_max: its 1- and 2-jump grids read start(80 z, 80, 5), on the data's
    marginal, where 5 z is not; without a start it is 5 z; a start saved before the key existed
    loads at 80."""
    from gendistill.models.start import GaussianStart

    pipe = make_pipe()
    pipe.scheduler = CTMScheduler(sigma_max=5.0)
    seen = []
    pipe.unet.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 7])
    kw = dict(class_labels=labels.tolist(), latents=z, output_type="latent")
    pipe(**kw)
    torch.testing.assert_close(seen[-1], 5 * z)
    pipe.register_modules(start=fitted_start())
    assert pipe.start.config.sigma_max == 80.0
    expected = pipe.start(80 * z, 80.0, 5.0, labels)
    for steps in (1, 2):
        seen.clear()
        pipe(num_inference_steps=steps, **kw)
        torch.testing.assert_close(seen[0], expected)
    config = dict(pipe.start.config)
    config.pop("sigma_max")
    assert GaussianStart.from_config(config).config.sigma_max == 80.0


def test_a_gaussian_start_saved_into_a_folder_loads_with_diffusers(tmp_path):
    """``save_component`` (what ``calibrate`` writes) adds the start to a saved student, and
    diffusers' generic loader samples from it in a fresh process; saving None removes it."""
    from gendistill.pipelines.remote import save_component

    pipe = make_pipe()
    folder = tmp_path / "student"
    save_with_remote_code(pipe, folder)
    pipe.register_modules(start=fitted_start())
    save_component(folder, "start", pipe.start)
    kw = dict(class_labels=[0, 4, 7], output_type="pt")
    expected = pipe(generator=torch.Generator().manual_seed(7), **kw).samples
    torch.save(expected, tmp_path / "expected.pt")
    run_python(f"""
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(pipe.start).__name__ == "GaussianStart"
        out = pipe(class_labels=[0, 4, 7], output_type="pt",
                   generator=torch.Generator().manual_seed(7)).samples
        torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}),
                                   rtol=0, atol=1e-6)
    """, cwd=tmp_path)
    save_component(folder, "start", None)
    assert not (folder / "start").exists() and CTMPipeline.from_pretrained(folder).start is None
