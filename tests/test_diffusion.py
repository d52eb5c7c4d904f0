"""Exact-maths checks of the sigma-space core against the Gaussian optimal denoiser.

For x0 ~ N(mu, s^2 I) the optimal denoiser is E[x0 | x_sigma] = mu + s^2 / (s^2 + sigma^2)
(x_sigma - mu). Oracle networks return the exact epsilon / v / x0 / velocity for their own
parameterisation, computed independently of the adapters (numpy interpolation of the real
diffusers scheduler's table); each adapter must recover the optimal x0.
"""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from gendistill.diffusion import (EDMDenoiser, FlowDenoiser, NFECounter, VPDenoiser, append_zero,
                                  cfg_denoise, denoiser_from_scheduler, edm_scalings,
                                  karras_sigmas, sample_euler, sample_half_lognormal, sample_heun)

MU, S = 0.3, 0.5


def optimal_x0(x_sigma, sigma):
    sigma = sigma.view(-1, *([1] * (x_sigma.ndim - 1)))
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x_sigma - MU)


def bcast(v, x):
    return v.view(-1, *([1] * (x.ndim - 1)))


class VPOracle(nn.Module):
    """Receives (x_vp, fractional t) like a diffusers UNet; returns the exact eps / v / x0."""

    def __init__(self, scheduler, prediction_type):
        super().__init__()
        ac = scheduler.alphas_cumprod.double().numpy()
        self.log_sigmas = np.log(np.sqrt((1 - ac) / ac))
        self.prediction_type = prediction_type

    def forward(self, x_vp, timestep):
        log_sigma = np.interp(timestep.double().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas)
        sigma = torch.from_numpy(np.exp(log_sigma)).float()
        sb = bcast(sigma, x_vp)
        abar = 1 / (1 + sb ** 2)
        x_sigma = x_vp / abar.sqrt()
        x0 = optimal_x0(x_sigma, sigma)
        eps = (x_sigma - x0) / sb
        return {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0,
                "sample": x0}[self.prediction_type]


class FlowOracle(nn.Module):
    def forward(self, x_fm, timestep):
        t = bcast(timestep / 1000, x_fm)
        x_sigma = x_fm / (1 - t)
        x0 = optimal_x0(x_sigma, (t / (1 - t)).flatten())
        eps = (x_fm - (1 - t) * x0) / t
        return eps - x0


class EDMOracle(nn.Module):
    def forward(self, x_in, timestep):
        sigma = (4 * timestep).exp()  # EDM's c_noise = ln(sigma) / 4
        c_skip, c_out, c_in, _ = (bcast(c, x_in) for c in edm_scalings(sigma, 0.5))
        x = x_in / c_in
        return (optimal_x0(x, sigma) - c_skip * x) / c_out


def random_points(n=64, dim=3, lo=0.05, hi=20.0):
    sigma = torch.exp(torch.empty(n).uniform_(np.log(lo), np.log(hi)))
    x0 = MU + S * torch.randn(n, dim)
    return x0 + bcast(sigma, x0) * torch.randn(n, dim), sigma


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_adapter_recovers_optimal_denoiser(prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    denoiser = denoiser_from_scheduler(VPOracle(sched, prediction_type), sched)
    assert isinstance(denoiser, VPDenoiser)
    x, sigma = random_points()
    torch.testing.assert_close(denoiser(x, sigma), optimal_x0(x, sigma), rtol=1e-4, atol=1e-4)


def test_vp_sigma_is_limited_to_table():
    sched = DDPMScheduler(num_train_timesteps=1000)
    d = VPDenoiser(VPOracle(sched, "epsilon"), sched.alphas_cumprod)
    ac = sched.alphas_cumprod.double()
    assert d.sigma_max == pytest.approx(float(((1 - ac[-1]) / ac[-1]).sqrt()), rel=1e-6)
    assert d.sigma_min == pytest.approx(float(((1 - ac[0]) / ac[0]).sqrt()), rel=1e-6)
    t = d.sigma_to_t(torch.tensor([1e-6, 1e6]))
    assert t.tolist() == pytest.approx([0, 999], abs=1e-3)


def test_flow_adapter_recovers_optimal_denoiser():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    denoiser = denoiser_from_scheduler(FlowOracle(), sched)
    assert isinstance(denoiser, FlowDenoiser)
    x, sigma = random_points()
    torch.testing.assert_close(denoiser(x, sigma), optimal_x0(x, sigma), rtol=1e-4, atol=1e-4)


def test_edm_adapter_matches_diffusers_edm_scheduler():
    sched = EDMEulerScheduler(sigma_data=0.5)
    denoiser = denoiser_from_scheduler(EDMOracle(), sched)
    assert isinstance(denoiser, EDMDenoiser)
    x, sigma = random_points()
    torch.testing.assert_close(denoiser(x, sigma), optimal_x0(x, sigma), rtol=1e-4, atol=1e-4)
    # the same scalings as diffusers' own EDM preconditioning
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, 0.5)
    torch.testing.assert_close(c_in, sched.precondition_inputs(torch.ones_like(sigma), sigma))
    torch.testing.assert_close(c_noise, sched.precondition_noise(sigma))
    raw = torch.randn_like(sigma)
    torch.testing.assert_close(c_skip * 0 + c_out * raw,
                               sched.precondition_outputs(torch.zeros_like(sigma), raw, sigma))


