"""Frozen teacher velocity servers and the pools that batch, spread and retry queries over replicas."""
import itertools
import os

import numpy as np
import ray
import torch

from flowopd.models import ModelBank, as_tensor, quiet_libraries, resolve_device, resolve_dtype, velocity


class TeacherServer:
    """Hosts several frozen teachers on one base (see ModelBank) and answers batched velocity queries."""

    def __init__(self, base: str, teachers: dict[str, dict], dtype: str = "auto", batch_size: int = 32,
                 device: str = "auto", compile: bool = False):
        quiet_libraries()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.bank = ModelBank(base, teachers, self.dtype, self.device, compile=compile)

    @torch.no_grad()
    def velocity(self, teacher: str, x: np.ndarray, sigma: np.ndarray, prompt_idx: np.ndarray,
                 text: dict, guidance: float) -> np.ndarray:
        """CFG velocities of `teacher` for a batch of states; text holds per-prompt embeddings."""
        dev = self.device
        embeds, pooled = as_tensor(text["embeds"]), as_tensor(text["pooled"])
        neg_e, neg_p = as_tensor(text["neg_embeds"], dev), as_tensor(text["neg_pooled"], dev)
        autocast = self.dtype if self.dtype != torch.float32 else None
        out = []
        with self.bank.use(teacher) as model:
            for i in range(0, len(x), self.batch_size):
                sl = slice(i, i + self.batch_size)
                pi = as_tensor(prompt_idx[sl]).long()
                v = velocity(model, as_tensor(x[sl], dev), as_tensor(sigma[sl], dev),
                             embeds[pi].to(dev), pooled[pi].to(dev), neg_e, neg_p, guidance, autocast)
                out.append(v.float().cpu().numpy())
        return np.concatenate(out)

    def label(self, teacher: str, ro: dict, guidance: float) -> np.ndarray:
        """`velocity` at every state of one rollout micro-group (passed by reference: it comes straight from
        the rollout worker's output in the object store, not through the driver)."""
        return self.velocity(teacher, ro["x"], ro["sigma"], ro["prompt_idx"], ro, guidance)

    def ping(self) -> int:
        return os.getpid()


class TeacherPools:
    """One pool of replicas per configured pool; each replica hosts every teacher assigned to its pool.

    Replicas are restarted by Ray when they die and in-flight queries are retried (max_task_retries).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.pool_of = {name: cfg.teachers[name].pool for name in cfg.used_teachers()}
        self.replicas: dict[str, list] = {}
        self._next: dict[str, int] = {}
        remote_cls = ray.remote(TeacherServer)
        for pool_name in sorted(set(self.pool_of.values())):
            pc = cfg.pools[pool_name]
            hosted = {n: cfg.teachers[n].model_dump() for n, p in self.pool_of.items() if p == pool_name}
            opts = {"num_gpus": pc.num_gpus, "num_cpus": pc.num_cpus, "resources": pc.resources or None,
                        "max_restarts": pc.max_restarts, "max_task_retries": pc.max_restarts}
            self.replicas[pool_name] = [
                remote_cls.options(**opts).remote(cfg.model.base, hosted, cfg.model.dtype, pc.batch_size,
                                                  compile=cfg.model.compile)
                for _ in range(pc.replicas)]
            self._next[pool_name] = 0

    def query(self, teacher: str, x: np.ndarray, sigma: np.ndarray, prompt_idx: np.ndarray, text_ref) -> list:
        """Split a teacher's states into one chunk per replica (round robin); returns (slice, ref) pairs."""
        pool = self.pool_of[teacher]
        reps = self.replicas[pool]
        guidance = self.cfg.teacher_guidance(teacher)
        bounds = np.linspace(0, len(x), min(len(reps), len(x)) + 1).astype(int)
        out = []
        for lo, hi in itertools.pairwise(bounds):
            rep = reps[self._next[pool] % len(reps)]
            self._next[pool] += 1
            out.append((slice(lo, hi), rep.velocity.remote(teacher, x[lo:hi], sigma[lo:hi], prompt_idx[lo:hi],
                                                           text_ref, guidance)))
        return out

    def label(self, teacher: str, rollout_ref) -> "ray.ObjectRef":
        """The velocity targets of `teacher` for every state of one rollout micro-group, on the pool's next
        replica (round robin); returns the reference, so the targets can go to a learner unseen."""
        pool = self.pool_of[teacher]
        reps = self.replicas[pool]
        rep = reps[self._next[pool] % len(reps)]
        self._next[pool] += 1
        return rep.label.remote(teacher, rollout_ref, self.cfg.teacher_guidance(teacher))
