"""Reward actor pools: each configured reward runs on its own replicas with its own resources; batches are
spread over replicas, dead replicas are restarted and their batches retried, and bad outputs are errors
that name the reward."""
import os

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from rewards.base import RewardError, check_outputs
from rewards.registry import make_reward


class RewardActorDied(RewardError):
    """A reward replica died beyond its restarts: a crash, not a scoring error (the RayActorError is the
    `__cause__`), so a training job may restart its actors and carry on."""


class RewardActor:
    def __init__(self, label: str, name: str, kwargs: dict):
        self.label = label
        self.reward = make_reward(name, kwargs)
        self.fn = getattr(self.reward, "score", None) or self.reward

    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict],
              select: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Scores of images[select] (all by default): `select` lets a caller pass a reference to a whole
        batch of images (resolved here) instead of shipping each slice through itself."""
        if select is not None:
            images = images[select]
        return check_outputs(self.label, self.fn(images, prompts, metadata), len(images))

    def ping(self) -> int:
        return os.getpid()


class RewardPools:
    def __init__(self, specs):
        self.specs = specs
        cls = ray.remote(RewardActor)
        self.replicas = {
            s.key: [cls.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, resources=s.resources or None,
                                max_restarts=s.max_restarts, max_task_retries=s.max_restarts)
                    .remote(s.key, s.name, s.kwargs) for _ in range(s.replicas)]
            for s in specs}
        self._next = dict.fromkeys(self.replicas, 0)

    def actors(self) -> list:
        return [a for reps in self.replicas.values() for a in reps]

    def submit(self, images, prompts: list[str], metadata: list[dict], tasks: list[str]) -> list:
        """Queue every applicable reward on the images (an array, or a reference to one) in batches; returns
        jobs for `collect`."""
        by_ref = isinstance(images, ray.ObjectRef)
        jobs = []
        for spec in self.specs:
            idx = np.asarray([i for i, t in enumerate(tasks) if spec.applies_to(t)], dtype=int)
            reps = self.replicas[spec.key]
            for lo in range(0, len(idx), spec.batch_size):
                sel = idx[lo:lo + spec.batch_size]
                rep = reps[self._next[spec.key] % len(reps)]
                self._next[spec.key] += 1
                args = (images, [prompts[i] for i in sel], [metadata[i] for i in sel], sel) if by_ref else (
                    images[sel], [prompts[i] for i in sel], [metadata[i] for i in sel])
                jobs.append((spec.key, sel, rep.score.remote(*args)))
        return jobs

    def combine(self, scores: dict, tasks: np.ndarray) -> np.ndarray:
        """The training reward: sum over rewards of weight x primary output, over the rewards that apply to
        each image's task; NaN where an applicable reward gave NaN (those samples are excluded)."""
        total = np.zeros(len(tasks))
        for spec in self.specs:
            applies = np.asarray([spec.applies_to(t) for t in tasks])
            if not applies.any():
                continue
            primary = next(iter(scores[spec.key].values()))
            total[applies] += spec.weight * primary[applies]
        return total

    @staticmethod
    def mean_per_task(reward: np.ndarray, tasks: np.ndarray) -> dict[str, float]:
        """Mean reward of each task's images (tasks whose rewards are all NaN are left out)."""
        return {k: float(np.nanmean(reward[tasks == k])) for k in sorted(set(tasks))
                if np.isfinite(reward[tasks == k]).any()}

    @staticmethod
    def merge(parts: list[dict], sizes: list[int]) -> dict[str, dict[str, np.ndarray]]:
        """Concatenate `collect` results of consecutive image batches; a reward absent from a batch (none of
        its images had a task it applies to) is NaN there. Output order (primary first) is kept."""
        names: dict[str, dict[str, None]] = {}
        for part in parts:
            for key, outs in part.items():
                names.setdefault(key, {}).update(dict.fromkeys(outs))
        return {key: {o: np.concatenate([part.get(key, {}).get(o, np.full(n, np.nan)) for part, n in zip(parts, sizes)])
                      for o in outs} for key, outs in names.items()}

    @staticmethod
    def collect(jobs: list, n: int) -> dict[str, dict[str, np.ndarray]]:
        """{reward: {output: per-image array}}, NaN where a reward does not apply to an image's task."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for key, sel, ref in jobs:
            try:
                result = ray.get(ref)
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, Exception) else e
                if isinstance(cause, RewardError):
                    raise cause from None
                raise RewardError(f"reward {key!r} failed: {type(cause).__name__}: {cause}") from None
            except RayActorError as e:
                raise RewardActorDied(f"reward {key!r}: its actor died and could not be restarted: {e}") from e
            for name, values in result.items():
                out.setdefault(key, {}).setdefault(name, np.full(n, np.nan))[sel] = values
        return out
