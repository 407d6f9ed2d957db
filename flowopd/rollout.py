"""Student SDE trajectories (pure torch): every trained state with its sigma index, prompt and next state."""
import numpy as np
import torch

from .dmd import ambient_velocity, fm_weight, renoise, renoise_sigma
from .flow import cps_step, sde_std, sde_step
from .models import velocity


def sample_generators(seed: int, step: int, sample_ids, device) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, step, sample id): noise does not depend on batching."""
    gens = []
    for sid in sample_ids:
        g = torch.Generator(device=device)
        g.manual_seed(int(np.random.SeedSequence([seed, step, int(sid)]).generate_state(1)[0]))
        gens.append(g)
    return gens


GROUP_STREAM = 1 << 48  # keys of the per-group initial-noise generators lie above every sample id
SHARED_STREAM = 2 << 48  # keys of the per-group generators of the shared step noise (SubGRPO)
RENOISE_STREAM = 3 << 48  # keys of the per-sample generators that renoise finished samples (RTDMD)


def initial_generators(seed: int, step: int, sample_ids, group_size: int, same_latent: bool, device):
    """Generators for the initial noise: the samples' own, or with same_latent one per prompt group
    (sample id // group_size), keyed apart from every sample's own stream."""
    if not same_latent:
        return None
    return group_generators(seed, step, sample_ids, group_size, GROUP_STREAM, device)


def group_generators(seed: int, step: int, sample_ids, group_size: int, stream: int, device):
    """One generator per prompt group (sample id // group_size) in `stream`: every sample of a group draws
    the same numbers."""
    return sample_generators(seed, step, [stream + int(sid) // group_size for sid in sample_ids], device)


def sde_schedule(num_steps: int, sampling, seed: int, step: int) -> tuple[list[int], list[int]]:
    """(stochastic steps, trained steps) of the rollouts of one training step.

    Without a window every step is stochastic and the first int(T * train_timestep_fraction) are trained.
    With `sde_window_size` k (Flow-GRPO-Fast) only k consecutive steps are stochastic, and those are the
    trained ones; the window's start is drawn from (seed, step), so every worker uses the same window."""
    k = sampling.sde_window_size
    if not k:
        return list(range(num_steps)), list(range(max(1, int(num_steps * sampling.train_timestep_fraction))))
    lo, hi = sampling.sde_window_range or (0, num_steps)
    start = int(np.random.default_rng([seed, step, 0x5DE]).integers(lo, hi - k + 1))
    window = list(range(start, start + k))
    return window, window


def _randn(shape, gens, device):
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


@torch.no_grad()
def sample_trajectories(model, embeds, pooled, neg_embeds, neg_pooled, sigmas, noise_level, guidance,
                        latent_shape, gens, train_steps=(), autocast_dtype=None, stochastic_steps=None,
                        init_gens=None, sampler: str = "sde", shared_steps=(), shared_gens=None):
    """Run the sampler for a batch; return the states (J, B, ...) at the steps in `train_steps` (in that
    order), the sampled next states, their log-probs under the sampling policy, and the final latents.

    Steps in `stochastic_steps` (default: all) take the SDE step with `noise_level`, the others the ODE
    step; `init_gens` (default: `gens`) draw the initial noise. sampler "cps" takes RTDMD's CPS step with
    eta = noise_level instead (its last step, to sigma 0, is deterministic). Steps in `shared_steps` draw
    their noise from `shared_gens` (one per prompt group: the group's samples share it, as RTDMD's untrained
    stochastic steps do)."""
    device = embeds.device
    std = sde_std(sigmas, noise_level)
    if stochastic_steps is not None:
        std = torch.where(torch.isin(torch.arange(len(std)), torch.as_tensor(list(stochastic_steps), dtype=torch.long)),
                          std, torch.zeros_like(std))
    x = _randn(latent_shape, init_gens or gens, device)
    train_steps = list(train_steps)
    states, nexts, logps = {}, {}, {}
    for j in range(len(sigmas) - 1):
        v = velocity(model, x, sigmas[j], embeds, pooled, neg_embeds, neg_pooled, guidance, autocast_dtype)
        last_cps = sampler == "cps" and sigmas[j + 1] == 0  # deterministic: draws nothing
        noise = (_randn(latent_shape, shared_gens if j in shared_steps else gens, device)
                 if std[j] > 0 and not last_cps else None)
        if sampler == "cps":
            eta = noise_level if std[j] > 0 else 0.0
            x_next, _, logp = cps_step(x, v, sigmas[j].item(), sigmas[j + 1].item(), eta, noise=noise)
        else:
            x_next, _, logp = sde_step(x, v, sigmas[j].item(), sigmas[j + 1].item(), std[j].item(), noise=noise)
        if j in train_steps:
            states[j], nexts[j], logps[j] = x, x_next, logp
        x = x_next
    if not states:
        return None, None, None, x
    return (torch.stack([states[j] for j in train_steps]), torch.stack([nexts[j] for j in train_steps]),
            torch.stack([logps[j] for j in train_steps]), x)


def _uniform(gens, device) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=g, device=device) for g in gens])


@torch.no_grad()
def ac_states(model, embeds, pooled, sigmas, eta: float, stop: int, latent_shape, gens, consistency_step: int,
              autocast_dtype=None) -> dict[str, torch.Tensor]:
    """AC-DMD's states for a batch: the generator (no CFG) takes its first `stop` CPS steps; the last one, from
    `x` at sigma_{stop-1} with noise `xi`, is the step the gradient goes through, and its output at s =
    sigma_stop is `renoised`. Every draw comes from the sample's own generator, in a fixed order."""
    device = embeds.device
    x = _randn(latent_shape, gens, device)
    for k in range(stop):
        v = velocity(model, x, sigmas[k], embeds, pooled, None, None, 1.0, autocast_dtype)
        xi = _randn(latent_shape, gens, device) if sigmas[k + 1] > 0 else torch.zeros_like(x)
        x_k, x = x, cps_step(x, v, sigmas[k].item(), sigmas[k + 1].item(), eta, noise=xi)[0]
    return {"x": x_k, "xi": xi, **renoised(x, sigmas[stop].item(), gens, consistency_step)}


def renoised(x_s: torch.Tensor, s: float, gens, consistency_step: int) -> dict[str, torch.Tensor]:
    """A generator's output `x_s` at level s, renoised along the ambient path to `x_t` at sigma_t ~ U[s + 0.01,
    1] (clamped), with the draws the AC-DMD losses need: the shared noise `xi_back` that maps the scores'
    predictions back to s, the fake score's target `v_target` and weight, and its consistency move (level
    `sigma_c` = sigma_t - d/1000, d ~ U{1..consistency_step}, noises `xi_1`, `xi_2`); from the samples' own
    generators, in a fixed order."""
    device, shape = x_s.device, x_s.shape[1:]
    sigma_t = renoise_sigma(s, _uniform(gens, device))
    n = _randn(shape, gens, device)
    xi_back = _randn(shape, gens, device) if s > 0 else torch.zeros_like(x_s)
    step_back = torch.stack([torch.randint(1, consistency_step + 1, (), generator=g, device=device) for g in gens])
    return {"x_t": renoise(x_s, s, sigma_t, n), "sigma_t": sigma_t, "xi_back": xi_back,
            "v_target": ambient_velocity(x_s, s, sigma_t, n), "fm_weight": fm_weight(s, sigma_t),
            "sigma_c": (sigma_t - step_back / 1000).clamp(min=0), "xi_1": _randn(shape, gens, device),
            "xi_2": _randn(shape, gens, device)}
