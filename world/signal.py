"""Whether a world base leaves errors that RL can select away, measured before any RL is spent on it.

* fit: the base's reward on prompts (ODE, the evaluation's sampler), against the VAE's ceiling (exact
  renderings encoded and decoded): a base near the ceiling leaves no headroom, one far below it that cannot
  draw what it is asked leaves nothing to select;
* group signal: Flow-GRPO learns from reward differences inside a group of samples of one prompt. For each
  window of sampling steps, the group shares its initial noise and only the window's steps are stochastic,
  so the within-group reward spread is what those steps' choices decide; `zero_std` is the fraction of
  groups with no spread at all (no gradient);
* text errors: how often the characters are all right but in the wrong order (an encoder that does not
  carry position cannot be fixed by RL on held-out strings).
"""
from collections import Counter

import numpy as np
import torch

from flowopd.flow import shifted_sigmas
from flowopd.models import decode_images, encode_prompts
from flowopd.rollout import group_generators, sample_generators, sample_trajectories
from flowopd.stats import Estimate, bootstrap_mean

from .base_model import MAX_SEQUENCE_LENGTH, to_pixels
from .grammar import render
from .verifiers import read_glyphs

LATENT_SHAPE = (4, 16, 16)
INIT_STREAM = 1 << 40  # the initial-noise generators of a same-latent group, apart from every sample's own


@torch.no_grad()
def sample(pipe, records: list[dict], per_prompt: int, seed: int, num_steps: int = 10, guidance: float = 3.0,
           noise_level: float = 0.0, stochastic_steps=None, same_latent: bool = False,
           batch_size: int = 256) -> np.ndarray:
    """uint8 images, `per_prompt` consecutive samples per record. Sample i draws from its own generator
    keyed by (seed, i); with `same_latent` a prompt's samples share their initial noise."""
    prompts = [r["prompt"] for r in records for _ in range(per_prompt)]
    embeds, pooled = encode_prompts(pipe, prompts, MAX_SEQUENCE_LENGTH)
    neg_embeds, neg_pooled = encode_prompts(pipe, [""], MAX_SEQUENCE_LENGTH)
    sigmas = shifted_sigmas(num_steps, pipe.scheduler.config.shift)
    out = []
    for lo in range(0, len(prompts), batch_size):
        ids = list(range(lo, min(lo + batch_size, len(prompts))))
        gens = sample_generators(seed, 0, ids, "cpu")
        init = (group_generators(seed, 0, ids, per_prompt, INIT_STREAM, "cpu") if same_latent else None)
        x = sample_trajectories(pipe.transformer, embeds[ids], pooled[ids], neg_embeds, neg_pooled, sigmas,
                                noise_level, guidance, LATENT_SHAPE, gens, stochastic_steps=stochastic_steps,
                                init_gens=init)[-1]
        out.append(decode_images(pipe, x))
    return np.concatenate(out)


def score(reward, records: list[dict], images: np.ndarray) -> np.ndarray:
    per = len(images) // len(records)
    recs = [r for r in records for _ in range(per)]
    return reward.score(images, [r["prompt"] for r in recs], [r["metadata"] for r in recs])[reward.outputs[0]]


def fit(pipe, reward, records: list[dict], per_prompt: int, seed: int, **sampling) -> Estimate:
    """Mean reward (ODE unless told otherwise) with its 95% CI over these prompts' seeds."""
    values = score(reward, records, sample(pipe, records, per_prompt, seed, **sampling))
    return bootstrap_mean(values, np.repeat(np.arange(len(records)), per_prompt))


@torch.no_grad()
def vae_ceiling(vae, reward, records: list[dict], layout: str) -> float:
    """The mean reward of exact renderings after the VAE: what no model of this world can beat."""
    truth = np.stack([render(r, np.random.default_rng(i), layout) for i, r in enumerate(records)])
    z = vae.encode(to_pixels(truth)).latent_dist.mode()
    images = ((vae.decode(z).sample / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return float(score(reward, records, images).mean())


def group_signal(pipe, reward, records: list[dict], group_size: int, seed: int, windows: dict[str, list[int]],
                 noise_level: float = 0.7, num_steps: int = 10, guidance: float = 3.0) -> dict[str, dict]:
    """Per window of stochastic steps: the mean within-group reward std, and the fraction of groups with none.
    The "all steps, own noise" row is what a GRPO step sees by default."""
    out = {}
    settings = {name: {"stochastic_steps": steps, "same_latent": True} for name, steps in windows.items()}
    settings["all steps, own noise"] = {"stochastic_steps": None, "same_latent": False}
    for name, kw in settings.items():
        values = score(reward, records, sample(pipe, records, group_size, seed, num_steps, guidance, noise_level,
                                               **kw)).reshape(len(records), group_size)
        std = values.std(1)
        out[name] = {"mean_group_std": float(std.mean()), "zero_std": float((std < 1e-6).mean()),
                     "mean": float(values.mean())}
    return out


def text_errors(records: list[dict], images: np.ndarray) -> dict[str, float]:
    """Fractions of readings that are exact, the right characters in the wrong order, or anything else."""
    per = len(images) // len(records)
    kinds = Counter()
    for i, image in enumerate(images):
        target, read = records[i // per]["metadata"]["text"], read_glyphs(image)
        kinds["exact" if read == target else "wrong order" if sorted(read) == sorted(target) else "other"] += 1
    return {k: kinds[k] / len(images) for k in ("exact", "wrong order", "other")}
