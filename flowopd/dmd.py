"""Distribution matching for few-step generators (RTDMD's AC-DMD; pure torch, docs/method.md states each
formula). A generator step ends at s (its CPS output x_s); its distribution is compared with the teacher's at
noise levels above s: x_s is re-noised along the ambient path to sigma_t in (s, 1], where the teacher (the real
score) and a fake score trained online on the generator's samples both predict; the difference of their
predictions, mapped back to s, is the generator's gradient. Everything here is fp32 except where noted."""
import numpy as np
import torch

from .flow import cps_logprob, cps_mean, cps_step, per_sample

TIME_OFFSET = 0.01  # sigma_t is drawn from [s + 0.01, 1] ...
TIME_RANGE = (0.02, 0.98)  # ... and clamped here (the released code's timesteps 10, 20 and 980)
FM_WEIGHT_CAP = 10.0  # the fake score's per-state weight min(1, 10 sigma_ts^2)


def renoise_sigma(s, u: torch.Tensor) -> torch.Tensor:
    """sigma_t = clamp(s + 0.01 + u (1 - s - 0.01), 0.02, 0.98) for u ~ U[0, 1]: a noise level above the
    generator's output level s."""
    s = torch.as_tensor(s, dtype=u.dtype, device=u.device)
    return (s + TIME_OFFSET + u * (1 - s - TIME_OFFSET)).clamp(*TIME_RANGE)


def ambient_scale(s, sigma_t) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, sigma_ts) of the ambient path x_t = a x_s + sigma_ts n from level s to sigma_t >= s: a = (1-sigma_t)
    / (1-s), sigma_ts = sqrt(sigma_t^2 - a^2 s^2). If x_s = (1-s) x0 + s eps then x_t = (1-sigma_t) x0 + sigma_t
    eps' in law, so the renoised sample has the marginal of sigma_t."""
    s, sigma_t = torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(sigma_t, dtype=torch.float32)
    a = (1 - sigma_t) / (1 - s)
    return a, torch.sqrt(torch.clamp(sigma_t ** 2 - (a * s) ** 2, min=1e-12))


def renoise(x_s: torch.Tensor, s, sigma_t, noise: torch.Tensor) -> torch.Tensor:
    a, sigma_ts = ambient_scale(s, sigma_t)
    return per_sample(a, x_s) * x_s + per_sample(sigma_ts, x_s) * noise


def ambient_velocity(x_s: torch.Tensor, s, sigma_t, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d sigma_t along the ambient path: -x_s/(1-s) + (sigma_t + (1-sigma_t) s^2/(1-s)^2)/sigma_ts n,
    the fake score's flow-matching target (at s = 0 the usual n - x_0)."""
    s_t, sig_t = torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(sigma_t, dtype=torch.float32)
    _, sigma_ts = ambient_scale(s_t, sig_t)
    c_noise = (sig_t + (1 - sig_t) * s_t ** 2 / (1 - s_t) ** 2) / sigma_ts
    return -x_s / per_sample(1 - s_t, x_s) + per_sample(c_noise, x_s) * noise


def fm_weight(s, sigma_t) -> torch.Tensor:
    """The fake score's per-state weight min(1, 10 sigma_ts^2) (the released loss on sigma_ts-scaled velocities)."""
    _, sigma_ts = ambient_scale(s, sigma_t)
    return torch.clamp(FM_WEIGHT_CAP * sigma_ts ** 2, max=1.0)


def fake_score_loss(v_fake: torch.Tensor, v_target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-state w * mean_dims(v_fake - SG(v*))^2."""
    return weight * ((v_fake.float() - v_target.detach().float()) ** 2).flatten(1).mean(1)


def denoised(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0_hat = x - sigma v."""
    return x - per_sample(sigma, x) * v


def consistency_loss(h_anchor: torch.Tensor, h_1: torch.Tensor, h_2: torch.Tensor) -> torch.Tensor:
    """Per-state mean_dims[(h_1 - h)(h_2 - h)]: two independent CPS moves from the anchor state to a lower level
    should denoise to the anchor's x0_hat; the product of two independent errors is an unbiased estimate of
    the squared bias of the fake score's denoiser along the move, without its variance."""
    return ((h_1 - h_anchor) * (h_2 - h_anchor)).flatten(1).mean(1)


@torch.no_grad()
def dmd_direction(x_s: torch.Tensor, x_t: torch.Tensor, sigma_t, s, v_real: torch.Tensor, v_fake: torch.Tensor,
                  eta: float, noise_back: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """The DMD gradient on the generator's output x_s: both scores' predictions at (x_t, sigma_t), moved back to s
    by the same CPS step (shared noise, which cancels), g = x_s^fake - x_s^real; normalised per state by
    mean_dims|x_s - x_s^real| (DMD's weighting), non-finite entries zeroed."""
    if noise_back is None:  # one draw for both moves, so that it cancels in g
        noise_back = torch.randn_like(x_t.float())
    x_real = cps_step(x_t, v_real, sigma_t, s, eta, noise=noise_back)[0]
    x_fake = cps_step(x_t, v_fake, sigma_t, s, eta, noise=noise_back)[0]
    g = x_fake - x_real
    if normalize:
        g = g / (x_s.float() - x_real).abs().flatten(1).mean(1).reshape(-1, *([1] * (g.dim() - 1)))
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x_s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-state 0.5 mean_dims(x_s - SG(x_s - g))^2, whose gradient on x_s is g / dims (in float64, as released)."""
    x = x_s.double()
    return (0.5 * ((x - (x - g.double()).detach()) ** 2).flatten(1).mean(1)).float()


# RTDMD stage 2: the generator trained on a reward (GRPO on a subset of its stochastic steps; reward
# back-propagation through its deterministic last step) while the AC-DMD loss keeps it near the teacher.

def subgrpo_steps(seed: int, step: int, first: int, last: int, count: int) -> list[int]:
    """SubGRPO's trained steps for one training step: `count` distinct step indices drawn from first .. last
    (inclusive), the same for every worker (keyed by (seed, step)), sorted."""
    rng = np.random.default_rng([seed, step, 0x5B6])
    return sorted(int(j) for j in rng.choice(np.arange(first, last + 1), size=count, replace=False))


def cps_policy_loss(v: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor, logp_old: torch.Tensor,
                    adv: torch.Tensor, sigma, sigma_next, eta: float, clip_range: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-state clipped-ratio policy loss of a CPS transition x -> x' (RTDMD's SubGRPO):
    max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = exp(logp - logp_old) with the CPS log-prob
    -mean_dims(x' - mean_theta)^2. Returns (loss, rho)."""
    ratio = torch.exp(cps_logprob(x_next, cps_mean(x, v, sigma, sigma_next, eta)) - logp_old)
    adv = adv.float()
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)), ratio.detach()


def reward_bp_loss(reward: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """Per-sample reward back-propagation loss scale * relu(margin - r): a hinge that stops pushing a sample
    once its (differentiable) reward exceeds the margin."""
    return scale * torch.relu(margin - reward)
