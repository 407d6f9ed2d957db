"""The flow-matching math against diffusers, closed forms and Monte-Carlo estimates."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowopd.flow import (
    cfg_velocity,
    gaussian_logprob,
    kl_weights,
    opd_loss,
    opd_pg_loss,
    sde_std,
    sde_step,
    shifted_sigmas,
    transition_mean,
    transition_scale,
)

MEASURED_SIGMAS = [1, .960, .913, .858, .790, .707, .602, .465, .278, .0089, 0]
MEASURED_W = [.0016, .0031, .0084, .018, .035, .069, .14, .34, 1.1, 1.6]


def test_schedule_matches_diffusers_and_design():
    sig = shifted_sigmas(10, 3.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    assert torch.allclose(sig, sched.sigmas.float(), atol=1e-6)
    assert torch.allclose(sig, torch.tensor(MEASURED_SIGMAS), atol=6e-4)


def test_kl_weights_match_measured_values():
    w = kl_weights(shifted_sigmas(10, 3.0), 0.7)
    for got, want in zip(w.tolist(), MEASURED_W):
        assert got == pytest.approx(want, rel=0.06)
    assert w[-1] / w[0] > 500  # late steps dominate
    # the released code's weighting omits |dt|
    sig = shifted_sigmas(10, 3.0)
    assert torch.allclose(kl_weights(sig, 0.7, exact=False) * (sig[:-1] - sig[1:]), w, rtol=1e-5)


def test_mean_is_paper_eq11_and_ode_limit():
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    s, s_next, std = 0.7, 0.6, 0.5
    dt = s_next - s
    eq11 = x + (v + std ** 2 / (2 * s) * (x + (1 - s) * v)) * dt
    assert torch.allclose(transition_mean(x, v, s, s_next, std), eq11, atol=1e-6)
    x_next, mean, _ = sde_step(x, v, s, s_next, 0.0)
    assert torch.equal(x_next, mean) and torch.allclose(x_next, x + dt * v, atol=1e-6)


def test_sde_samples_have_the_stated_gaussian():
    torch.manual_seed(0)
    x, v = torch.randn(1, 20000), torch.randn(1, 20000)
    sig = shifted_sigmas(10, 3.0)
    std = sde_std(sig, 0.7)
    j = 4
    x_next, mean, logp = sde_step(x, v, sig[j].item(), sig[j + 1].item(), std[j].item())
    scale = transition_scale(sig[j], sig[j + 1], std[j])
    resid = (x_next - mean) / scale
    assert abs(resid.mean().item()) < 0.03 and resid.std().item() == pytest.approx(1.0, abs=0.02)
    ref = torch.distributions.Normal(mean, scale).log_prob(x_next).mean()
    assert logp.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("j", [0, 4, 8])
def test_closed_form_kl_matches_monte_carlo(j):
    """KL(pi_theta || pi_T) = w_j ||v_theta - v_T||^2, estimated from samples of the two Gaussian policies."""
    g = torch.Generator().manual_seed(j)
    d, n = 16, 200_000
    sig = shifted_sigmas(10, 3.0)
    std = sde_std(sig, 0.7)
    x = torch.randn(1, d, generator=g)
    v_s = torch.randn(1, d, generator=g)
    v_t = v_s + torch.randn(1, d, generator=g) * (2 / (kl_weights(sig, 0.7)[j] * d)) ** 0.5  # KL about 2
    mu_s = transition_mean(x, v_s, sig[j], sig[j + 1], std[j])
    mu_t = transition_mean(x, v_t, sig[j], sig[j + 1], std[j])
    scale = transition_scale(sig[j], sig[j + 1], std[j])
    samples = mu_s + scale * torch.randn(n, d, generator=g)
    log_ratio = (torch.distributions.Normal(mu_s, scale).log_prob(samples)
                 - torch.distributions.Normal(mu_t, scale).log_prob(samples)).sum(1)
    closed = kl_weights(sig, 0.7)[j] * ((v_s - v_t) ** 2).sum()
    assert log_ratio.mean().item() == pytest.approx(closed.item(), rel=0.02)
    assert opd_loss(v_s, v_t, kl_weights(sig, 0.7)[j]).item() * d == pytest.approx(closed.item(), rel=1e-5)


def test_analytic_gradient_equals_policy_gradient_expectation():
    """grad of w ||v - SG(v_T)||^2 equals the averaged score-function estimate with A = -log-ratio (Eq. 14-15)."""
    g = torch.Generator().manual_seed(0)
    d, n, j = 4, 400_000, 6
    sig = shifted_sigmas(10, 3.0)
    std = sde_std(sig, 0.7)
    x = torch.randn(1, d, generator=g)
    v_t = torch.randn(1, d, generator=g)
    theta = torch.randn(1, d, generator=g, requires_grad=True)

    opd_loss(theta, v_t, kl_weights(sig, 0.7)[j]).sum().backward()
    analytic = theta.grad.clone()

    theta.grad = None
    with torch.no_grad():
        mean = transition_mean(x, theta, sig[j], sig[j + 1], std[j])
        x_next = mean + transition_scale(sig[j], sig[j + 1], std[j]) * torch.randn(n, d, generator=g)
        logp_old = gaussian_logprob(x_next, mean.expand(n, d), transition_scale(sig[j], sig[j + 1], std[j]))
    pg = opd_pg_loss(theta.expand(n, d), v_t.expand(n, d), x.expand(n, d), x_next, logp_old,
                     sig[j], sig[j + 1], std[j])
    pg.mean().backward()
    assert torch.allclose(theta.grad, analytic, rtol=0.08, atol=0.03 * analytic.abs().max().item())


def test_cfg_velocity():
    vc, vu = torch.ones(2), torch.zeros(2)
    assert torch.equal(cfg_velocity(vc, vu, 4.5), torch.full((2,), 4.5))
    assert cfg_velocity(vc, None, 4.5) is vc and cfg_velocity(vc, vu, 1.0) is vc


def test_std_uses_second_sigma_at_one():
    sig = shifted_sigmas(10, 3.0)
    assert sde_std(sig, 0.7)[0].item() == pytest.approx(0.7 * math.sqrt(1 / (1 - sig[1].item())), rel=1e-5)
    assert kl_weights(sig, 0.0).tolist() == pytest.approx(((sig[:-1] - sig[1:]) ** 2 / 2).tolist(), rel=1e-5)
