"""AC-DMD's math (flowopd/dmd.py) against closed forms for Gaussian data, written out here independently:
the ambient path and its velocity, the renoising levels, the DMD direction as the gradient of a KL, the
reward-tilted optimum, the fake score's flow-matching target and the consistency term."""
import math

import pytest
import torch

from flowopd.dmd import (
    ambient_velocity,
    consistency_loss,
    denoised,
    dmd_direction,
    dmd_loss,
    renoise,
    renoise_sigma,
)
from flowopd.flow import cps_step

ETA = 0.9
C_ETA, S_ETA = math.cos(ETA * math.pi / 2), math.sin(ETA * math.pi / 2)


def x0_hat(x, sigma, m, var):
    """E[x0 | x_sigma] for x0 ~ N(m, diag(var)), x_sigma = (1-sigma) x0 + sigma eps."""
    return m + (1 - sigma) * var / ((1 - sigma) ** 2 * var + sigma ** 2) * (x - (1 - sigma) * m)


def velocity(x, sigma, m, var):
    """The exact marginal velocity E[eps - x0 | x_sigma] = (x - E[x0|x])/sigma of N(m, diag(var))."""
    return (x - x0_hat(x, sigma, m, var)) / sigma


def kl_sigma(mu, var_g, m, var_t, sigma):
    """KL(N((1-sigma)mu, (1-sigma)^2 var_g + sigma^2) || the same for (m, var_t)), summed over dimensions."""
    v1, v2 = (1 - sigma) ** 2 * var_g + sigma ** 2, (1 - sigma) ** 2 * var_t + sigma ** 2
    return (0.5 * (torch.log(v2 / v1) + (v1 + ((1 - sigma) * (mu - m)) ** 2) / v2 - 1)).sum()


def cps(x, v, sigma, sigma_next, eta, xi):
    """The CPS step written out: (1-s')(x - s v) + s' cos(eta pi/2)(x + (1-s) v) + s' sin(eta pi/2) xi."""
    c, r = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
    return (1 - sigma_next) * (x - sigma * v) + sigma_next * c * (x + (1 - sigma) * v) + sigma_next * r * xi


def ambient(x_s, s, sigma_t, n):
    """x_t = a x_s + sqrt(sigma_t^2 - a^2 s^2) n, a = (1-sigma_t)/(1-s), in float64."""
    a = (1 - sigma_t) / (1 - s)
    return a * x_s + torch.sqrt(sigma_t ** 2 - (a * s) ** 2) * n


# --- 1. the ambient path ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("s,sigma_t", [(0.0, 0.3), (0.0, 0.9), (0.5, 0.8), (0.75, 0.98), (0.9, 0.91)])
def test_renoise_has_the_marginal_of_sigma_t(s, sigma_t):
    g = torch.Generator().manual_seed(1)
    m, sd = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.8, 1.5], dtype=torch.float64)
    N = 400_000
    x0 = m + sd * torch.randn(N, 2, generator=g, dtype=torch.float64)
    x_s = (1 - s) * x0 + s * torch.randn(N, 2, generator=g, dtype=torch.float64)
    x_t = renoise(x_s, s, sigma_t, torch.randn(N, 2, generator=g, dtype=torch.float64))
    var = (1 - sigma_t) ** 2 * sd ** 2 + sigma_t ** 2
    se_mean, se_var = torch.sqrt(var / N), var * math.sqrt(2 / N)
    assert torch.all((x_t.mean(0) - (1 - sigma_t) * m).abs() < 5 * se_mean)
    assert torch.all((x_t.var(0) - var).abs() < 5 * se_var)


def test_renoise_per_sample_levels_match_scalar_calls():
    g = torch.Generator().manual_seed(2)
    x_s, n = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    s, sigma_t = torch.tensor([0.0, 0.5, 0.9]), torch.tensor([0.3, 0.8, 0.98])
    per_sample = renoise(x_s, s, sigma_t, n)
    for i in range(3):
        want = ambient(x_s[i].double(), s[i].double(), sigma_t[i].double(), n[i].double())
        assert torch.allclose(per_sample[i].double(), want, atol=1e-6)
        assert torch.allclose(renoise(x_s[i:i + 1], s[i].item(), sigma_t[i].item(), n[i:i + 1])[0], per_sample[i])


