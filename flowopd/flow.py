"""Flow-matching math in one place (diffusers / SD3 convention; docs/method.md states each formula).

sigma in [0, 1]: 1 is pure noise, 0 is data; x_sigma = (1 - sigma) x_data + sigma eps; the model
predicts v = eps - x_data; an Euler step is x' = x + (sigma' - sigma) v. Everything here is fp32.
"""
import math

import torch


def shifted_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The T+1 sigmas FlowMatchEulerDiscreteScheduler(shift) uses for T sampling steps (last is 0)."""
    def warp(s):
        return shift * s / (1 + (shift - 1) * s)

    sigma_min = warp(1.0 / num_train_timesteps)
    sigmas = warp(torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def timestep_sigmas(timesteps, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigmas of an explicit few-step schedule (e.g. [1000, 750, 500, 250]) under the same shift, with the
    final 0 appended: u = t/1000, sigma = shift*u / (1 + (shift - 1) u)."""
    u = torch.as_tensor(timesteps, dtype=torch.float64) / num_train_timesteps
    return torch.cat([shift * u / (1 + (shift - 1) * u), u.new_zeros(1)]).float()


def schedule_sigmas(num_steps: int, shift: float, timesteps=None) -> torch.Tensor:
    """The sampling sigmas of a config: its explicit `timesteps` if given, else the scheduler's."""
    return timestep_sigmas(timesteps, shift) if timesteps else shifted_sigmas(num_steps, shift)


