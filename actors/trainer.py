"""What every training job's driver shares: actors, the on-policy rollout stream, checkpoints, metrics, and
recovery from actor deaths."""
import json
import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import ray
from peft import LoraConfig
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from flowopd.checkpoint import CheckpointManager, step_dir_name
from flowopd.data import MixtureSampler
from flowopd.learner import PER_STATE, payload_bytes
from flowopd.models import lora_config
from flowopd.objectives import Objective
from flowopd.tracking import make_tracker

from .learner import LearnerGroup
from .reward import RewardActorDied
from .rollout import RolloutWorker

log = logging.getLogger("train")


def actor_death(err: Exception) -> RayActorError | None:
    """The actor crash behind `err`, or None. An actor whose constructor raised is a bug or a bad config, which
    a restart would repeat, so it is not a crash."""
    died = err.__cause__ if isinstance(err, RewardActorDied) else err
    return died if isinstance(died, RayActorError) and not died.actor_init_failed else None


class Trainer(ABC):
    """Subclasses start their own services (teachers, rewards) and implement `train_step`.

    When an actor dies during `run` (beyond Ray's own restarts), what it takes down is restarted and the job
    continues from its newest checkpoint, up to `train.max_failures` times; see `_recover`.
    """

    name = "train"
    work_name = "label"
    extra_phases: tuple[str, ...] = ()  # further phases the step timer reports
    uses_rollouts = True

    def __init__(self, cfg, sources: list[list]):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sources = sources
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.train.keep_checkpoints)
        self.metrics_path = self.out / "metrics.jsonl"
        self.events_path = self.out / "events.jsonl"
        s = cfg.student
        self.lora_cfg = (LoraConfig.from_pretrained(s.init_adapter) if s.init_adapter
                         else lora_config(s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_init))
        self._start()

    def _start(self) -> None:
        """Start every actor and set the state of step 0: at start-up, and again after an actor died before the
        first checkpoint (the newest checkpoint, if any, is loaded on top). Fresh learners from the same seed
        hold the same initial weights, so a job restarted before its first checkpoint repeats step 1 exactly."""
        cfg = self.cfg
        self.sampler = MixtureSampler(self.sources, [s.weight for s in cfg.data.sources], cfg.seed, cfg.data.mixing)
        self._start_services()
        self.workers = [self._new_worker() for _ in range(cfg.rollout.workers if self.uses_rollouts else 0)]
        self.learners = LearnerGroup(cfg, self.make_objective(cfg))
        self._ready(self.services + self.workers)
        self.step_done = 0
        self.bytes_in = 0
        self.sync_weights()
        self._step_end = None

    def _start_services(self) -> None:
        self._services = self.start_services()
        self.services = [a for actors in self._services.values() for a in actors]

    def _new_worker(self):
        rc = self.cfg.rollout
        return ray.remote(RolloutWorker).options(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus,
                                                 resources=rc.resources or None).remote(self.cfg)

    def _ready(self, actors: list) -> None:
        """Name every actor's role (what recovery events report) and wait until `actors` answer."""
        groups = {**self._services, "rollout worker": self.workers, "learner rank": self.learners.ranks}
        self.roles = {a._actor_id.hex(): role for role, members in groups.items() for a in members}
        ray.get([a.ping.remote() for a in actors])

    def _restart(self, actor_id: str) -> str:
        """Replace what the dead actor takes down with it, leaving every other actor running: the worker
        itself, the whole learner group (its collective group is broken) or the job's services. Returns
        what was restarted."""
        role = self.roles[actor_id]
        if role == "rollout worker":
            i = next(i for i, w in enumerate(self.workers) if w._actor_id.hex() == actor_id)
            ray.kill(self.workers[i])
            self.workers[i] = self._new_worker()
            self._ready([self.workers[i]])
            return "that rollout worker"
        if role == "learner rank":
            self.learners.shutdown()
            self.learners = LearnerGroup(self.cfg, self.make_objective(self.cfg))
            self._ready([])
            return "the learner group"
        self.stop_services()
        self._start_services()
        self._ready(self.services)
        return "the " + " and ".join(f"{role} actors" for role, members in self._services.items() if members)

    @property
    def lora(self) -> dict:
        """The student's LoRA weights, fetched by the driver only when it needs them (checkpoints, export,
        an EMA); every step hands `lora_ref` from the learners to the rollout workers unseen."""
        if self._lora is None:
            self._lora = self.fetch([self.lora_ref])[0]
        return self._lora

    @lora.setter
    def lora(self, value: dict) -> None:
        self._lora, self.lora_ref = value, ray.put(value)

    def sync_weights(self) -> None:
        """The weight sync: a reference to the learners' new weights, waited for where it is made."""
        self._lora, self.lora_ref = None, self.learners.lora_state_ref()
        ray.wait([self.lora_ref], fetch_local=False)

    def fetch(self, refs: list) -> list:
        """ray.get, counting the bytes of arrays the driver receives (`driver_bytes` in the metrics)."""
        values = ray.get(refs)
        self.bytes_in += payload_bytes(values)
        return values

    @staticmethod
    @abstractmethod
    def make_objective(cfg) -> Objective:
        """What this job's learners optimise, built from its config."""

    def start_services(self) -> dict[str, list]:
        """Create the job's extra actors (each with a `ping` method) and reset the state that goes with them;
        returns them by role (e.g. "teacher replica"), the names recovery events give."""
        return {}

    def final_adapter(self) -> dict:
        """The LoRA weights a finished job exports."""
        return self.lora

    def extra_adapters(self) -> dict:
        """Further LoRA states to checkpoint beside the student (e.g. an EMA)."""
        return {}

    def load_extra_adapters(self, adapters: dict) -> None:
        pass

    def extra_optimizers(self) -> dict:
        """Optimizer states of further trained models to checkpoint (e.g. a fake score's)."""
        return {}

    def load_extra_optimizers(self, optimizers: dict) -> None:
        """Called last when a checkpoint is loaded, after `load_extra_adapters` and `load_extra_state`."""

    def stop_services(self) -> None:
        """Release the actors `start_services` created."""
        for actor in self.services:
            ray.kill(actor)

    def extra_state(self) -> dict:
        """Further JSON-safe trainer state to checkpoint (e.g. an optimizer-step counter)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the step it ended."""
        path = self.ckpt.latest()
        if path is None:
            return 0
        state = CheckpointManager.load(path)
        self.learners.load_state(state["lora"], state["optimizer"])
        self.sampler.load_state(state["trainer_state"]["sampler"])
        self.load_extra_adapters(state["extra"])
        self.load_extra_state(state["trainer_state"])
        self.load_extra_optimizers(state["extra_optimizers"])
        self.step_done = state["trainer_state"]["step"]
        self.lora = state["lora"]
        self._truncate_metrics(self.step_done)
        return self.step_done

    def _truncate_metrics(self, step: int) -> None:
        truncate_jsonl(self.metrics_path, step)

    def save(self) -> Path:
        return self.ckpt.save(self.step_done, self.lora, self.lora_cfg, self.learners.optimizer_state(),
                              {"sampler": self.sampler.state(), "seed": self.cfg.seed,
                               "config": self.cfg.model_dump(mode="json"), **self.extra_state()},
                              self.extra_adapters(), self.extra_optimizers())

    def shutdown(self) -> None:
        """Release every actor and the learners' placement group (the cluster keeps running)."""
        for actor in self.workers:
            ray.kill(actor)
        self.stop_services()
        self.learners.shutdown()

    def run(self, progress: bool = True, deadline: float | None = None) -> list[dict]:
        """Train to the last step, or until `deadline` (a time.time() value) has passed: then the current step
        is checkpointed (a resume continues exactly from it) and `stopped` is set."""
        cfg = self.cfg
        history = []
        self.stopped = False
        self._truncate_metrics(self.step_done)  # lines past the last checkpoint belong to a lost run
        bar = tqdm(total=cfg.train.steps, initial=self.step_done, desc=self.name, disable=not progress)
        tracker = make_tracker(cfg.logger, cfg.output_dir, self.step_done, cfg.model_dump(mode="json"))
        failures = 0
        try:
            while self.step_done < cfg.train.steps:
                if deadline is not None and time.time() >= deadline:
                    latest = self.ckpt.latest()
                    if self.step_done and (latest is None or latest.name != step_dir_name(self.step_done)):
                        self.save()
                    self.stopped = True
                    break
                try:
                    m = self.train_step()
                    history.append(m)
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(m) + "\n")
                    if tracker is not None:
                        tracker.log(m, m["step"])
                    if self.step_done % cfg.train.checkpoint_every == 0 or self.step_done == cfg.train.steps:
                        self.save()
                except (RayActorError, RewardActorDied) as err:
                    failures = self._recover(err, failures)
                    history = [h for h in history if h["step"] <= self.step_done]
                    if tracker is not None:  # purges (TensorBoard) or continues (wandb, MLflow) past the checkpoint
                        tracker.close()
                        tracker = make_tracker(cfg.logger, cfg.output_dir, self.step_done, cfg.model_dump(mode="json"))
                    bar.n = self.step_done
                    bar.refresh()
                    continue
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4g}", states_s=f"{m['states_per_s']:.1f}")
        finally:
            bar.close()
            if tracker is not None:
                tracker.close()
        return history

    def _recover(self, err: Exception, failures: int) -> int:
        """After an actor died: restart what it took down (see `_restart`; every actor when there is no
        checkpoint yet, as a new job starts) and load the newest checkpoint, so the job goes on as an
        uninterrupted one would. Each death, including one while restarting, counts towards
        `train.max_failures`; past it, or for an error that is no crash (see `actor_death`), `err` is raised.
        Returns the failures so far."""
        steps_done = self.step_done
        while True:
            died = actor_death(err)
            if died is None:
                raise err
            failures += 1
            # a task that failed because an actor it depended on died carries that death as its cause
            shown = err.cause if isinstance(err, RayTaskError) and isinstance(err.cause, RayActorError) else err
            first_line = next(iter(str(shown).strip().splitlines()), "")
            event = {"steps_done": steps_done, "failures": failures,
                     "role": self.roles.get(died.actor_id, "unknown actor"),
                     "error": f"{type(shown).__name__}: {first_line}"}
            if failures > self.cfg.train.max_failures:
                self._log_event({"event": "failed", **event})
                log.error("%s died after step %d (%s); failure %d is more than train.max_failures=%d, stopping",
                          event["role"], event["steps_done"], event["error"], failures, self.cfg.train.max_failures)
                raise err
            try:
                if died.actor_id in self.roles and self.ckpt.latest() is not None:
                    restarted = self._restart(died.actor_id)
                else:
                    self.shutdown()
                    self._start()
                    restarted = "every actor"
                self.resume()
            except (RayActorError, RewardActorDied) as again:
                err = again
                continue
            self._log_event({"event": "recovered", "step": self.step_done, "restarted": restarted, **event})
            log.warning("%s died after step %d (%s); restarted %s and resumed from step %d (failure %d of at "
                        "most %d)", event["role"], event["steps_done"], event["error"], restarted, self.step_done,
                        failures, self.cfg.train.max_failures)
            return failures

    def _log_event(self, event: dict) -> None:
        """events.jsonl: the job's failures and recoveries, kept apart from metrics.jsonl (one line per step,
        truncated on resume), so that every metrics reader stays as it is and no event is lost to a resume."""
        with open(self.events_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **event}) + "\n")

    @abstractmethod
    def train_step(self) -> dict:
        """One on-policy step; returns its metrics line."""

    def start_step(self) -> "StepTimer":
        """A timer for the step beginning now; time since the previous step ended counts as its `other`.
        The count of bytes received by the driver starts again too."""
        self.bytes_in = 0
        return StepTimer(self.work_name, self._step_end, self.extra_phases)

    def end_step(self, timer: "StepTimer") -> dict:
        """The finished step's phase times (seconds); the next step's `other` starts here."""
        t = timer.summary()
        self._step_end = timer.end
        return t

    def rollouts(self, records, step: int, timer: "StepTimer", decode: bool = False, method: str = "rollout",
                 **kwargs):
        """Start every worker on its share of the prompts with the current weights; yield (prompt ids,
        rollout) as each finishes, so labelling or scoring overlaps the rollouts still running. `method` names
        the workers' rollout method (`kwargs` go to it)."""
        version = self.step_done
        shards = np.array_split(np.arange(len(records)), len(self.workers))
        pending = {getattr(w, method).remote(step, version, self.lora_ref, [records[i].prompt for i in ids],
                                             ids.tolist(), decode, **kwargs): ids
                   for w, ids in zip(self.workers, shards) if len(ids)}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            ids = pending.pop(ref)
            (ro,) = self.fetch([ref])
            if ro["version"] != version:
                raise RuntimeError(f"rollout used weights v{ro['version']}, expected v{version}")
            if not pending:
                timer.lap("rollout")
            yield ids, ro

    def learn(self, batch: dict, timer: "StepTimer") -> list[dict] | None:
        """One synchronised learner step, then the weight sync; None when too few states are left."""
        t = time.perf_counter()
        results = None
        if len(batch["x"]) >= len(self.learners.ranks):
            results = self.learners.train_step(batch)
            self.bytes_in += payload_bytes(results)
        t_learn = time.perf_counter()
        if results is not None:
            self.sync_weights()
        timer.add("learn", t_learn - t)
        timer.add("sync", time.perf_counter() - t_learn)
        return results


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the lines of a per-step log past `step` (written by a run that did not reach its next checkpoint)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