class Shifted(nn.Module):
    """An oracle whose output is moved by ``delta``: D(F + delta) - D(F) = dD/dF delta."""

    def __init__(self, net, delta=0.0):
        super().__init__()
        self.net, self.delta = net, delta

    def forward(self, x, timestep):
        return self.net(x, timestep) + self.delta


@pytest.mark.parametrize("scheduler", [
    DDPMScheduler(prediction_type="epsilon"), DDPMScheduler(prediction_type="v_prediction"),
    DDPMScheduler(prediction_type="sample"), FlowMatchEulerDiscreteScheduler(),
    EDMEulerScheduler(sigma_data=0.5)], ids=["eps", "v", "x0", "flow", "edm"])
def test_output_scale_is_how_far_the_denoiser_moves_per_unit_of_network_output(scheduler):
    oracle = {"DDPMScheduler": lambda: VPOracle(scheduler, scheduler.config.prediction_type),
              "FlowMatchEulerDiscreteScheduler": FlowOracle,
              "EDMEulerScheduler": EDMOracle}[type(scheduler).__name__]()
    shifted = Shifted(oracle)
    denoiser = denoiser_from_scheduler(shifted, scheduler)
    x, sigma = random_points(dim=1, hi=80.0)
    x, sigma = x.double(), sigma.double()
    base = denoiser(x, sigma)
    shifted.delta = 1e-3
    moved = (denoiser(x, sigma) - base).abs().flatten() / 1e-3
    torch.testing.assert_close(moved, denoiser.output_scale(sigma), rtol=1e-5, atol=1e-6)


def test_karras_grid_formula_and_ends():
    s = karras_sigmas(18)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    i = torch.arange(18, dtype=torch.float64)
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-9)
    assert (s[1:] < s[:-1]).all()


