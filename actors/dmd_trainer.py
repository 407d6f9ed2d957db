"""The AC-DMD step loop (RTDMD stage 1): a few-step generator learns to match the teacher's distribution.

One step is `fake_update_ratio` iterations; each draws fresh generator samples (a random number of its CPS
steps, renoised above where they stop) on which the fake score takes one flow-matching step; the last iteration
also draws a fresh batch for the generator, labels its renoised states with the real score (the teacher pool)
and the fake score (its learner group) and takes one generator step. The generator's EMA is updated after every
iteration and is what the job exports."""
import numpy as np
import ray

from flowopd.flow import schedule_sigmas
from flowopd.learner import PER_STATE
from flowopd.objectives import ACDMDGenerator, ACFakeScore

from .learner import LearnerGroup
from .teacher import TeacherPools
from .trainer import Trainer

TEXT = ("embeds", "pooled", "neg_embeds", "neg_pooled")
FAKE_KEYS = ("step_idx", "prompt_idx", "sigma_t", "v_target", "fm_weight", "sigma_c", "xi_1", "xi_2")
GENERATOR_KEYS = ("x", "step_idx", "prompt_idx", "xi", "x_t", "sigma_t", "xi_back")


class DMDTrainer(Trainer):
    name = "ac_dmd"
    work_name = "fake"
    extra_phases = ("label",)

    @staticmethod
    def make_objective(cfg) -> ACDMDGenerator:
        sc = cfg.sampling
        return ACDMDGenerator(schedule_sigmas(sc.num_steps, sc.shift, sc.timesteps), sc.noise_level)

    def start_services(self) -> dict[str, list]:
        cfg = self.cfg
        sc = cfg.sampling
        self.sigmas = schedule_sigmas(sc.num_steps, sc.shift, sc.timesteps).numpy()
        self.pools = TeacherPools(cfg)
        self.fake = LearnerGroup(cfg.fake_job(), ACFakeScore(cfg.sampling.noise_level, cfg.dmd.consistency_weight))
        self.ema = None
        return {"teacher replica": [r for rs in self.pools.replicas.values() for r in rs],
                "fake-score rank": self.fake.ranks}

    def stop_services(self) -> None:
        for actor in self.pools.replicas.values():
            for replica in actor:
                ray.kill(replica)
        self.fake.shutdown()

    def extra_adapters(self) -> dict:
        """The fake score beside the generator (a later stage and a resume need it), and the generator's EMA."""
        return {"fake_score": self.fake.all_lora_states()[0], **({"ema": self.ema} if self.ema is not None else {})}

    def load_extra_adapters(self, adapters: dict) -> None:
        self.ema = adapters.get("ema")
        self._fake_lora = adapters["fake_score"]

    def extra_optimizers(self) -> dict:
        return {"fake_score": self.fake.optimizer_state()}

    def load_extra_optimizers(self, optimizers: dict) -> None:
        self.fake.load_state(self._fake_lora, optimizers["fake_score"])

    def final_adapter(self) -> dict:
        return self.ema if self.ema is not None else self.lora

    def fake_adapter(self) -> dict:
        return self.fake.all_lora_states()[0]

    def _ema_step(self) -> None:
        d = self.cfg.dmd.ema_decay
        if d is not None:
            self.ema = {k: d * self.ema[k] + (1 - d) * v for k, v in self.lora.items()}

    def ac_rollout(self, records, step: int, iteration: int, timer) -> dict:
        """Fresh AC-DMD states from every worker (one stop index for the whole batch, as released), merged."""
        cfg = self.cfg
        G = cfg.data.group_size
        key = step * (cfg.dmd.fake_update_ratio + 1) + iteration  # every iteration of every step draws apart
        stop = int(np.random.default_rng([cfg.seed, key, 0x570]).integers(1, cfg.sampling.num_steps + 1))
        ids = np.arange(len(records) * G)  # sample i is draw i % G of prompt i // G
        refs = [w.ac_rollout.remote(key, self.step_done, self.lora_ref, [records[i // G].prompt for i in sh],
                                    sh.tolist(), stop, cfg.dmd.consistency_step)
                for w, sh in zip(self.workers, np.array_split(ids, len(self.workers))) if len(sh)]
        parts = self.fetch(refs)
        timer.lap("rollout")
        offset, merged = 0, {}
        for p in parts:
            p = dict(p, prompt_idx=p["prompt_idx"] + offset)
            offset += len(p["embeds"])
            for k, v in p.items():
                if k in PER_STATE or k in ("embeds", "pooled"):
                    merged.setdefault(k, []).append(v)
        out = {k: np.concatenate(v) for k, v in merged.items()}
        out.update({k: parts[0][k] for k in ("neg_embeds", "neg_pooled")})
        return out

    def train_step(self) -> dict:
        cfg = self.cfg
        step = self.step_done + 1
        timer = self.start_step()
        version = self.step_done
        records = self.sampler.draw(cfg.data.prompts_per_step)
        if cfg.dmd.ema_decay is not None and self.ema is None:  # the EMA starts from the initial weights
            self.ema = {k: v.copy() for k, v in self.lora.items()}
        fake, results = [], None
        for it in range(cfg.dmd.fake_update_ratio):
            ro = self.ac_rollout(records, step, it, timer)
            batch = {**{k: ro[k] for k in (*FAKE_KEYS, *TEXT)}, "x": ro["x_t"]}
            fake.append((int(ro["step_idx"][0]), self.fake.train_step(batch)))
            timer.lap("fake")
            if it == cfg.dmd.fake_update_ratio - 1:
                results, stop = self.generator_update(records, step, timer)
            self._ema_step()
        self.step_done = step
        sigmas = self.sigmas
        fm = {}  # the fake score's loss on fresh samples, before its update, by the level s the samples stop at
        for stop_idx, res in fake:
            fm.setdefault(f"{sigmas[stop_idx + 1]:.3g}", []).append(np.concatenate([r["fm_loss"] for r in res]))
        fm = {k: float(np.concatenate(v).mean()) for k, v in sorted(fm.items())}
        terms = [r for _, res in fake for r in res]
        m = {"step": step, "policy_version": version, "states": len(results[0]["dmd_loss"]) if results else 0,
             "fm_loss": float(np.concatenate([r["fm_loss"] for r in terms]).mean()), "fm_loss_per_level": fm,
             "fake_grad_norm": fake[-1][1][0]["grad_norm"], "generator_level": float(sigmas[stop]),
             "time": self.end_step(timer), "driver_bytes": self.bytes_in}
        if "consistency" in terms[0]:
            m["consistency"] = float(np.concatenate([r["consistency"] for r in terms]).mean())
        if results is None:
            m.update(loss=float("nan"), skipped=True)
        else:
            m.update(loss=float(np.concatenate([r["dmd_loss"] for r in results]).mean()),
                     grad_norm=results[0]["grad_norm"])
        m["states_per_s"] = m["states"] * (1 + cfg.dmd.fake_update_ratio) / m["time"]["total"]
        return m

    def generator_update(self, records, step: int, timer) -> tuple[list[dict] | None, int]:
        """A fresh batch, labelled at its renoised states by the real score (the teacher) and the fake score,
        then one generator step and the weight sync. Returns the learners' results and the stop index."""
        ro = self.ac_rollout(records, step, self.cfg.dmd.fake_update_ratio, timer)
        text_ref = ray.put({k: ro[k] for k in TEXT})
        jobs = self.pools.query("real", ro["x_t"], ro["sigma_t"], ro["prompt_idx"], text_ref)
        fake_ref = self.fake.predict({**{k: ro[k] for k in ("step_idx", "prompt_idx", "sigma_t", *TEXT)},
                                      "x": ro["x_t"]})
        v_real = np.empty_like(ro["x_t"])
        for (sl, _), val in zip(jobs, self.fetch([ref for _, ref in jobs])):
            v_real[sl] = val
        (v_fake,) = self.fetch([fake_ref])
        timer.lap("label")
        batch = {**{k: ro[k] for k in (*GENERATOR_KEYS, *TEXT)}, "v_real": v_real, "v_fake": v_fake}
        return self.learn(batch, timer), int(ro["step_idx"][0]) + 1
