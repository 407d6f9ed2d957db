"""The RTDMD stage-2 step loop: the few-step generator of AC-DMD tilted toward a reward.

One step: rollouts (G CPS samples per prompt; SubGRPO's trained steps drawn for the step) -> reward actors ->
group advantages -> `fake_updates` fake-score updates on the final samples -> real (teacher pool) and fake
labels at the renoised final samples -> one generator step on every state (policy loss on the trained steps;
AC-DMD and reward back-propagation on the last step) -> weight sync; Flow-GRPO's EMA schedule for export."""
from functools import partial

import numpy as np
import ray

from flowopd.dmd import subgrpo_steps
from flowopd.flow import schedule_sigmas
from flowopd.grpo import group_advantages
from flowopd.objectives import RewardBackprop, RTDMDGenerator
from rewards.registry import make_reward

from .dmd_trainer import TEXT, DMDTrainer
from .grpo_trainer import RewardedTrainer
from .reward import RewardPools
from .trainer import concat_rollouts

FAKE_KEYS = ("sigma_t", "v_target", "fm_weight", "sigma_c", "xi_1", "xi_2")


class RTDMDTrainer(RewardedTrainer, DMDTrainer):
    name = "rtdmd"
    work_name = "score"
    extra_phases = ("fake", "label")

    @staticmethod
    def make_objective(cfg) -> RTDMDGenerator:
        sc, r = cfg.sampling, cfg.rtdmd
        bp = None
        if r.backprop is not None:
            spec = next(s for s in cfg.rewards if s.key == r.backprop.reward)
            bp = RewardBackprop(cfg.model.base, partial(make_reward, spec.name, spec.kwargs), r.backprop.margin,
                                r.backprop.scale)
        return RTDMDGenerator(schedule_sigmas(sc.num_steps, sc.shift, sc.timesteps), sc.noise_level, r.clip_range,
                              r.dmd_weight, bp)

    @property
    def ema_schedule(self) -> tuple:
        return self.cfg.rtdmd.ema_decay, self.cfg.rtdmd.ema_every

    def start_services(self) -> dict[str, list]:
        services = super().start_services()
        self.rewards = RewardPools(self.cfg.rewards)
        self.opt_steps = 0
        return {**services, "reward actor": self.rewards.actors()}

    def stop_services(self) -> None:
        super().stop_services()
        for actor in self.rewards.actors():
            ray.kill(actor)

    def train_step(self) -> dict:
        cfg, r = self.cfg, self.cfg.rtdmd
        step = self.step_done + 1
        timer = self.start_step()
        version = self.step_done
        records = self.sampler.draw(cfg.data.prompts_per_step)
        self.start_ema()
        trained = subgrpo_steps(cfg.seed, step, *r.train_range, r.train_steps)
        scored = self.score_rollouts(records, step, timer, "rtdmd_rollout", trained=trained,
                                     consistency_step=cfg.dmd.consistency_step, fake_updates=r.fake_updates)
        adv = group_advantages(scored.reward, scored.groups, r.adv_clip)
        rollouts, n_samples = scored.parts, len(scored.reward)

        batch = concat_rollouts(rollouts, extra=("state_sample",))
        text = {k: batch[k] for k in TEXT}
        per_sample = {"step_idx": np.full(n_samples, cfg.sampling.num_steps - 1), "prompt_idx": scored.prompt_of_sample}
        fm = []
        for u in range(r.fake_updates):
            draw = {k: np.concatenate([ro["fake"][u][k] for ro in rollouts]) for k in ("x_t", *FAKE_KEYS)}
            res = self.fake.train_step({**per_sample, **{k: draw[k] for k in FAKE_KEYS}, **text, "x": draw["x_t"]})
            fm.append(np.concatenate([x["fm_loss"] for x in res]))
        timer.lap("fake")
        label = {k: np.concatenate([ro["label"][k] for ro in rollouts]) for k in ("x_t", "sigma_t")}
        v_real, v_fake = self.score_labels(label, per_sample, text)
        timer.lap("label")

        state_sample = batch.pop("state_sample")
        batch["adv"] = np.nan_to_num(adv[state_sample]).astype(np.float32)
        last_rows = np.nonzero(batch["step_idx"] == cfg.sampling.num_steps - 1)[0]
        for key, values in (("x_t", label["x_t"]), ("sigma_t", label["sigma_t"]), ("v_real", v_real),
                            ("v_fake", v_fake)):  # one row per state; only the last step's rows are read
            full = np.zeros((len(state_sample), *values.shape[1:]), values.dtype)
            full[last_rows] = values[state_sample[last_rows]]
            batch[key] = full
        batch["prompts"], batch["metadata"] = [x.prompt for x in scored.prompts], [x.metadata for x in scored.prompts]
        results = self.learn(batch, timer)
        if results is not None:
            self._optimizer_step_done()
        self.step_done = step
        return self._metrics(step, version, trained, results, scored, adv, fm, len(last_rows), timer)

    def score_labels(self, label: dict, per_sample: dict, text: dict) -> tuple[np.ndarray, np.ndarray]:
        """The real score (the teacher pool, with its CFG) and the fake score at the renoised final samples."""
        text_ref = ray.put(text)
        jobs = self.pools.query("real", label["x_t"], label["sigma_t"], per_sample["prompt_idx"], text_ref)
        fake_ref = self.fake.predict({**per_sample, "sigma_t": label["sigma_t"], **text, "x": label["x_t"]})
        v_real = np.empty_like(label["x_t"])
        for (sl, _), val in zip(jobs, self.fetch([ref for _, ref in jobs])):
            v_real[sl] = val
        (v_fake,) = self.fetch([fake_ref])
        return v_real, v_fake

    def _metrics(self, step, version, trained, results, scored, adv, fm, n_last, timer) -> dict:
        m = {"step": step, "policy_version": version, "trained_steps": trained, **self.reward_metrics(scored, adv),
             "fm_loss": float(np.concatenate(fm).mean()) if fm else float("nan")}
        if results is None:
            m.update(loss=float("nan"), skipped=True)
        else:
            def total(key):
                return float(sum(x[key].sum() for x in results))
            n_states = sum(len(x["loss"]) for x in results)
            m.update(states=n_states, loss=total("loss") / n_states,
                     policy_loss=total("policy_loss") / max(n_states - n_last, 1), dmd_loss=total("dmd_loss") / n_last,
                     bp_reward=total("bp_reward") / n_last if self.cfg.rtdmd.backprop else None,
                     first_ratio_dev=max(float(np.abs(x["ratio"] - 1).max()) for x in results),
                     grad_norm=results[0]["grad_norm"])
        m["time"] = self.end_step(timer)
        m["states_per_s"] = m.get("states", 0) / m["time"]["total"]
        m["driver_bytes"] = self.bytes_in
        return m
