"""Rollout workers: the student samples SDE trajectories with the current (versioned) LoRA weights."""
import os

import numpy as np
import torch

from flowopd.flow import schedule_sigmas, shifted_sigmas
from flowopd.models import (
    add_student_adapter,
    decode_images,
    encode_prompts,
    load_lora_state,
    load_pipeline,
    lora_config,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
)
from flowopd.rollout import (
    RENOISE_STREAM,
    SHARED_STREAM,
    ac_states,
    group_generators,
    initial_generators,
    renoised,
    sample_generators,
    sample_trajectories,
    sde_schedule,
)


class RolloutWorker:
    def __init__(self, cfg, device: str = "auto"):
        quiet_libraries()
        self.cfg = cfg
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.pipe = load_pipeline(cfg.student_base(), self.dtype, self.device, cfg.model.compile)
        s = cfg.student
        self.model = add_student_adapter(self.pipe.transformer,
                                         lora_config(s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_init),
                                         s.init_adapter).eval()
        self.model.requires_grad_(False)
        self.version = -1
        sc = cfg.sampling
        self.sigmas = schedule_sigmas(sc.num_steps, sc.shift, sc.timesteps)
        self.neg = encode_prompts(self.pipe, [sc.negative_prompt], cfg.model.max_sequence_length)
        side = cfg.model.resolution // self.pipe.vae_scale_factor
        self.latent_shape = (self.pipe.transformer.config.in_channels, side, side)

    def set_weights(self, version: int, lora: dict) -> int:
        if version != self.version:
            load_lora_state(self.model, lora)
            self.version = version
        return self.version

    def rollout(self, step: int, version: int, lora: dict, prompts: list[str], prompt_ids: list[int],
                decode: bool = False) -> dict:
        """G samples for each prompt; returns every trained state, flattened in (step j, sample) order,
        and with decode=True the final images (uint8, one per sample, for rewards)."""
        self.set_weights(version, lora)
        ro, final = self._sample(step, prompts, prompt_ids)
        ro["images"] = decode_images(self.pipe, final) if decode else None
        return ro

    def generate(self, lora: dict, prompts: list[str], sample_ids: list[int], seed: int, num_steps: int,
                 guidance: float) -> np.ndarray:
        """ODE samples of other weights (a probe of the EMA a job exports), uint8 images, one per prompt; noise
        keyed by (seed, sample id) as in an evaluation. The next rollout loads its own weights again."""
        load_lora_state(self.model, lora)
        self.version = -1
        sigmas = shifted_sigmas(num_steps, self.cfg.sampling.shift)
        embeds, pooled = encode_prompts(self.pipe, prompts, self.cfg.model.max_sequence_length)
        autocast = self.dtype if self.dtype != torch.float32 else None
        dev, bs, out = self.device, self.cfg.rollout.batch_size, []
        for i in range(0, len(prompts), bs):
            gens = sample_generators(seed, 0, sample_ids[i:i + bs], dev)
            final = sample_trajectories(self.model, embeds[i:i + bs].to(dev), pooled[i:i + bs].to(dev),
                                        self.neg[0].to(dev), self.neg[1].to(dev), sigmas, 0.0, guidance,
                                        self.latent_shape, gens, (), autocast)[-1]
            out.append(decode_images(self.pipe, final))
        return np.concatenate(out)

    def rollout_stream(self, step: int, version: int, lora: dict, groups: list[tuple], decode: bool = False):
        """`rollout` for one micro-group after another, as a Ray streaming generator; a group is (prompts,
        prompt ids, samples as (prompt index in the group, sample index k < G) pairs). Each group's states
        are yielded as soon as they exist (then, with decode=True, its images), so that labelling and
        learning start while later groups are still sampled. The states stay in the object store; the
        driver only passes their reference on."""
        self.set_weights(version, lora)
        for prompts, prompt_ids, samples in groups:
            ro, final = self._sample(step, prompts, prompt_ids, samples)
            yield ro
            if decode:
                yield decode_images(self.pipe, final)

    def _sample(self, step: int, prompts: list[str], prompt_ids: list[int],
                samples: list[tuple[int, int]] | None = None, trained: list[int] | None = None,
                shared: tuple[int, ...] = ()) -> tuple[dict, torch.Tensor]:
        """The states of the given samples (default: all G of every prompt; see `rollout`) and their final
        latents. A sample's noise depends on its prompt id and index only, so any split of a step's samples
        gives the same states. `trained` replaces the schedule's trained steps; the steps in `shared` draw
        noise shared by the samples of a prompt."""
        cfg, sc = self.cfg, self.cfg.sampling
        G, dev = cfg.data.group_size, self.device
        embeds, pooled = encode_prompts(self.pipe, prompts, cfg.model.max_sequence_length)
        autocast = self.dtype if self.dtype != torch.float32 else None
        if samples is None:
            samples = [(p, k) for p in range(len(prompts)) for k in range(G)]
        sample_prompt, index = np.asarray(samples, dtype=int).reshape(-1, 2).T
        sample_ids = np.asarray(prompt_ids)[sample_prompt] * G + index
        stochastic, scheduled = sde_schedule(sc.num_steps, sc, cfg.seed, step)
        trained = scheduled if trained is None else trained
        outs = []
        bs = cfg.rollout.batch_size
        for i in range(0, len(sample_prompt), bs):
            pi = torch.as_tensor(sample_prompt[i:i + bs])
            ids = sample_ids[i:i + bs]
            outs.append(sample_trajectories(
                self.model, embeds[pi].to(dev), pooled[pi].to(dev), self.neg[0].to(dev), self.neg[1].to(dev),
                self.sigmas, sc.noise_level, sc.guidance, self.latent_shape, sample_generators(cfg.seed, step, ids, dev),
                trained, autocast, stochastic, initial_generators(cfg.seed, step, ids, G, sc.same_latent, dev),
                sc.sampler, shared, group_generators(cfg.seed, step, ids, G, SHARED_STREAM, dev) if shared else None))
        x, x_next, logp = (torch.cat([o[k] for o in outs], dim=1) for k in range(3))
        J, B = x.shape[:2]
        step_idx = np.repeat(np.asarray(trained), B)
        pg = cfg.needs_transitions()  # only score-function losses need x' and log-probs
        ro = {
            "x": x.flatten(0, 1).cpu().numpy(), "x_next": x_next.flatten(0, 1).cpu().numpy() if pg else None,
            "logp_old": logp.flatten().cpu().numpy() if pg else None,
            "step_idx": step_idx, "prompt_idx": np.tile(sample_prompt, J),
            "sample_idx": np.tile(np.arange(B), J), "sample_prompt": sample_prompt, "sample_id": sample_ids,
            "sigma": self.sigmas[step_idx].numpy(),
            "embeds": embeds.numpy(), "pooled": pooled.numpy(),
            "neg_embeds": self.neg[0].numpy(), "neg_pooled": self.neg[1].numpy(),
            "version": self.version,
        }
        return ro, torch.cat([o[3] for o in outs])

    def rtdmd_rollout(self, step: int, version: int, lora: dict, prompts: list[str], prompt_ids: list[int],
                      decode: bool, trained: list[int], consistency_step: int, fake_updates: int) -> dict:
        """RTDMD stage 2's rollout: G CPS samples per prompt with their states at the `trained` (SubGRPO) steps
        and at the deterministic last step; the other stochastic steps draw noise shared within each prompt's
        group. With the images, the final samples renoised (`renoised`, s = 0) `fake_updates` times for the fake
        score's updates (`fake`) and once for the last step's real and fake labels (`label`)."""
        self.set_weights(version, lora)
        cfg, last = self.cfg, self.cfg.sampling.num_steps - 1
        shared = tuple(j for j in range(last) if j not in trained)
        ro, final = self._sample(step, prompts, prompt_ids, trained=[*trained, last], shared=shared)
        ro["images"] = decode_images(self.pipe, final) if decode else None
        gens = sample_generators(cfg.seed, step, RENOISE_STREAM + ro["sample_id"], self.device)
        with torch.no_grad():
            draws = [renoised(final, 0.0, gens, consistency_step) for _ in range(fake_updates + 1)]
        as_np = [{k: v.cpu().numpy() for k, v in d.items()} for d in draws]
        return {**ro, "fake": as_np[:fake_updates], "label": as_np[fake_updates]}

    def ac_rollout(self, key: int, version: int, lora: dict, prompts: list[str], sample_ids: list[int], stop: int,
                   consistency_step: int) -> dict:
        """AC-DMD's states (flowopd.rollout.ac_states), one sample per entry of `prompts`, with the generator's
        weights of `version`; a sample's draws depend on (seed, key, sample id) only. Its text rides along."""
        self.set_weights(version, lora)
        cfg, sc, dev = self.cfg, self.cfg.sampling, self.device
        embeds, pooled = encode_prompts(self.pipe, prompts, cfg.model.max_sequence_length)
        autocast = self.dtype if self.dtype != torch.float32 else None
        parts, bs = [], cfg.rollout.batch_size
        for i in range(0, len(prompts), bs):
            sl = slice(i, i + bs)
            parts.append(ac_states(self.model, embeds[sl].to(dev), pooled[sl].to(dev), self.sigmas, sc.noise_level,
                                   stop, self.latent_shape, sample_generators(cfg.seed, key, sample_ids[sl], dev),
                                   consistency_step, autocast))
        ro = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
        return {**ro, "step_idx": np.full(len(prompts), stop - 1), "prompt_idx": np.arange(len(prompts)),
                "embeds": embeds.numpy(), "pooled": pooled.numpy(), "neg_embeds": self.neg[0].numpy(),
                "neg_pooled": self.neg[1].numpy(), "version": self.version}

    def ping(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()
