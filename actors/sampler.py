"""Evaluation samplers: one pipeline per actor hosting every model to evaluate on one shared base."""
import numpy as np
import torch

from flowopd.flow import shifted_sigmas
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


class EvalSampler:
    def __init__(self, cfg, device: str = "auto"):
        quiet_libraries()
        self.cfg = cfg
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.pipe = load_pipeline(cfg.model.base, self.dtype, self.device)
        specs = {name: m.model_dump() for name, m in cfg.models.items()}
        self.bank = ModelBank(cfg.model.base, specs, self.dtype, self.device, base_module=self.pipe.transformer)
        sc = cfg.sampling
        self.sigmas = shifted_sigmas(sc.num_steps, sc.shift)
        self.neg = [t.to(self.device) for t in encode_prompts(self.pipe, [sc.negative_prompt],
                                                               cfg.model.max_sequence_length)]
        side = cfg.model.resolution // self.pipe.vae_scale_factor
        self.latent_shape = (self.pipe.transformer.config.in_channels, side, side)

    def generate(self, model: str, prompts: list[str], sample_ids: list[int]) -> np.ndarray:
        """uint8 images (N, H, W, 3); the noise depends only on (seed, sample id), not on the model."""
        cfg, sc = self.cfg, self.cfg.sampling
        g = cfg.models[model].guidance
        guidance = sc.guidance if g is None else g
        autocast = self.dtype if self.dtype != torch.float32 else None
        out = []
        with self.bank.use(model) as net:
            for i in range(0, len(prompts), cfg.rollout.batch_size):
                chunk = prompts[i:i + cfg.rollout.batch_size]
                e, p = encode_prompts(self.pipe, chunk, cfg.model.max_sequence_length)
                gens = sample_generators(cfg.seed, 0, sample_ids[i:i + len(chunk)], self.device)
                *_, final = sample_trajectories(net, e.to(self.device), p.to(self.device), *self.neg, self.sigmas,
                                                sc.noise_level, guidance, self.latent_shape, gens, 0, autocast)
                out.append(decode_images(self.pipe, final))
        return np.concatenate(out)

    def ping(self) -> int:
        return 0
