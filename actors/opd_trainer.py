"""The OPD step loop: rollout -> label by routed teacher + MAR -> DDP learn -> weight sync."""

import numpy as np
import ray

from flowopd.flow import shifted_sigmas
from flowopd.objectives import AnalyticOPD, PolicyGradientOPD

from .reward import RewardPools
from .teacher import TeacherPools
from .trainer import Trainer, concat_rollouts, select_states


class OPDTrainer(Trainer):
    name = "opd"
    work_name = "label"

    @staticmethod
    def make_objective(cfg) -> AnalyticOPD:
        sc, loss = cfg.sampling, cfg.loss
        kw = {"exact": loss.kl_weighting == "exact", "mar_weight": cfg.mar.weight if cfg.mar.teacher else 0.0,
              "guidance": sc.guidance if loss.train_cfg else 1.0, "detach_uncond": loss.detach_uncond}
        sigmas = shifted_sigmas(sc.num_steps, sc.shift)
        if loss.form == "policy_gradient":
            return PolicyGradientOPD(sigmas, sc.noise_level, clip_range=loss.clip_range, **kw)
        return AnalyticOPD(sigmas, sc.noise_level, **kw)

    def start_services(self) -> dict[str, list]:
        self.pools = TeacherPools(self.cfg)
        self.monitor = RewardPools(self.cfg.monitor) if self.cfg.monitor else None
        return {"teacher replica": [r for rs in self.pools.replicas.values() for r in rs],
                "reward actor": self.monitor.actors() if self.monitor else []}

    def label(self, ro: dict, tasks: list[str]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
        """Targets from the routed teacher for every state, and from the MAR teacher for all of them.
        One batched query per teacher and replica, never one per state."""
        cfg = self.cfg
        text_ref = ray.put({k: ro[k] for k in ("embeds", "pooled", "neg_embeds", "neg_pooled")})
        names = sorted(set(cfg.route.values()))
        teacher_idx = np.asarray([names.index(cfg.route[tasks[p]]) for p in ro["prompt_idx"]])
        jobs = []
        for ti, name in enumerate(names):
            idx = np.nonzero(teacher_idx == ti)[0]
            if len(idx):
                jobs += [("task", idx[sl], ref) for sl, ref in
                         self.pools.query(name, ro["x"][idx], ro["sigma"][idx], ro["prompt_idx"][idx], text_ref)]
        if cfg.mar.teacher and cfg.mar.weight > 0:
            jobs += [("mar", np.arange(len(ro["x"]))[sl], ref) for sl, ref in
                     self.pools.query(cfg.mar.teacher, ro["x"], ro["sigma"], ro["prompt_idx"], text_ref)]
        v_task = np.empty_like(ro["x"])
        v_mar = np.empty_like(ro["x"]) if any(j[0] == "mar" for j in jobs) else None
        for (kind, idx, _), val in zip(jobs, ray.get([j[2] for j in jobs])):
            (v_task if kind == "task" else v_mar)[idx] = val
        return v_task, v_mar, teacher_idx, len(jobs)

    def train_step(self) -> dict:
        cfg = self.cfg
        step = self.step_done + 1
        timer = self.start_step()
        records = self.sampler.draw(cfg.data.prompts_per_step)
        version = self.step_done
        parts, scoring = [], []
        for ids, ro in self.rollouts(records, step, timer, decode=self.monitor is not None):  # label as they arrive
            tasks = [records[i].task for i in ids]
            if self.monitor is not None:
                recs = [records[i] for i in ids[ro["sample_prompt"]]]
                scoring.append((recs, self.monitor.submit(ro["images"], [r.prompt for r in recs],
                                                          [r.metadata for r in recs], [r.task for r in recs])))
            v_task, v_mar, teacher_idx, _ = self.label(ro, tasks)
            parts.append(dict(ro, v_task=v_task, v_mar=v_mar, teacher=teacher_idx, n_prompts=len(ids),
                              task=np.asarray([tasks[p] for p in ro["prompt_idx"]])))
        timer.lap(self.work_name)
        monitored = self.monitored_rewards(scoring)
        batch = concat_rollouts(parts, extra=("task", "teacher"))
        n_all = len(batch["x"])
        finite = np.isfinite(batch["v_task"]).reshape(n_all, -1).all(1)
        if batch["v_mar"] is not None:
            finite &= np.isfinite(batch["v_mar"]).reshape(n_all, -1).all(1)
        tasks, teachers = batch.pop("task")[finite], batch.pop("teacher")[finite]
        batch = select_states(batch, np.nonzero(finite)[0])
        results = self.learn(batch, timer)
        self.step_done = step
        queries = n_all * (1 + (batch["v_mar"] is not None))
        m = self._metrics(step, version, results, batch, tasks, teachers, n_all - int(finite.sum()), queries,
                          self.end_step(timer))
        return {**m, **monitored}

    def monitored_rewards(self, scoring: list) -> dict:
        """Mean monitor reward per task on this step's rollouts (the same statistic GRPO logs)."""
        if not scoring:
            return {}
        tasks = np.asarray([r.task for recs, _ in scoring for r in recs])
        scores = RewardPools.merge([RewardPools.collect(jobs, len(recs)) for recs, jobs in scoring],
                                   [len(recs) for recs, _ in scoring])
        return {"reward_per_task": RewardPools.mean_per_task(self.monitor.combine(scores, tasks), tasks)}

    def _metrics(self, step, version, results, batch, tasks, teachers, nonfinite, queries, t) -> dict:
        cfg = self.cfg
        m = {"step": step, "policy_version": version, "states": len(batch["x"]),
             "nonfinite_targets": nonfinite, "time": t, "states_per_s": len(batch["x"]) / t["total"],
             "teacher_queries_per_s": queries / max(t["label"] + t["rollout"], 1e-9)}
        if results is None:
            m.update(loss=float("nan"), skipped=True)
            return m
        task_loss = np.concatenate([r["task_loss"] for r in results])
        lam = cfg.mar.weight if "mar_loss" in results[0] else 0.0
        mar_loss = np.concatenate([r["mar_loss"] for r in results]) if lam else np.zeros_like(task_loss)
        names = sorted(set(cfg.route.values()))
        j = batch["step_idx"]
        m.update(
            loss=float(task_loss.mean() + lam * mar_loss.mean()), task_loss=float(task_loss.mean()),
            mar_loss=float(mar_loss.mean()) if lam else None, grad_norm=results[0]["grad_norm"],
            loss_per_teacher={n: float(task_loss[teachers == i].mean()) for i, n in enumerate(names)
                              if (teachers == i).any()},
            loss_per_task={k: float(task_loss[tasks == k].mean()) for k in sorted(set(tasks))},
            loss_per_step=[float(task_loss[j == s].mean()) for s in range(int(j.max()) + 1)])
        return m
