"""The Flow-GRPO step loop (stage 1 and GRPO-Mix): rollout -> reward actors -> group advantages -> DDP
learn over the trained steps -> weight sync; Flow-GRPO's EMA of the LoRA weights for export."""
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import ray

from flowopd.data import read_source
from flowopd.flow import schedule_sigmas
from flowopd.grpo import ema_update, group_advantages, informative_groups
from flowopd.learner import select_states
from flowopd.objectives import FlowGRPO

from .reward import RewardPools
from .trainer import Trainer, concat_rollouts, truncate_jsonl


def probe_records(probe) -> list:
    """The probe set: the first `max_prompts_per_source` records of each probe source, in file order."""
    return [r for src in probe.sources for r in read_source(src.path, src.format, src.task)[:probe.max_prompts_per_source]]


class Scored(NamedTuple):
    """A step's rollouts in prompt order with their rewards: `parts` number their samples batch-wide
    (`state_sample`), `prompt_of_sample` indexes `prompts`, `groups` holds each sample's prompt id."""
    parts: list[dict]
    prompts: list
    prompt_of_sample: np.ndarray
    tasks: np.ndarray
    groups: np.ndarray
    scores: dict
    reward: np.ndarray


class RewardedTrainer:
    """What the trainers that score their own rollouts share (Flow-GRPO, RTDMD): the reward block, Flow-GRPO's
    EMA schedule for the exported weights, and the reward metrics. Needs `self.rewards` (RewardPools),
    `self.ema` and `self.opt_steps`, and `ema_schedule` (decay or None, every)."""

    ema_schedule: tuple

    def score_rollouts(self, records, step: int, timer, method: str = "rollout", **kwargs) -> Scored:
        """Roll out, scoring each worker's images as they arrive while other workers still sample; joined in
        prompt order, not finishing order, so the batch is reproducible."""
        queued = []
        for ids, ro in self.rollouts(records, step, timer, True, method, **kwargs):
            recs = [records[i] for i in ids[ro["sample_prompt"]]]
            jobs = self.rewards.submit(ro["images"], [r.prompt for r in recs], [r.metadata for r in recs],
                                       [r.task for r in recs])
            queued.append((ids, ro, recs, jobs))
        queued.sort(key=lambda q: q[0][0])
        parts, scores, tasks, groups, prompt_of_sample, prompts = [], [], [], [], [], []
        n_samples = 0
        for ids, ro, recs, jobs in queued:
            scores.append(RewardPools.collect(jobs, len(recs)))
            tasks += [r.task for r in recs]
            groups.append(ids[ro["sample_prompt"]])
            prompt_of_sample.append(ro["sample_prompt"] + len(prompts))
            parts.append(dict(ro, n_prompts=len(ids), state_sample=ro["sample_idx"] + n_samples))
            prompts += [records[i] for i in ids]
            n_samples += len(recs)
        timer.lap(self.work_name)
        merged = RewardPools.merge(scores, [len(q[2]) for q in queued])
        tasks = np.asarray(tasks)
        return Scored(parts, prompts, np.concatenate(prompt_of_sample), tasks, np.concatenate(groups), merged,
                      self.rewards.combine(merged, tasks))

    def start_ema(self) -> None:
        """The EMA starts from the initial weights."""
        if self.ema_schedule[0] is not None and self.ema is None:
            self.ema = {k: v.copy() for k, v in self.lora.items()}

    def _optimizer_step_done(self) -> None:
        """Count the optimizer step; every `ema_every` of them, fold the new weights into the EMA."""
        decay, every = self.ema_schedule
        self.opt_steps += 1
        if decay is not None and self.opt_steps % every == 0:
            self.ema = ema_update(self.ema, self.lora, self.opt_steps, decay)

    def extra_state(self) -> dict:
        return {"optimizer_steps": self.opt_steps}

    def load_extra_state(self, state: dict) -> None:
        self.opt_steps = state.get("optimizer_steps", 0)

    @staticmethod
    def reward_metrics(scored: Scored, adv: np.ndarray) -> dict:
        reward = scored.reward
        finite = np.isfinite(reward)
        return {"samples": len(reward), "nonfinite_rewards": int((~finite).sum()),
                "reward_mean": float(np.nanmean(reward)) if finite.any() else float("nan"),
                "reward_per_task": RewardPools.mean_per_task(reward, scored.tasks),
                "rewards": {k: {o: float(np.nanmean(v)) for o, v in outs.items() if np.isfinite(v).any()}
                            for k, outs in scored.scores.items()},
                "adv_abs_mean": float(np.nanmean(np.abs(adv))) if finite.any() else 0.0}


