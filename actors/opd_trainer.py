"""The OPD step loop (DESIGN.md §2): rollout -> label by routed teacher + MAR -> DDP learn -> weight sync."""
import json
import time
from pathlib import Path

import numpy as np
import ray
from peft import LoraConfig
from tqdm import tqdm

from flowopd.checkpoint import CheckpointManager
from flowopd.data import MixtureSampler
from flowopd.learner import PER_STATE
from flowopd.models import lora_config

from .learner import LearnerGroup
from .rollout import RolloutWorker
from .teacher import TeacherPools


class OPDTrainer:
    def __init__(self, cfg, sources: list[list]):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sampler = MixtureSampler(sources, [s.weight for s in cfg.data.sources], cfg.seed)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.train.keep_checkpoints)
        self.metrics_path = self.out / "metrics.jsonl"
        s = cfg.student
        self.lora_cfg = (LoraConfig.from_pretrained(s.init_adapter) if s.init_adapter
                         else lora_config(s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_init))
        rc = cfg.rollout
        self.pools = TeacherPools(cfg)
        self.workers = [ray.remote(RolloutWorker).options(
            num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, resources=rc.resources or None).remote(cfg)
            for _ in range(rc.workers)]
        self.learners = LearnerGroup(cfg)
        self.pools.wait_ready()
        ray.get([w.ping.remote() for w in self.workers])
        self.step_done = 0
        self.lora = self.learners.lora_state()
        self._step_end = None  # so time spent between steps (logging, checkpoints) counts as "other"

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the step it ended."""
        path = self.ckpt.latest()
        if path is None:
            return 0
        state = CheckpointManager.load(path)
        self.learners.load_state(state["lora"], state["optimizer"])
        self.sampler.load_state(state["trainer_state"]["sampler"])
        self.step_done = state["trainer_state"]["step"]
        self.lora = state["lora"]
        self._truncate_metrics(self.step_done)
        return self.step_done

    def _truncate_metrics(self, step: int) -> None:
        if self.metrics_path.exists():
            keep = [ln for ln in self.metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def save(self) -> Path:
        return self.ckpt.save(self.step_done, self.lora, self.lora_cfg, self.learners.optimizer_state(),
                              {"sampler": self.sampler.state(), "seed": self.cfg.seed,
                               "config": self.cfg.model_dump(mode="json")})

    def shutdown(self) -> None:
        """Release every actor and the learners' placement group (the cluster keeps running)."""
        for actor in self.workers + self.learners.ranks + [r for rs in self.pools.replicas.values() for r in rs]:
            ray.kill(actor)
        ray.util.remove_placement_group(self.learners.pg)

    def run(self, progress: bool = True) -> list[dict]:
        cfg = self.cfg
        history = []
        self._truncate_metrics(self.step_done)  # lines past the last checkpoint belong to a lost run
        bar = tqdm(total=cfg.train.steps, initial=self.step_done, desc="opd", disable=not progress)
        while self.step_done < cfg.train.steps:
            m = self.train_step()
            history.append(m)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            if self.step_done % cfg.train.checkpoint_every == 0 or self.step_done == cfg.train.steps:
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4g}", states_s=f"{m['states_per_s']:.1f}")
        bar.close()
        return history

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
        t0 = time.perf_counter()
        records = self.sampler.draw(cfg.data.prompts_per_step)
        lora_ref = ray.put(self.lora)
        version = self.step_done
        shards = np.array_split(np.arange(len(records)), len(self.workers))
        pending = {w.rollout.remote(step, version, lora_ref, [records[i].prompt for i in ids], ids.tolist()): ids
                   for w, ids in zip(self.workers, shards) if len(ids)}
        labelled = []
        t_rollout = None
        while pending:  # label each worker's states as soon as they arrive
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            ids = pending.pop(ref)
            ro = ray.get(ref)
            if ro["version"] != version:
                raise RuntimeError(f"rollout used weights v{ro['version']}, expected v{version}")
            if not pending:
                t_rollout = time.perf_counter()
            labelled.append((ids, ro, *self.label(ro, [records[i].task for i in ids])))
        t_label = time.perf_counter()
        batch, tasks, teachers = self._assemble(labelled, records)
        finite = np.isfinite(batch["v_task"]).reshape(len(batch["x"]), -1).all(1)
        if batch["v_mar"] is not None:
            finite &= np.isfinite(batch["v_mar"]).reshape(len(batch["x"]), -1).all(1)
        nonfinite = int((~finite).sum())
        if nonfinite:
            keep = np.nonzero(finite)[0]
            for k in PER_STATE:
                if batch[k] is not None:
                    batch[k] = batch[k][keep]
            tasks, teachers = tasks[keep], teachers[keep]
        n = len(batch["x"])
        results = self.learners.train_step(batch) if n >= len(self.learners.ranks) else None
        t_learn = time.perf_counter()
        if results is not None:
            self.lora = self.learners.lora_state()
        t_sync = time.perf_counter()
        self.step_done = step
        t_start = self._step_end or t0
        self._step_end = t_sync
        queries = sum(len(ro["x"]) * (1 + (lab[1] is not None)) for _, ro, *lab in labelled)
        return self._metrics(step, version, results, batch, tasks, teachers, nonfinite, queries,
                             {"rollout": t_rollout - t0, "label": t_label - t_rollout, "learn": t_learn - t_label,
                              "sync": t_sync - t_learn, "total": t_sync - t_start})

    def _assemble(self, labelled, records):
        """Concatenate the workers' states, re-indexing prompts into one embedding table."""
        parts, offset = [], 0
        for ids, ro, v_task, v_mar, teacher_idx, _ in labelled:
            parts.append(dict(ro, prompt_idx=ro["prompt_idx"] + offset, v_task=v_task, v_mar=v_mar,
                              teacher=teacher_idx, task=np.asarray([records[ids[p]].task for p in ro["prompt_idx"]])))
            offset += len(ids)
        def cat(key):
            return None if parts[0][key] is None else np.concatenate([p[key] for p in parts])
        batch = {k: cat(k) for k in (*PER_STATE, "embeds", "pooled")}
        batch["neg_embeds"], batch["neg_pooled"] = parts[0]["neg_embeds"], parts[0]["neg_pooled"]
        return batch, cat("task"), cat("teacher")

    def _metrics(self, step, version, results, batch, tasks, teachers, nonfinite, queries, t) -> dict:
        cfg = self.cfg
        t["other"] = t["total"] - t["rollout"] - t["label"] - t["learn"] - t["sync"]
        m = {"step": step, "policy_version": version, "states": len(batch["x"]),
             "nonfinite_targets": nonfinite, "time": {k: round(v, 4) for k, v in t.items()},
             "states_per_s": len(batch["x"]) / t["total"],
             "teacher_queries_per_s": queries / max(t["label"] + t["rollout"], 1e-9)}
        if results is None:
            m.update(loss=float("nan"), skipped=True)
            return m
        task_loss = np.concatenate([r["task_loss"] for r in results])
        lam = cfg.mar.weight if results[0]["mar_loss"] is not None else 0.0
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
