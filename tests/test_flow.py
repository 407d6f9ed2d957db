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


@pytest.mark.parametrize("j", [0, 5, 9])
def test_released_kl_weight_is_the_released_formula(j):
    """The released Flow-OPD KL, mean(dmu^2) / (2 std^2) on the Euler-Maruyama means written out here,
    equals kl_weights(exact=False) * mean(dv^2); it is the exact weight times |dt|."""
    torch.manual_seed(j)
    sig = shifted_sigmas(10, 3.0)
    a = 0.7
    s, s_next = sig[j].double().item(), sig[j + 1].double().item()
    std = a * math.sqrt(s / (1 - (sig[1].item() if s == 1 else s)))
    dt = s_next - s
    x, v_s, v_t = (torch.randn(4, 16, dtype=torch.float64) for _ in range(3))

    def mean(v):
        return x * (1 + std ** 2 / (2 * s) * dt) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
    released = ((mean(v_s) - mean(v_t)) ** 2).mean(1) / (2 * std ** 2)
    ours = kl_weights(sig, a, exact=False)[j].double() * ((v_s - v_t) ** 2).mean(1)
    assert torch.allclose(ours, released, rtol=1e-5)
    exact = kl_weights(sig, a)[j].double() * abs(dt)
    assert kl_weights(sig, a, exact=False)[j].item() == pytest.approx(exact.item(), rel=1e-5)


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


def test_the_math_keeps_to_the_device_of_its_inputs():
    """Every formula run on `meta` tensors: a constant table or intermediate created on another device
    (which fails on a GPU with "Expected all tensors to be on the same device") raises here too."""
    from flowopd.grpo import grpo_loss
    dev = torch.device("meta")
    sig = shifted_sigmas(10, 3.0).to(dev)
    std = sde_std(sig, 0.7)
    w = kl_weights(sig, 0.7)
    j = torch.tensor([0, 3, 8], device=dev)
    x, v, vt, x_next = (torch.empty(3, 4, 2, 2, device=dev) for _ in range(4))
    logp_old = torch.empty(3, device=dev)
    outs = [transition_mean(x, v, sig[j], sig[j + 1], std[j]), transition_scale(sig[j], sig[j + 1], std[j]),
            opd_loss(v, vt, w[j]), opd_pg_loss(v, vt, x, x_next, logp_old, sig[j], sig[j + 1], std[j], 0.1),
            *grpo_loss(v, vt, x, x_next, logp_old, torch.empty(3, device=dev), sig[j], sig[j + 1], std[j], 1e-4, 0.04),
            *sde_step(x, v, sig[0], sig[1], 0.0), kl_weights(sig, 0.0), cfg_velocity(v, vt, 4.5)]
    assert all(o.device == dev for o in outs)


def test_ode_loss_is_half_the_squared_distance_of_euler_means():
    """DiffusionOPD's deterministic case: w_j * ||dv||^2 = 1/2 ||mu_theta - mu_T||^2 with mu = x + dt v."""
    torch.manual_seed(3)
    sig = shifted_sigmas(10, 3.0)
    w = kl_weights(sig, 0.0)
    x, v_s, v_t = (torch.randn(5, 4, 3, 3) for _ in range(3))
    for j in (0, 4, 9):
        dt = (sig[j + 1] - sig[j]).item()
        mean_matching = 0.5 * ((x + dt * v_s) - (x + dt * v_t)).pow(2).flatten(1).sum(1)
        dims = x[0].numel()
        assert torch.allclose(opd_loss(v_s, v_t, w[j]) * dims, mean_matching, rtol=1e-5)


@pytest.mark.parametrize("j", [1, 5, 8])
def test_small_noise_sde_gradient_points_along_mean_matching(j):
    """As a -> 0 the per-step SDE objective (exact KL, and the average of its policy-gradient estimator)
    has the direction of the mean-matching gradient; only the scale w_j(a) differs."""
    g = torch.Generator().manual_seed(j)
    sig = shifted_sigmas(10, 3.0)
    x = torch.randn(1, 8, generator=g)
    theta0 = torch.randn(1, 8, generator=g)
    a, n = 0.05, 200_000  # the teacher's transition is KL 2 away at this noise (so the estimator is usable)
    v_t = theta0 + torch.randn(1, 8, generator=g) * (2 / (kl_weights(sig, a)[j] * 8)) ** 0.5

    def grad(loss_fn):
        theta = theta0.clone().requires_grad_(True)
        loss_fn(theta).sum().backward()
        return theta.grad.flatten()

    ode = grad(lambda th: opd_loss(th, v_t, kl_weights(sig, 0.0)[j]))
    for level in (0.3, 0.05, 0.01):
        sde = grad(lambda th, level=level: opd_loss(th, v_t, kl_weights(sig, level)[j]))
        assert torch.nn.functional.cosine_similarity(sde, ode, dim=0) > 1 - 1e-6
    # the score-function form at small noise, averaged over many transitions, agrees too
    std = sde_std(sig, a)
    scale = transition_scale(sig[j], sig[j + 1], std[j])

    def pg(th):
        with torch.no_grad():
            mean = transition_mean(x, th, sig[j], sig[j + 1], std[j])
            x_next = mean + scale * torch.randn(n, 8, generator=g)
            logp_old = gaussian_logprob(x_next, mean.expand(n, 8), scale)
        return opd_pg_loss(th.expand(n, 8), v_t.expand(n, 8), x.expand(n, 8), x_next, logp_old,
                           sig[j], sig[j + 1], std[j]).mean().reshape(1)
    assert torch.nn.functional.cosine_similarity(grad(pg), ode, dim=0) > 0.98
