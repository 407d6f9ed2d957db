"""The OPD step loop: rollout -> label by routed teacher + MAR -> DDP learn -> weight sync.

By default (`rollout.overlap`) the phases overlap within the step: rollout workers stream micro-groups of
prompts, each is labelled and its gradient accumulated on a learner rank as soon as it exists, and one
optimizer step and one weight sync end the step. States and targets then pass between actors by object
reference; the driver holds references and small metadata only."""
from collections import deque

import numpy as np
import ray

from flowopd.flow import schedule_sigmas
from flowopd.learner import payload_bytes, select_states
from flowopd.objectives import AnalyticOPD, PolicyGradientOPD

from .reward import RewardPools
from .teacher import TeacherPools
from .trainer import Trainer, concat_rollouts


class OPDTrainer(Trainer):
    name = "opd"
    work_name = "label"

    @staticmethod
    def make_objective(cfg) -> AnalyticOPD:
        sc, loss = cfg.sampling, cfg.loss
        kw = {"exact": loss.kl_weighting == "exact", "mar_weight": cfg.mar.weight if cfg.mar.teacher else 0.0,
              "guidance": sc.guidance if loss.train_cfg else 1.0, "detach_uncond": loss.detach_uncond}
        sigmas = schedule_sigmas(sc.num_steps, sc.shift, sc.timesteps)
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
        for (kind, idx, _), val in zip(jobs, self.fetch([j[2] for j in jobs])):
            (v_task if kind == "task" else v_mar)[idx] = val
        return v_task, v_mar, teacher_idx, len(jobs)

    def train_step(self) -> dict:
        return self.overlapped_step() if self.cfg.rollout.overlap else self.phased_step()

    def overlapped_step(self) -> dict:
        cfg = self.cfg
        step = self.step_done + 1
        timer = self.start_step()
        records = self.sampler.draw(cfg.data.prompts_per_step)
        version = self.step_done
        tasks = [r.task for r in records]
        groups, accumulated, scoring = self.stream_micro_groups(records, step)
        timer.lap("rollout")
        # results in a fixed order (arrival order varies; the metrics' float sums must not)
        results = sorted(self.fetch(accumulated), key=lambda r: (r["group"], r["rank"]))
        timer.lap(self.work_name)
        monitored = self.monitored_rewards(scoring)
        n_states = sum(len(r["step_idx"]) for r in results)
        grad_norm = None
        if n_states >= 1:
            grad_norm = self.learners.apply(n_states)[0]["grad_norm"]
            timer.lap("learn")
            self.sync_weights()
            timer.lap("sync")
        self.step_done = step
        names = sorted(set(cfg.route.values()))
        group_task = [tasks[groups[r["group"]][0][0]] for r in results]
        terms = {k: np.concatenate([r.get(k, np.zeros(0, np.float32)) for r in results])
                 for k in ("task_loss", "mar_loss") if any(k in r for r in results)}
        nonfinite = sum(r["nonfinite"] for r in results)
        m = self._metrics(
            step, version, terms if grad_norm is not None else None, grad_norm,
            np.concatenate([r["step_idx"] for r in results]),
            np.concatenate([np.full(len(r["step_idx"]), t) for r, t in zip(results, group_task)]),
            np.concatenate([np.full(len(r["step_idx"]), names.index(cfg.route[t])) for r, t in zip(results, group_task)]),
            nonfinite, (n_states + nonfinite) * (1 + ("mar_loss" in terms)),
            sum(r["state_bytes"] for r in results), self.end_step(timer))
        return {**m, **monitored}

    def stream_micro_groups(self, records, step: int) -> tuple[list[list[tuple[int, int]]], list, list]:
        """Start every worker on its micro-groups with the current weights; as each group's states appear,
        send their reference to the routed teacher, the MAR teacher and the learner ranks (with the targets'
        references). Returns the groups ((prompt id, sample index) pairs), the learners' result references
        and the monitor's scoring jobs. Ends when the last group has been sampled; labelling and learning
        may still run."""
        cfg = self.cfg
        tasks = [r.task for r in records]
        mar = cfg.mar.teacher if cfg.mar.teacher and cfg.mar.weight > 0 else None
        decode = self.monitor is not None
        groups: list[list[tuple[int, int]]] = []
        streams = {}  # generator -> the (kind, group) of the items it has still to yield, in order
        for w, plan in zip(self.workers, micro_groups(tasks, len(self.workers), cfg.rollout.micro_group_samples(),
                                                      cfg.data.group_size)):
            if plan:
                gen = w.rollout_stream.options(num_returns="streaming").remote(
                    step, self.step_done, self.lora_ref, [self._group_payload(records, g) for g in plan], decode)
                streams[gen] = deque((kind, len(groups) + k) for k in range(len(plan))
                                     for kind in (("states", "images") if decode else ("states",)))
                groups += plan
        accumulated, scoring = [], []
        while streams:
            (gen,), _ = ray.wait(list(streams), num_returns=1)
            try:
                ref = next(gen)
            except StopIteration:
                del streams[gen]
                continue
            kind, g = streams[gen].popleft()
            if kind == "images":
                recs = [records[p] for p, _ in groups[g]]
                scoring.append((recs, self.monitor.submit(ref, [r.prompt for r in recs], [r.metadata for r in recs],
                                                          [r.task for r in recs])))
            else:
                v_task = self.pools.label(cfg.route[tasks[groups[g][0][0]]], ref)
                v_mar = self.pools.label(mar, ref) if mar else None
                accumulated += self.learners.accumulate(g, ref, v_task, v_mar)
        return groups, accumulated, scoring

    @staticmethod
    def _group_payload(records, group: list[tuple[int, int]]) -> tuple:
        """(prompts, prompt ids, samples) of a micro-group, as `RolloutWorker.rollout_stream` takes it."""
        ids = list(dict.fromkeys(p for p, _ in group))
        local = {p: i for i, p in enumerate(ids)}
        return [records[p].prompt for p in ids], ids, [(local[p], k) for p, k in group]

    def phased_step(self) -> dict:
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
        state_bytes = payload_bytes(batch)
        results = self.learn(batch, timer)
        self.step_done = step
        queries = n_all * (1 + (batch["v_mar"] is not None))
        terms = None if results is None else {
            k: np.concatenate([r[k] for r in results]) for k in ("task_loss", "mar_loss") if k in results[0]}
        m = self._metrics(step, version, terms, results[0]["grad_norm"] if results else None, batch["step_idx"],
                          tasks, teachers, n_all - int(finite.sum()), queries, state_bytes, self.end_step(timer))
        return {**m, **monitored}

    def monitored_rewards(self, scoring: list) -> dict:
        """Mean monitor reward per task on this step's rollouts (the same statistic GRPO logs)."""
        if not scoring:
            return {}
        tasks = np.asarray([r.task for recs, _ in scoring for r in recs])
        scores = RewardPools.merge([RewardPools.collect(jobs, len(recs)) for recs, jobs in scoring],
                                   [len(recs) for recs, _ in scoring])
        return {"reward_per_task": RewardPools.mean_per_task(self.monitor.combine(scores, tasks), tasks)}

    def _metrics(self, step, version, terms, grad_norm, step_idx, tasks, teachers, nonfinite, queries,
                 state_bytes, t) -> dict:
        """The step's metrics line from per-state arrays (losses, sigma index, task, teacher index)."""
        cfg = self.cfg
        m = {"step": step, "policy_version": version, "states": len(step_idx),
             "nonfinite_targets": nonfinite, "time": t, "states_per_s": len(step_idx) / t["total"],
             "teacher_queries_per_s": queries / max(t["label"] + t["rollout"], 1e-9),
             "driver_bytes": self.bytes_in, "state_bytes": state_bytes}
        if terms is None:
            m.update(loss=float("nan"), skipped=True)
            return m
        task_loss = terms["task_loss"]
        lam = cfg.mar.weight if "mar_loss" in terms else 0.0
        mar_loss = terms["mar_loss"] if lam else np.zeros_like(task_loss)
        names = sorted(set(cfg.route.values()))
        j = step_idx
        m.update(
            loss=float(task_loss.mean() + lam * mar_loss.mean()), task_loss=float(task_loss.mean()),
            mar_loss=float(mar_loss.mean()) if lam else None, grad_norm=grad_norm,
            loss_per_teacher={n: float(task_loss[teachers == i].mean()) for i, n in enumerate(names)
                              if (teachers == i).any()},
            loss_per_task={k: float(task_loss[tasks == k].mean()) for k in sorted(set(tasks))},
            loss_per_step=[float(task_loss[j == s].mean()) for s in range(int(j.max()) + 1)])
        return m


def micro_groups(tasks: list[str], workers: int, size: int, group_size: int) -> list[list[list[tuple[int, int]]]]:
    """Each worker's samples, (prompt, sample index) pairs, as micro-groups of at most `size` samples of one
    task (one group, one routed teacher). The step's prompts are sorted by task before they are shared out,
    so that groups stay full; the states do not depend on it (a sample's noise depends on its prompt's index
    in the step and its own index only)."""
    order = sorted(range(len(tasks)), key=lambda i: tasks[i])
    plans = []
    for share in np.array_split(np.asarray(order, dtype=int), workers):
        by_task: dict[str, list[tuple[int, int]]] = {}
        for i in share.tolist():
            by_task.setdefault(tasks[i], []).extend((i, k) for k in range(group_size))
        plans.append([samples[a:a + size] for samples in by_task.values() for a in range(0, len(samples), size)])
    return plans