def test_half_lognormal_halves():
    s = sample_half_lognormal(20000)
    log_half = s[:10000].log()
    assert log_half.mean().item() == pytest.approx(-1.2, abs=0.05)
    assert log_half.std().item() == pytest.approx(1.2, abs=0.05)
    karras_half = s[10000:]
    lo = karras_sigmas(2, sigma_min=0.002)[0]  # u = 0 gives sigma_max
    assert karras_half.max() <= lo + 1e-4
    u_max_sigma = (80 ** (1 / 7) + 0.7 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert karras_half.min().item() >= u_max_sigma - 1e-6


@pytest.mark.parametrize("adapter", ["edm", "vp"])
def test_heun_transports_noise_to_the_data_gaussian(adapter):
    if adapter == "edm":
        denoiser, sigma_max = EDMDenoiser(EDMOracle(), 0.5), 80.0
    else:
        sched = DDPMScheduler(num_train_timesteps=1000)
        denoiser = VPDenoiser(VPOracle(sched, "epsilon"), sched.alphas_cumprod)
        sigma_max = denoiser.sigma_max
    n, dim = 20000, 2
    # 18 steps leave ~11 % variance error on this narrow Gaussian (pure Heun discretisation,
    # checked in closed form); 80 steps leave < 1 %.
    steps = 80
    sigmas = append_zero(karras_sigmas(steps, max(0.002, denoiser.sigma_min), sigma_max))
    x = MU + (S ** 2 + sigma_max ** 2) ** 0.5 * torch.randn(n, dim)
    with NFECounter(denoiser.net) as counter:
        out = sample_heun(denoiser, x, sigmas)
    assert counter.calls == 2 * steps - 1  # the last step, to sigma = 0, is an Euler step
    se_mean = S / n ** 0.5
    assert (out.mean(0) - MU).abs().max().item() < 5 * se_mean
    var = out.var(0)
    assert ((var - S ** 2).abs() / S ** 2).max().item() < 0.04


def test_euler_one_step_is_the_denoiser():
    denoiser = EDMDenoiser(EDMOracle(), 0.5)
    x = 80 * torch.randn(100, 2)
    out = sample_euler(denoiser, x, append_zero(karras_sigmas(1)))
    torch.testing.assert_close(out, optimal_x0(x, torch.full((100,), 80.0)))


class CondNet(nn.Module):
    """Output = class label as a number, so each branch of CFG is visible."""

    def forward(self, x, timestep, class_labels=None):
        return torch.zeros_like(x) + bcast(class_labels.float(), x)


def test_cfg_combines_both_branches_in_one_forward():
    d = EDMDenoiser(CondNet(), 0.5, null_cond=torch.tensor(9))
    x, sigma = torch.randn(4, 2), torch.full((4,), 1.0)
    cond = torch.tensor([1, 2, 3, 4])
    plain_c, plain_null = d(x, sigma, cond), d(x, sigma, torch.full((4,), 9))
    with NFECounter(d.net) as counter:
        guided = cfg_denoise(d, x, sigma, cond, guidance=3.5)
    assert counter.calls == 1 and counter.rows == 8 and counter.per_sample(4) == 2
    torch.testing.assert_close(guided, plain_null + 3.5 * (plain_c - plain_null))
    torch.testing.assert_close(cfg_denoise(d, x, sigma, cond, 1.0), plain_c)
    torch.testing.assert_close(cfg_denoise(d, x, sigma, cond, 0.0), plain_null)
    w = torch.tensor([0.0, 1.0, 2.0, 3.0])
    torch.testing.assert_close(cfg_denoise(d, x, sigma, cond, w),
                               plain_null + bcast(w, x) * (plain_c - plain_null))


def gaussian_data_moments(dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.randn(dim, generator=g, dtype=torch.float64), a @ a.T / dim


def test_gaussian_ode_is_the_exact_flow_of_gaussian_data():
    """For N(mu, Sigma) data the closed form equals Heun on the PF-ODE with the optimal
    denoiser D = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), and carries the marginal
    N(mu, Sigma + sigma_from^2 I) exactly onto N(mu, Sigma + sigma_to^2 I)."""
    from gendistill.diffusion.gaussian import gaussian_ode

    mu, cov = gaussian_data_moments()
    eye = torch.eye(len(mu), dtype=torch.float64)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    zero = torch.zeros((), dtype=torch.float64)

    def denoise(x, sigma):
        return mu + (x - mu) @ torch.linalg.solve(cov + sigma ** 2 * eye, cov)

    x = 80 * torch.randn(4, len(mu), generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    y, sigmas = x.clone(), torch.linspace(80, 1.5, 4001, dtype=torch.float64)
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        d = (y - denoise(y, a)) / a
        y_euler = y + (b - a) * d
        y = y + (b - a) * (d + (y_euler - denoise(y_euler, b)) / b) / 2
    # Heun's own error over 4,000 steps is 3e-5 here
    torch.testing.assert_close(gaussian_ode(x, 80.0, 1.5, mu, eigvals, eigvecs, zero), y,
                               rtol=0, atol=2e-4)
    # where pure noise would only be rescaled (x 1.5 / 80), the data's moments move it far more
    assert (y - x * 1.5 / 80).abs().max() > 0.5
    # the map is affine: its linear part takes the one marginal's covariance to the other's
    linear = gaussian_ode(eye + mu, 10.0, 2.0, mu, eigvals, eigvecs, zero) - mu
    torch.testing.assert_close(linear.T @ (cov + 100 * eye) @ linear, cov + 4 * eye)


def test_gaussian_moments_keep_the_top_eigenvectors_and_the_rest_as_one_variance():
    """Covariance diag(9, 4, 1, 1, 1) rotated: rank 2 keeps 9 and 4, the tail's mean variance
    (1) is exact here, so the rank-2 flow is the full one; too few samples is an error."""
    from gendistill.diffusion.gaussian import gaussian_moments, gaussian_ode

    g = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    scales = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    z = torch.randn(200_000, 5, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whiten
    x = 0.5 + (z * scales) @ rotation.T
    mean, eigvals, eigvecs, residual = gaussian_moments(x, rank=2)
    torch.testing.assert_close(mean, torch.full((5,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(eigvals, torch.tensor([9.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(residual, torch.tensor(1.0, dtype=torch.float64))
    full = gaussian_moments(x)
    assert full[1].shape == (5,) and full[3] == 0
    noise = 80 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gaussian_ode(noise, 80.0, 3.0, mean, eigvals, eigvecs, residual),
                               gaussian_ode(noise, 80.0, 3.0, *full))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        gaussian_moments(x[:1])