def sde_std(sigmas: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's per-step noise scale std_j = a*sqrt(sigma_j / (1 - sigma_j)); sigma_j = 1 uses sigma_1."""
    s = sigmas[:-1].double()
    denom = 1 - torch.where(s == 1, sigmas[1].double(), s)
    return (noise_level * torch.sqrt(s / denom)).float()


def transition_mean(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, std) -> torch.Tensor:
    """Mean of the Euler-Maruyama SDE transition x_sigma -> x_sigma' (reduces to the ODE step at std=0)."""
    sigma, sigma_next, std = (per_sample(t, x) for t in (sigma, sigma_next, std))
    dt = sigma_next - sigma
    return x * (1 + std ** 2 / (2 * sigma) * dt) + v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt


def transition_scale(sigma, sigma_next, std):
    """Per-dimension standard deviation s_j = std_j * sqrt(|dt|) of the Gaussian transition."""
    return std * torch.sqrt(torch.as_tensor(sigma - sigma_next, dtype=torch.float32))


def gaussian_logprob(x_next: torch.Tensor, mean: torch.Tensor, scale) -> torch.Tensor:
    """Log-density of x_next under N(mean, scale^2 I), averaged over all but the batch dim (Flow-GRPO)."""
    scale = per_sample(scale, x_next)
    lp = -((x_next.detach() - mean) ** 2) / (2 * scale ** 2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sde_step(x, v, sigma, sigma_next, std, noise=None, generator=None):
    """One stochastic sampling step; returns (x_next, mean, log_prob of x_next). std=0 is the ODE."""
    x, v = x.float(), v.float()
    mean = transition_mean(x, v, sigma, sigma_next, std)
    if not torch.any(torch.as_tensor(std) > 0):
        return mean, mean, torch.zeros(x.shape[0], device=x.device)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    scale = transition_scale(sigma, sigma_next, std)
    x_next = mean + per_sample(scale, x) * noise
    return x_next, mean, gaussian_logprob(x_next, mean, scale)


def cps_coefficients(sigma, sigma_next, eta: float):
    """(a, b, rho) of the CPS step x' = a x + b v + rho xi (xi ~ N(0, I)): x' = (1-s') x0_hat
    + s' (cos(eta pi/2) eps_hat + sin(eta pi/2) xi) with x0_hat = x - s v and eps_hat = x + (1-s) v.
    The noise is mixed in by angle: when (x0_hat, eps_hat) is a posterior draw, x' has the marginal of sigma'
    whatever eta (0 is deterministic DDIM)."""
    c, r = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
    a = (1 - sigma_next) + sigma_next * c
    b = -(1 - sigma_next) * sigma + sigma_next * c * (1 - sigma)
    return a, b, sigma_next * r


def cps_mean(x, v, sigma, sigma_next, eta: float) -> torch.Tensor:
    """The CPS transition's mean a x + b v (per-sample sigmas broadcast), without a data-dependent branch."""
    a, b, _ = cps_coefficients(per_sample(sigma, x), per_sample(sigma_next, x), eta)
    return a * x.float() + b * v.float()


def cps_step(x, v, sigma, sigma_next, eta: float, noise=None, generator=None):
    """One step of the CPS sampler (RTDMD's few-step sampler); returns (x_next, mean, log_prob of x_next).
    sigma' = 0 lands on x0_hat. Per-sample sigmas broadcast like `sde_step`'s."""
    x, v = x.float(), v.float()
    sigma, sigma_next = per_sample(sigma, x), per_sample(sigma_next, x)
    rho = cps_coefficients(sigma, sigma_next, eta)[2]
    mean = cps_mean(x, v, sigma, sigma_next, eta)
    if eta == 0 or (noise is None and not torch.any(rho > 0)):  # deterministic: nothing to draw
        return mean, mean, torch.zeros(x.shape[0], device=x.device)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    x_next = mean + rho * noise
    return x_next, mean, cps_logprob(x_next, mean)


def cps_logprob(x_next: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """RTDMD's log-"probability" of a CPS transition: -mean_dims (x' - mean)^2, without the Gaussian's
    variance and constants (as released). Only ratios of it enter a loss, and its scale is the per-step
    weight of the policy gradient; a deterministic transition (x' = mean) scores 0, as the ODE step."""
    return -((x_next.detach().float() - mean.float()) ** 2).flatten(1).mean(1)


def kl_weights(sigmas: torch.Tensor, noise_level: float, exact: bool = True) -> torch.Tensor:
    """w_j with KL_j = w_j * ||v_theta - v_T||^2 (paper Eq. 12): |dt| c_j^2 / (2 std_j^2).

    exact=False is the released Flow-OPD code's weight: its KL is mean(dmu^2) / (2 std_j^2), dividing by
    std_j^2 instead of the transition variance std_j^2 |dt|, with dmu = c_j dt dv, i.e. c_j^2 dt^2 / (2 std_j^2)
    = w_j |dt|. noise_level 0 (ODE rollouts) has no KL; it falls back to DiffusionOPD's plain mean matching
    1/2 ||mu_theta - mu_T||^2 = dt^2/2 ||dv||^2.
    """
    s, dt = sigmas[:-1].double(), (sigmas[:-1] - sigmas[1:]).double()
    if noise_level == 0:
        return (dt ** 2 / 2).float()
    std = sde_std(sigmas, noise_level).double()
    c = 1 + std ** 2 * (1 - s) / (2 * s)
    w = c ** 2 / (2 * std ** 2)
    return (w * dt if exact else w * dt ** 2).float()


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance v_u + g (v_c - v_u); g = 1 (or no unconditional pass) is plain v_c."""
    if v_uncond is None or guidance == 1.0:
        return v_cond
    return v_uncond + guidance * (v_cond - v_uncond)


def opd_loss(v_student, v_target, weight):
    """Per-sample analytic OPD loss w_j * mean_dims (v_theta - SG(v_T))^2 (paper Eq. 15 / 16)."""
    return weight * ((v_student.float() - v_target.detach().float()) ** 2).flatten(1).mean(1)


def opd_pg_loss(v_student, v_target, x, x_next, logp_old, sigma, sigma_next, std, clip_range=None):
    """Per-sample policy-gradient form of OPD (paper Eq. 14) with the single-sample reverse-KL advantage.

    A = -(log pi_theta(x'|x) - log pi_T(x'|x)) at the sampled x', summed over dimensions (detached); its
    expectation is -KL_j. With Flow-GRPO's ratio of dimension-averaged log-probs, E[grad] then equals the
    gradient of `opd_loss` (which averages over dimensions), with variance. Optional ratio clipping.
    """
    scale = transition_scale(sigma, sigma_next, std)
    mean_s = transition_mean(x.float(), v_student.float(), sigma, sigma_next, std)
    mean_t = transition_mean(x.float(), v_target.detach().float(), sigma, sigma_next, std)
    logp = gaussian_logprob(x_next, mean_s, scale)
    dims = x[0].numel()
    adv = -(logp - gaussian_logprob(x_next, mean_t, scale)).detach() * dims
    ratio = torch.exp(logp - logp_old)
    loss = -adv * ratio
    if clip_range is not None:
        loss = torch.maximum(loss, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    return loss


def per_sample(t, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample tensor against a batch tensor."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() == 1 else t