@pytest.mark.parametrize("s", [0.0, 0.5, 0.75, 0.9])
def test_ambient_velocity_is_the_path_derivative(s):
    """d x_t / d sigma_t of a x_s + sigma_ts n at fixed (x_s, n), by forward-mode autograd in float64 through the
    path written here; at s = 0 it is n - x_s."""
    g = torch.Generator().manual_seed(3)
    B = 64
    x_s, n = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)
    sigma_t = s + 0.01 + torch.rand(B, generator=g, dtype=torch.float64) * (0.98 - s - 0.01)
    _, want = torch.func.jvp(lambda t: ambient(x_s, s, t[:, None], n), (sigma_t,), (torch.ones_like(sigma_t),))
    got = ambient_velocity(x_s, s, sigma_t, n)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    # and by central differences
    h = 1e-6
    fd = (ambient(x_s, s, sigma_t[:, None] + h, n) - ambient(x_s, s, sigma_t[:, None] - h, n)) / (2 * h)
    assert torch.allclose(got, fd, rtol=1e-5, atol=1e-5)
    if s == 0:
        assert torch.allclose(got, n - x_s, atol=1e-6)


# --- 2. the renoising level ------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.0, 0.5, 0.75, 0.9])
def test_renoise_sigma_range_and_law(s):
    lo = max(s + 0.01, 0.02)
    u = torch.tensor([0.0, 0.5, 1.0])
    got = renoise_sigma(s, u)
    want = [lo, min(max(s + 0.01 + 0.5 * (0.99 - s), 0.02), 0.98), 0.98]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    # per-sample s gives the same
    assert torch.allclose(renoise_sigma(torch.full((3,), s), u), got)
    # uniform on [s + 0.01, 1], clamped: the CDF is (x - s - 0.01)/(0.99 - s) inside the range
    sig = renoise_sigma(s, torch.rand(200_000, generator=torch.Generator().manual_seed(4)))
    assert sig.min() >= lo - 1e-7 and sig.max() <= 0.98 + 1e-7
    for q in torch.linspace(lo, 0.98, 7)[1:-1].tolist():
        cdf = (q - s - 0.01) / (0.99 - s)
        assert (sig <= q).double().mean().item() == pytest.approx(cdf, abs=5e-3)
    assert (sig >= 0.98 - 1e-7).double().mean().item() == pytest.approx(0.02 / (0.99 - s), abs=5e-3)


# --- 3. the DMD update is the gradient of the KL at sigma_t ------------------------------------------------------

