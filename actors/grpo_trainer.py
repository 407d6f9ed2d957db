"""The Flow-GRPO step loop (stage 1 and GRPO-Mix): rollout -> reward actors -> group advantages -> DDP
learn over the trained steps -> weight sync; Flow-GRPO's EMA of the LoRA weights for export."""

import numpy as np

from flowopd.flow import schedule_sigmas
from flowopd.grpo import ema_update, group_advantages, informative_groups
from flowopd.learner import select_states
from flowopd.objectives import FlowGRPO

from .reward import RewardPools
from .trainer import Trainer, concat_rollouts


class GRPOTrainer(Trainer):
    name = "grpo"
    work_name = "score"

    @staticmethod
    def make_objective(cfg) -> FlowGRPO:
        sc, g = cfg.sampling, cfg.grpo
        return FlowGRPO(schedule_sigmas(sc.num_steps, sc.shift, sc.timesteps), sc.noise_level, g.clip_range, g.beta, sc.guidance,
                        g.detach_uncond)

    def start_services(self) -> dict[str, list]:
        self.rewards = RewardPools(self.cfg.rewards)
        self.ema = None
        self.opt_steps = 0
        return {"reward actor": self.rewards.actors()}

    def extra_adapters(self) -> dict:
        return {"ema": self.ema} if self.ema is not None else {}

    def load_extra_adapters(self, adapters: dict) -> None:
        self.ema = adapters.get("ema")

    def extra_state(self) -> dict:
        return {"optimizer_steps": self.opt_steps}

    def load_extra_state(self, state: dict) -> None:
        self.opt_steps = state.get("optimizer_steps", 0)

    def _optimizer_step_done(self) -> None:
        """Count the optimizer step; every `ema_every` of them, fold the new weights into the EMA."""
        g = self.cfg.grpo
        self.opt_steps += 1
        if g.ema_decay and self.opt_steps % g.ema_every == 0:
            self.ema = ema_update(self.ema, self.lora, self.opt_steps, g.ema_decay)

    def final_adapter(self) -> dict:
        """What to export: the EMA weights when EMA is on, else the student's."""
        return self.ema if self.ema is not None else self.lora

    def train_step(self) -> dict:
        cfg = self.cfg
        step = self.step_done + 1
        timer = self.start_step()
        version = self.step_done
        records = self.sampler.draw(cfg.data.prompts_per_step)
        if cfg.grpo.ema_decay and self.ema is None:  # the EMA starts from the initial weights
            self.ema = {k: v.copy() for k, v in self.lora.items()}
        queued = []
        for ids, ro in self.rollouts(records, step, timer, decode=True):  # score while other workers still sample
            recs = [records[i] for i in ids[ro["sample_prompt"]]]
            jobs = self.rewards.submit(ro["images"], [r.prompt for r in recs], [r.metadata for r in recs],
                                       [r.task for r in recs])
            queued.append((ids, ro, recs, jobs))
        queued.sort(key=lambda q: q[0][0])  # in prompt order, not finishing order: the batch is reproducible
        parts, scores, tasks, groups = [], [], [], []
        n_samples = 0
        for ids, ro, recs, jobs in queued:
            scores.append(RewardPools.collect(jobs, len(recs)))
            tasks += [r.task for r in recs]
            groups.append(ids[ro["sample_prompt"]])
            parts.append(dict(ro, n_prompts=len(ids), state_sample=ro["sample_idx"] + n_samples))
            n_samples += len(recs)
        timer.lap(self.work_name)
        tasks, groups = np.asarray(tasks), np.concatenate(groups)
        merged = RewardPools.merge(scores, [len(q[2]) for q in queued])
        reward = self.rewards.combine(merged, tasks)
        adv = group_advantages(reward, groups, cfg.grpo.adv_clip)
        keep_sample = informative_groups(adv, groups)
        batch = concat_rollouts(parts, extra=("state_sample",))
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
        m = self._metrics(step, version, results, merged, tasks, reward, adv, keep_sample, groups, len(kept),
                          self.end_step(timer))
        if first_ratio_dev is not None:
            m["first_ratio_dev"] = first_ratio_dev
        return m

    def _metrics(self, step, version, results, scores, tasks, reward, adv, keep, groups, n_states, t) -> dict:
        finite = np.isfinite(reward)
        m = {"step": step, "policy_version": version, "samples": len(reward), "states": n_states,
             "nonfinite_rewards": int((~finite).sum()), "time": t, "states_per_s": n_states / t["total"],
             "reward_mean": float(np.nanmean(reward)) if finite.any() else float("nan"),
             "reward_per_task": RewardPools.mean_per_task(reward, tasks),
             "rewards": {k: {o: float(np.nanmean(v)) for o, v in outs.items() if np.isfinite(v).any()}
                         for k, outs in scores.items()},
             "groups_kept": len(np.unique(groups[keep])), "groups": len(np.unique(groups)),
             "adv_abs_mean": float(np.nanmean(np.abs(adv))) if finite.any() else 0.0}
        if not results:
            m.update(loss=float("nan"), skipped=True)
            return m
        loss = np.concatenate([r["loss"] for r in results])
        m.update(loss=float(loss.mean()), kl=float(np.concatenate([r["kl"] for r in results]).mean()),
                 grad_norm=results[-1]["grad_norm"])
        return m
