"""Student SDE trajectories (pure torch): every trained state with its sigma index, prompt and next state."""
import numpy as np
import torch

from .flow import sde_std, sde_step
from .models import velocity


def sample_generators(seed: int, step: int, sample_ids, device) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, step, sample id): noise does not depend on batching."""
    gens = []
    for sid in sample_ids:
        g = torch.Generator(device=device)
        g.manual_seed(int(np.random.SeedSequence([seed, step, int(sid)]).generate_state(1)[0]))
        gens.append(g)
    return gens


def _randn(shape, gens, device):
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


@torch.no_grad()
def sample_trajectories(model, embeds, pooled, neg_embeds, neg_pooled, sigmas, noise_level, guidance,
                        latent_shape, gens, num_train_steps, autocast_dtype=None):
    """Run the SDE sampler for a batch; return states (J, B, ...) for the first J steps, the sampled next
    states, their log-probs under the sampling policy, and the final latents."""
    device = embeds.device
    std = sde_std(sigmas, noise_level)
    x = _randn(latent_shape, gens, device)
    states, nexts, logps = [], [], []
    for j in range(len(sigmas) - 1):
        v = velocity(model, x, sigmas[j], embeds, pooled, neg_embeds, neg_pooled, guidance, autocast_dtype)
        noise = _randn(latent_shape, gens, device) if std[j] > 0 else None
        x_next, _, logp = sde_step(x, v, sigmas[j].item(), sigmas[j + 1].item(), std[j].item(), noise=noise)
        if j < num_train_steps:
            states.append(x)
            nexts.append(x_next)
            logps.append(logp)
        x = x_next
    if not states:
        return None, None, None, x
    return torch.stack(states), torch.stack(nexts), torch.stack(logps), x