@pytest.mark.parametrize("s,sigma_t", [(0.0, 0.3), (0.0, 0.7), (0.5, 0.8)])
def test_dmd_gradient_is_the_kl_gradient(s, sigma_t):
    """Generator x_s = (1-s)(mu + exp(log_std) z) + s e. Its renoised x_t has the marginal
    N((1-sigma_t) mu, (1-sigma_t)^2 std^2 + sigma_t^2), so by reparameterisation
    grad KL_sigma_t = E[(score_fake - score_real)(x_t) . dx_t/dtheta], with score = -(x + (1-sigma) v)/sigma, i.e.
    score_f - score_r = -(1-sigma_t)/sigma_t (v_f - v_r), and dx_t/dtheta = a dx_s/dtheta, a = (1-sigma_t)/(1-s).
    dmd_loss's gradient on x_s is g/D with g = x_s^fake - x_s^real = kappa (v_f - v_r) (the shared CPS noise
    cancels), kappa = -(1-s) sigma_t + s cos(eta pi/2)(1-sigma_t) the CPS coefficient of v from sigma_t to s. So
    grad E[dmd_loss] = (1/D) (-kappa sigma_t / ((1-sigma_t) a)) grad KL_sigma_t (a positive factor; at s = 0 it
    is sigma_t^2 / ((1-sigma_t)^2 D))."""
    g = torch.Generator().manual_seed(5)
    D, N = 2, 400_000
    m, var_t = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.64, 2.25], dtype=torch.float64)
    mu = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor([math.log(1.3), math.log(0.6)], dtype=torch.float64, requires_grad=True)

    def draw():  # antithetic pairs: the mu-gradient (linear in the noises) is then exact
        r = torch.randn(N // 2, D, generator=g, dtype=torch.float64)
        return torch.cat([r, -r])
    z, e, n, xi = draw(), draw(), draw(), draw()
    x_s = (1 - s) * (mu + torch.exp(log_std) * z) + s * e
    x_t = renoise(x_s.detach(), s, sigma_t, n)
    v_real = velocity(x_t, sigma_t, m, var_t)
    v_fake = velocity(x_t, sigma_t, mu.detach(), torch.exp(2 * log_std.detach()))
    direction = dmd_direction(x_s.detach(), x_t, sigma_t, s, v_real, v_fake, eta=ETA, noise_back=xi, normalize=False)
    got_mu, got_log_std = torch.autograd.grad(dmd_loss(x_s, direction).double().mean(), (mu, log_std))

    kl = kl_sigma(mu, torch.exp(2 * log_std), m, var_t, sigma_t)
    kl_mu, kl_log_std = torch.autograd.grad(kl, (mu, log_std))
    kappa = -(1 - s) * sigma_t + s * C_ETA * (1 - sigma_t)
    a = (1 - sigma_t) / (1 - s)
    factor = -kappa * sigma_t / ((1 - sigma_t) * a) / D
    assert factor > 0
    assert torch.allclose(got_mu, factor * kl_mu, rtol=1e-4)
    # the log_std estimate's standard error, from the per-pair terms (kappa/D)(v_f - v_r) dx_s/dlog_std
    terms = kappa / D * (v_fake - v_real) * (1 - s) * torch.exp(log_std.detach()) * z
    se = (terms[:N // 2] + terms[N // 2:]).div(2).std(0) / math.sqrt(N // 2)
    want = factor * kl_log_std
    assert torch.all(5 * se < 0.1 * want.abs())  # (the mu check above is exact to 1e-4)
    assert torch.all((got_log_std - want).abs() < 5 * se)


# --- 4. the normalised direction -------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.0, 0.5])
def test_normalised_direction(s):
    g = torch.Generator().manual_seed(6)
    B = 5
    x_s, x_t, v_r, v_f, xi = (torch.randn(B, 2, 4, 4, generator=g) for _ in range(5))
    sigma_t = torch.tensor([0.55, 0.6, 0.8, 0.9, 0.98])
    st = sigma_t.reshape(-1, 1, 1, 1)
    x_real, x_fake = cps(x_t, v_r, st, s, ETA, xi), cps(x_t, v_f, st, s, ETA, xi)
    raw = dmd_direction(x_s, x_t, sigma_t, s, v_r, v_f, ETA, noise_back=xi, normalize=False)
    assert torch.allclose(raw, x_fake - x_real, atol=1e-5)
    kappa = -(1 - s) * st + s * C_ETA * (1 - st)
    assert torch.allclose(raw, kappa * (v_f - v_r), atol=1e-5)  # the shared noise cancels
    norm = dmd_direction(x_s, x_t, sigma_t, s, v_r, v_f, ETA, noise_back=xi)
    scale = (x_s - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(norm, (x_fake - x_real) / scale, rtol=1e-4, atol=1e-5)


def test_normalised_direction_zeroes_non_finite():
    """A state whose output equals the real prediction has normaliser 0: its direction is zeroed, not nan."""
    g = torch.Generator().manual_seed(7)
    x_t, v_r, v_f = (torch.randn(2, 8, generator=g) for _ in range(3))
    x_s = x_t - 0.5 * v_r  # = x_s^real at s = 0, sigma_t = 0.5
    x_s[1] += 1.0
    out = dmd_direction(x_s, x_t, 0.5, 0.0, v_r, v_f, ETA)
    assert torch.all(out[0] == 0) and torch.all(torch.isfinite(out)) and torch.any(out[1] != 0)


# --- 5. the reward-tilted optimum ------------------------------------------------------------------------------

def test_reward_tilted_optimum():
    """Teacher N(m, S^2) in 1-D, reward r(x) = a x, beta > 0. Training the Gaussian generator (mu, log_std) on
    D (1-sigma)^2/sigma^2 dmd_loss (gradient = grad KL_sigma, exact fake score of the current generator) minus
    E[r(x0)]/beta minimises KL_sigma - E[r]/beta over the family: d/dmu KL_sigma = (1-sigma)^2 (mu - m) /
    ((1-sigma)^2 S^2 + sigma^2) = a/beta gives mu* = m + a (S^2 + sigma^2/(1-sigma)^2)/beta, and std* = S (the
    KL alone is minimised at equal variances; E[r] does not depend on std). As sigma -> 0, mu* tends to the mean
    m + S^2 a/beta of the tilted distribution p_T exp(r/beta) / Z = N(m + S^2 a/beta, S^2). At sigma = 0.05 the
    two differ by 1.4e-3; the learned mean is asserted within 1e-4 of mu* and 2e-3 of the tilted mean, the learned
    std within 0.1% of S (near the optimum the exact-score gradient is almost noise-free)."""
    g = torch.Generator().manual_seed(8)
    m, S, a_r, beta, sigma = 0.3, 0.8, 1.0, 2.0, 0.05
    mu_star = m + a_r * (S ** 2 + sigma ** 2 / (1 - sigma) ** 2) / beta
    tilted = m + S ** 2 * a_r / beta
    mu = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    log_std = torch.full((1,), 0.5, dtype=torch.float64, requires_grad=True)
    steps, N = 600, 1024
    opt = torch.optim.Adam([mu, log_std], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(1 - i / steps, 0.01))
    for _ in range(steps):
        z, n = (torch.randn(N, 1, generator=g, dtype=torch.float64) for _ in range(2))
        x0 = mu + torch.exp(log_std) * z
        x_t = (1 - sigma) * x0.detach() + sigma * n
        v_real = velocity(x_t, sigma, m, S ** 2)
        v_fake = velocity(x_t, sigma, mu.detach(), torch.exp(2 * log_std.detach()))
        direction = dmd_direction(x0.detach(), x_t, sigma, 0.0, v_real, v_fake, ETA, normalize=False)
        kl_part = (1 - sigma) ** 2 / sigma ** 2 * dmd_loss(x0, direction).double().mean()  # D = 1
        loss = kl_part - (a_r * x0).mean() / beta
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert abs(mu.item() - mu_star) < 1e-4
    assert abs(mu.item() - tilted) < 2e-3
    assert math.exp(log_std.item()) == pytest.approx(S, rel=1e-3)


# --- 6. the fake score's target --------------------------------------------------------------------------------

@pytest.mark.parametrize("s,sigma_t", [(0.0, 0.4), (0.4, 0.7), (0.75, 0.9)])
def test_ambient_target_regresses_to_the_marginal_velocity(s, sigma_t):
    """Flow matching on v* = ambient_velocity is minimised by E[v* | x_t]; for Gaussian x0, (v*, x_t) is jointly
    Gaussian, so E[v*|x_t] is the least-squares line, which must equal the exact marginal velocity at sigma_t,
    (x - E[x0|x_sigma_t = x])/sigma_t, even though x_t was renoised from a noisy output x_s (s > 0)."""
    g = torch.Generator().manual_seed(9)
    m, var = 0.7, 1.69
    N = 400_000
    x0 = m + math.sqrt(var) * torch.randn(N, 1, generator=g, dtype=torch.float64)
    x_s = (1 - s) * x0 + s * torch.randn(N, 1, generator=g, dtype=torch.float64)
    n = torch.randn(N, 1, generator=g, dtype=torch.float64)
    x_t, target = renoise(x_s, s, sigma_t, n), ambient_velocity(x_s, s, sigma_t, n)
    X = torch.cat([torch.ones_like(x_t), x_t], 1)
    coef = torch.linalg.lstsq(X, target).solution
    cov = torch.linalg.inv(X.T @ X) * (target - X @ coef).var()  # the least-squares coefficients' covariance
    k = (1 - sigma_t) * var / ((1 - sigma_t) ** 2 * var + sigma_t ** 2)
    # v(x) = (x - m - k (x - (1-sigma) m)) / sigma: intercept and slope
    want = torch.tensor([[(-m + k * (1 - sigma_t) * m) / sigma_t], [(1 - k) / sigma_t]], dtype=torch.float64)
    assert torch.all((coef - want).abs()[:, 0] < 5 * cov.diag().sqrt())
    x = torch.linspace(-2, 3, 5, dtype=torch.float64)
    line = torch.stack([torch.ones_like(x), x], 1)
    se_line = torch.einsum("ij,jk,ik->i", line, cov, line).sqrt()
    assert torch.all((line @ coef[:, 0] - velocity(x, sigma_t, m, var)).abs() < 5 * se_line)
    assert torch.all(5 * se_line < 0.15)  # (velocities here are O(1))


# --- 7. the consistency term -----------------------------------------------------------------------------------

def _consistency(eta, sigma_t, sigma_c, biases=(0.0,), N=200_000):
    """Mean and standard error of consistency_loss for the exact denoiser of N(m, C) (1-D), two CPS moves from
    x_t with the exact velocity and independent noises; each bias b is added to the denoiser at the lower level."""
    g = torch.Generator().manual_seed(10)
    m, var = 0.5, 1.0
    x0 = m + math.sqrt(var) * torch.randn(N, 1, generator=g, dtype=torch.float64)
    x_t = (1 - sigma_t) * x0 + sigma_t * torch.randn(N, 1, generator=g, dtype=torch.float64)
    v = velocity(x_t, sigma_t, m, var)
    anchor = denoised(x_t, v, sigma_t)
    assert torch.allclose(anchor, x0_hat(x_t, sigma_t, m, var), atol=1e-6)  # sigma_t is cast to fp32
    moved = [cps_step(x_t, v, sigma_t, sigma_c, eta, noise=torch.randn(N, 1, generator=g, dtype=torch.float64))[0]
             for _ in range(2)]
    out = []
    for b in biases:
        loss = consistency_loss(anchor, *(x0_hat(x.double(), sigma_c, m, var) + b for x in moved)).double()
        out.append((loss.mean().item(), loss.std().item() / math.sqrt(N)))
    return out, var


def _posterior_eta(sigma, sigma_c):
    """The CPS angle of the exact posterior q(x_sigma_c | x_sigma, x0) of the ambient (Markov) forward process:
    cos = a sigma_c / sigma, a = (1-sigma)/(1-sigma_c)."""
    a = (1 - sigma) / (1 - sigma_c)
    return 2 / math.pi * math.acos(a * sigma_c / sigma)


@pytest.mark.parametrize("sigma_t,sigma_c", [(0.7, 0.6), (0.5, 0.499), (0.9, 0.75)])
def test_consistency_vanishes_for_the_exact_denoiser_with_posterior_noise(sigma_t, sigma_c):
    """With the posterior angle the exact denoiser is a martingale along the move, E[h(x', sigma_c) | x_t] = h(x_t),
    so the two-sample term estimates 0; a denoiser biased by b at the lower level gives b^2."""
    eta = _posterior_eta(sigma_t, sigma_c)
    b = 0.2
    ((mean, se), (mean_b, se_b)), _ = _consistency(eta, sigma_t, sigma_c, biases=(0.0, b))
    assert abs(mean) < 5 * se + 1e-6
    assert mean_b == pytest.approx(b ** 2, abs=5 * se_b + 1e-6)
    assert mean_b > 20 * abs(mean)


@pytest.mark.parametrize("sigma_t,sigma_c", [(0.7, 0.6), (0.5, 0.499)])
def test_consistency_of_the_exact_denoiser_at_eta_09(sigma_t, sigma_c):
    """At the released eta = 0.9 the CPS move injects more noise than the posterior, and the exact denoiser is not
    a zero of the term: with y = x_t - (1-sigma) m ~ N(0, V), V = (1-sigma)^2 C + sigma^2,
    E[h(x')|x_t] - h(x_t) = beta y, beta = C sigma_c ((1-sigma_c) sigma cos(eta pi/2) - (1-sigma) sigma_c) / (V V_c),
    so E[term] = beta^2 V, which does not vanish as sigma_c -> sigma_t (CPS at fixed eta is not continuous there)."""
    ((mean, se),), C = _consistency(ETA, sigma_t, sigma_c)
    V, Vc = (1 - sigma_t) ** 2 * C + sigma_t ** 2, (1 - sigma_c) ** 2 * C + sigma_c ** 2
    beta = C * sigma_c * ((1 - sigma_c) * sigma_t * C_ETA - (1 - sigma_t) * sigma_c) / (V * Vc)
    assert mean == pytest.approx(beta ** 2 * V, abs=5 * se)
    assert mean > 0.01


# --- 8. the DMD loss's gradient --------------------------------------------------------------------------------

def test_dmd_loss_gradient_is_direction_over_dims():
    g = torch.Generator().manual_seed(11)
    x_s = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    direction = torch.randn(3, 2, 4, 4, generator=g)
    loss = dmd_loss(x_s, direction)
    assert loss.shape == (3,) and torch.allclose(loss, 0.5 * (direction ** 2).flatten(1).mean(1))
    (grad,) = torch.autograd.grad(loss.sum(), x_s)
    assert torch.allclose(grad, direction / 32, rtol=1e-6, atol=1e-8)
