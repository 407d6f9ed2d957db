"""Flow-GRPO (stage 1) in one place: group advantages, the clipped-ratio surrogate, KL to the reference.

As in docs/method.md: A = (r - mean_prompt) / (std_all + 1e-4) clipped to +-5; groups whose advantages
are all zero are skipped; per state L = max(-A r, -A clip(r, 1-eps, 1+eps)) with r = exp(logp - logp_old);
KL to the reference (the model with its adapter disabled) beta ||mu - mu_ref||^2 / (2 std^2), averaged
over dimensions (Flow-GRPO's scale, without |dt|). The exported weights are an EMA with Flow-GRPO's
warm-up schedule.
"""
import numpy as np
import torch

from .flow import gaussian_logprob, transition_mean, transition_scale


def group_advantages(rewards: np.ndarray, group: np.ndarray, clip: float = 5.0, eps: float = 1e-4) -> np.ndarray:
    """Per-sample advantages from per-prompt means and the batch-wide std (NaN rewards give NaN)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    ok = np.isfinite(rewards)
    adv = np.full_like(rewards, np.nan)
    std = rewards[ok].std() if ok.any() else 0.0
    for g in np.unique(group):
        m = (group == g) & ok
        if m.any():
            adv[m] = (rewards[m] - rewards[m].mean()) / (std + eps)
    return np.clip(adv, -clip, clip)


def informative_groups(adv: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Mask of samples whose group has at least one non-zero advantage (others carry no signal)."""
    keep = np.zeros(len(adv), dtype=bool)
    for g in np.unique(group):
        m = group == g
        keep[m] = bool(np.any(np.nan_to_num(adv[m]) != 0))
    return keep & np.isfinite(adv)


def grpo_loss(v, v_ref, x, x_next, logp_old, adv, sigma, sigma_next, std, clip_range: float, beta: float):
    """Per-state Flow-GRPO loss; also returns the ratio (for the first-step == 1 check) and the KL term."""
    scale = transition_scale(sigma, sigma_next, std)
    mean = transition_mean(x.float(), v.float(), sigma, sigma_next, std)
    logp = gaussian_logprob(x_next, mean, scale)
    ratio = torch.exp(logp - logp_old)
    adv = adv.float()
    policy = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    kl = torch.zeros_like(policy)
    if beta > 0 and v_ref is not None:
        mean_ref = transition_mean(x.float(), v_ref.detach().float(), sigma, sigma_next, std)
        std_b = torch.as_tensor(std, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
        kl = ((mean - mean_ref) ** 2 / (2 * std_b ** 2)).flatten(1).mean(1)
    return policy + beta * kl, ratio.detach(), kl.detach()


def ema_decay_at(step: int, max_decay: float) -> float:
    """Flow-GRPO's EMA decay after optimizer step `step` (1-based): min((1 + s) / (10 + s), max_decay),
    so the first updates move the average quickly away from the initial weights."""
    return min((1 + step) / (10 + step), max_decay)


def ema_update(ema: dict, params: dict, step: int, max_decay: float) -> dict:
    """ema <- d ema + (1 - d) params with d = ema_decay_at(step, max_decay)."""
    d = ema_decay_at(step, max_decay)
    return {k: d * ema[k] + (1 - d) * params[k] for k in ema}