class GRPOTrainer(RewardedTrainer, Trainer):
    name = "grpo"
    work_name = "score"
    extra_phases = ("probe",)

    def __init__(self, cfg, sources: list[list]):
        self.probe_records = probe_records(cfg.probe) if cfg.probe else []
        self.probe_path = Path(cfg.output_dir) / "probe.jsonl"
        super().__init__(cfg, sources)

    @staticmethod
    def make_objective(cfg) -> FlowGRPO:
        sc, g = cfg.sampling, cfg.grpo
        return FlowGRPO(schedule_sigmas(sc.num_steps, sc.shift, sc.timesteps), sc.noise_level, g.clip_range, g.beta, sc.guidance,
                        g.detach_uncond)

    @property
    def ema_schedule(self) -> tuple:
        return self.cfg.grpo.ema_decay, self.cfg.grpo.ema_every

    def start_services(self) -> dict[str, list]:
        self.rewards = RewardPools(self.cfg.rewards)
        self.ema = None
        self.opt_steps = 0
        return {"reward actor": self.rewards.actors()}

    def extra_adapters(self) -> dict:
        return {"ema": self.ema} if self.ema is not None else {}

    def load_extra_adapters(self, adapters: dict) -> None:
        self.ema = adapters.get("ema")

    def final_adapter(self) -> dict:
        """What to export: the EMA weights when EMA is on, else the student's."""
        return self.ema if self.ema is not None else self.lora

    def _truncate_metrics(self, step: int) -> None:
        super()._truncate_metrics(step)
        truncate_jsonl(self.probe_path, step)

    def probe(self, step: int) -> dict[str, float]:
        """Score the weights the job would export now on the probe set; one probe.jsonl line with every
        image's reward (the same prompts, seeds and noise at every step: curves are paired), the task means
        for the metrics."""
        pc, sc = self.cfg.probe, self.cfg.sampling
        counts = [pc.samples(r.task) for r in self.probe_records]
        recs = [r for r, k in zip(self.probe_records, counts) for _ in range(k)]
        prompts, tasks = [r.prompt for r in recs], np.asarray([r.task for r in recs])
        lora = ray.put(self.final_adapter())
        shards = np.array_split(np.arange(len(recs)), len(self.workers))
        images = np.concatenate(self.fetch([
            w.generate.remote(lora, [prompts[i] for i in ids], ids.tolist(), pc.seed, pc.num_steps or sc.num_steps,
                              sc.guidance if pc.guidance is None else pc.guidance)
            for w, ids in zip(self.workers, shards) if len(ids)]))
        scores = RewardPools.collect(self.rewards.submit(images, prompts, [r.metadata for r in recs], list(tasks)),
                                     len(recs))
        reward = self.rewards.combine(scores, tasks)
        data = self.cfg.data
        line = {"step": step, "samples": step * data.prompts_per_step * data.group_size,
                "samples_per_prompt": counts, "prompts": [r.prompt for r in self.probe_records],
                "tasks": [r.task for r in self.probe_records], "reward": [None if np.isnan(v) else float(v) for v in reward]}
        with open(self.probe_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        return {t: float(np.nanmean(reward[tasks == t])) for t in sorted(set(tasks))}

    def _probe_due(self, step: int) -> bool:
        return bool(self.probe_records) and (step % self.cfg.probe.every == 0 or step == self.cfg.train.steps)

    def train_step(self) -> dict:
        cfg = self.cfg
        step = self.step_done + 1
        if step == 1 and self.probe_records:  # the initial weights: every later probe is paired with this one
            self.start_ema()
            self.probe(0)
        timer = self.start_step()
        version = self.step_done
        records = self.sampler.draw(cfg.data.prompts_per_step)
        self.start_ema()
        scored = self.score_rollouts(records, step, timer)
        adv = group_advantages(scored.reward, scored.groups, cfg.grpo.adv_clip)
        keep_sample = informative_groups(adv, scored.groups)
        batch = concat_rollouts(scored.parts, extra=("state_sample",))
        state_sample = batch.pop("state_sample")
        batch["adv"] = np.nan_to_num(adv[state_sample]).astype(np.float32)
        kept = np.nonzero(keep_sample[state_sample])[0]
        results, first_ratio_dev = [], None
        order = np.random.default_rng([cfg.seed, step]).permutation(np.unique(state_sample[kept]))
        for mb_samples in np.array_split(order, cfg.grpo.minibatches):
            sel = kept[np.isin(state_sample[kept], mb_samples)]
            res = self.learn(select_states(batch, sel), timer) if len(sel) else None
            if res is not None:
                self._optimizer_step_done()
                if first_ratio_dev is None:  # on-policy: exactly 1 up to float noise
                    first_ratio_dev = max(float(np.abs(r["ratio"] - 1).max()) for r in res)
                results.extend(res)
        self.step_done = step
        groups = scored.groups
        m = {"step": step, "policy_version": version, "states": len(kept), **self.reward_metrics(scored, adv),
             "groups_kept": len(np.unique(groups[keep_sample])), "groups": len(np.unique(groups))}
        if self._probe_due(step):
            started = time.perf_counter()
            m["probe"] = self.probe(step)
            timer.add("probe", time.perf_counter() - started)
        t = self.end_step(timer)
        m.update(time=t, states_per_s=len(kept) / t["total"])
        if not results:
            m.update(loss=float("nan"), skipped=True)
            return m
        m.update(loss=float(np.concatenate([r["loss"] for r in results]).mean()),
                 kl=float(np.concatenate([r["kl"] for r in results]).mean()), grad_norm=results[-1]["grad_norm"],
                 first_ratio_dev=first_ratio_dev)
        return m
