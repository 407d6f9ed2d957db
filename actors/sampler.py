"""Samplers for evaluation and SFT data: one pipeline per actor hosting several models on one shared base.
Every model sees the same noise for the same (seed, sample id), so comparisons between models are paired;
a model's own `sampling` (a few-step generator beside the base) changes its schedule and sampler only."""
import numpy as np
import torch

from flowopd.flow import schedule_sigmas, shifted_sigmas
from flowopd.models import (
    ModelBank,
    decode_images,
    encode_prompts,
    load_pipeline,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
)
from flowopd.rollout import sample_generators, sample_trajectories


def model_sampling(sampling, override: dict | None):
    """`sampling` with a model's override on top, validated as a whole (so a bad merge fails like a bad config).
    A num_steps without timesteps means the scheduler's schedule at that count, not the evaluation's timesteps."""
    own = {k: v for k, v in (override or {}).items() if v is not None}
    if "num_steps" in own and "timesteps" not in own:
        own["timesteps"] = None
    return type(sampling).model_validate(sampling.model_dump() | own) if own else sampling


class Sampler:
    def __init__(self, model_cfg, models: dict[str, dict], sampling, seed: int, batch_size: int,
                 device: str = "auto"):
        quiet_libraries()
        self.mc, self.sc, self.seed, self.batch_size = model_cfg, sampling, seed, batch_size
        self.guidance = {name: spec.get("guidance") for name, spec in models.items()}
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(model_cfg.dtype, self.device)
        self.pipe = load_pipeline(model_cfg.base, self.dtype, self.device, model_cfg.compile)
        self.bank = ModelBank(model_cfg.base, models, self.dtype, self.device, self.pipe.transformer, model_cfg.compile)
        self.sampling = {name: model_sampling(sampling, spec.get("sampling")) for name, spec in models.items()}
        self.neg = [t.to(self.device) for t in self.encode([sampling.negative_prompt])]
        side = model_cfg.resolution // self.pipe.vae_scale_factor
        self.latent_shape = (self.pipe.transformer.config.in_channels, side, side)

    def encode(self, prompts: list[str]):
        return encode_prompts(self.pipe, prompts, self.mc.max_sequence_length)

    def generate(self, model: str, prompts: list[str], sample_ids: list[int], decode: bool = True,
                 steps: int | None = None, guidance: float | None = None, resolution: int | None = None,
                 seed: int | None = None) -> np.ndarray:
        """uint8 images (N, H, W, 3), or with decode=False the final latents (fp32). steps, guidance,
        resolution and seed default to the sampler's own settings (the model's override merged in); steps
        replaces the schedule by the scheduler's at that count, keeping the model's sampler and noise level."""
        if guidance is None:
            g = self.guidance.get(model)
            guidance = self.sc.guidance if g is None else g
        sc = self.sampling.get(model, self.sc)  # an unknown model fails in bank.use, which names the hosted ones
        sigmas = shifted_sigmas(steps, sc.shift) if steps else schedule_sigmas(sc.num_steps, sc.shift, sc.timesteps)
        shape = self.latent_shape
        if resolution is not None:
            side = resolution // self.pipe.vae_scale_factor
            shape = (shape[0], side, side)
        seed = self.seed if seed is None else seed
        autocast = self.dtype if self.dtype != torch.float32 else None
        out = []
        with self.bank.use(model) as net:
            for i in range(0, len(prompts), self.batch_size):
                chunk = prompts[i:i + self.batch_size]
                e, p = self.encode(chunk)
                gens = sample_generators(seed, 0, sample_ids[i:i + len(chunk)], self.device)
                *_, final = sample_trajectories(net, e.to(self.device), p.to(self.device), *self.neg, sigmas,
                                                sc.noise_level, guidance, shape, gens, (), autocast, sampler=sc.sampler)
                out.append(decode_images(self.pipe, final) if decode else final.float().cpu().numpy())
        return np.concatenate(out)

    def ping(self) -> int:
        return 0