class StepTimer:
    """Wall-clock phases of one training step: rollout, the job's work on the rollouts (labelling or
    scoring), learn and sync (summed over the step's optimizer steps), total since the previous step ended,
    and other (the rest: drawing prompts, advantages, logging, checkpoints)."""

    def __init__(self, work_name: str, since: float | None = None, extra: tuple[str, ...] = ()):
        self.start = self.last = time.perf_counter()
        self.since = since or self.start
        self.end = None
        self.phases = {"rollout": 0.0, work_name: 0.0, **dict.fromkeys(extra, 0.0), "learn": 0.0, "sync": 0.0}

    def lap(self, phase: str) -> None:
        """The time since the previous lap (or the step's start) goes to `phase`."""
        now = time.perf_counter()
        self.add(phase, now - self.last)
        self.last = now

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] += seconds

    def summary(self) -> dict:
        self.end = time.perf_counter()
        t = {**self.phases, "total": self.end - self.since}
        t["other"] = t["total"] - sum(self.phases.values())
        return {k: round(v, 4) for k, v in t.items()}


def concat_rollouts(parts: list[dict], extra: tuple[str, ...] = ()) -> dict:
    """Concatenate rollouts from several workers, re-indexing prompts into one embedding table.
    Each part carries `n_prompts`; `extra` names further per-state arrays to concatenate."""
    offset, fixed = 0, []
    for p in parts:
        fixed.append(dict(p, prompt_idx=p["prompt_idx"] + offset))
        offset += p["n_prompts"]

    def cat(key):
        return None if fixed[0].get(key) is None else np.concatenate([p[key] for p in fixed])
    batch = {k: cat(k) for k in (*PER_STATE, *extra, "embeds", "pooled")}
    batch["neg_embeds"], batch["neg_pooled"] = fixed[0]["neg_embeds"], fixed[0]["neg_pooled"]
    return batch
