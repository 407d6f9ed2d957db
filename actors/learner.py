"""The learner group: N ranks of Learner joined by torch.distributed DDP (NCCL on GPU, gloo on CPU)."""
import os
import socket
import time

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flowopd.learner import PER_STATE, Learner, payload_bytes, select_states
from flowopd.models import quiet_libraries


class LearnerRank:
    def __init__(self, cfg, objective, rank: int, world: int):
        quiet_libraries()
        self.cfg, self.objective, self.rank, self.world = cfg, objective, rank, world
        self.learner = None

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> int:
        return self.rank

    def master_address(self) -> tuple[str, int]:
        addr = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return addr, s.getsockname()[1]

    def setup(self, addr: str, port: int) -> None:
        if self.world > 1:
            backend = self.cfg.learner.backend
            if backend == "auto":
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if addr.startswith("127.") and backend == "gloo":
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                    world_size=self.world)
        self.learner = Learner(self.cfg, self.objective, self.world)

    def train_step(self, batch: dict, total_states: int) -> dict:
        return self.learner.train_step(batch, total_states)

    def accumulate(self, group: int, rollout: dict, v_task: np.ndarray, v_mar: np.ndarray | None) -> dict:
        """Gradient of this rank's share of one micro-group (an even split of its states over the ranks, as
        the phased step splits a batch). The rollout and the teacher targets arrive as references, resolved
        here, never through the driver (on one node every rank maps the same object); states with a
        non-finite target are left out. Returns the per-state terms of the kept states, all small."""
        n = len(v_task)
        lo, hi = np.linspace(0, n, self.world + 1).astype(int)[self.rank:self.rank + 2]
        finite = np.isfinite(v_task[lo:hi]).all(axis=tuple(range(1, v_task.ndim)))
        if v_mar is not None:
            finite &= np.isfinite(v_mar[lo:hi]).all(axis=tuple(range(1, v_mar.ndim)))
        batch = select_states({**rollout, "v_task": v_task, "v_mar": v_mar}, lo + np.nonzero(finite)[0])
        terms = self.learner.accumulate(group, batch) if finite.any() else {}
        return {"group": group, "rank": self.rank, "nonfinite": int(hi - lo - finite.sum()),
                "step_idx": batch["step_idx"], "state_bytes": payload_bytes(batch),
                **{k: v.cpu().numpy() for k, v in terms.items()}}

    def apply(self, total_states: int) -> dict:
        return {"grad_norm": float(self.learner.apply(total_states))}

    def predict(self, batch: dict) -> np.ndarray:
        return self.learner.predict(batch)

    def lora_state(self) -> dict:
        return self.learner.lora_state()

    def optimizer_state(self) -> dict:
        return self.learner.optimizer_state()

    def load_state(self, lora: dict, optimizer: dict | None) -> None:
        self.learner.load_lora_state(lora)
        if optimizer is not None:
            self.learner.load_optimizer_state(optimizer)


class LearnerGroup:
    """Creates the ranks in one placement group (packed, so NCCL stays on fast links) and joins them; every
    rank optimises the same `objective` (a flowopd.objectives.Objective)."""

    def __init__(self, cfg, objective):
        lc = cfg.learner
        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {}), **lc.resources}
        self.pg = placement_group([bundle] * lc.ranks, strategy="PACK")
        cls = ray.remote(LearnerRank)
        self.ranks, self._next = [], 0
        try:  # a group that fails to start leaves nothing behind (a restarting job builds a new one)
            ray.get(self.pg.ready())
            self.ranks = [cls.options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, resources=lc.resources or None,
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(
                                          placement_group=self.pg, placement_group_bundle_index=i))
                          .remote(cfg, objective, i, lc.ranks) for i in range(lc.ranks)]
            addr, port = ray.get(self.ranks[0].master_address.remote())
            ray.get([r.setup.remote(addr, port) for r in self.ranks])
        except BaseException:
            self.shutdown()
            raise

    def train_step(self, batch: dict) -> list[dict]:
        """Shard the states evenly over the ranks and take one synchronised optimizer step."""
        n = len(batch["x"])
        bounds = np.linspace(0, n, len(self.ranks) + 1).astype(int)
        refs = []
        for r, lo, hi in zip(self.ranks, bounds[:-1], bounds[1:]):
            shard = {k: (v[lo:hi] if k in PER_STATE and v is not None else v) for k, v in batch.items()}
            refs.append(r.train_step.remote(shard, n))
        return gather_ranks(refs)

    def accumulate(self, group: int, rollout_ref, v_task_ref, v_mar_ref=None) -> list:
        """Queue one micro-group's gradient, each rank on its share of the states; returns the references to
        the ranks' small results."""
        return [r.accumulate.remote(group, rollout_ref, v_task_ref, v_mar_ref) for r in self.ranks]

    def apply(self, total_states: int) -> list[dict]:
        """End the step: one synchronised optimizer step from the micro-groups accumulated on every rank."""
        return gather_ranks([r.apply.remote(total_states) for r in self.ranks])

    def predict(self, batch) -> "ray.ObjectRef":
        """The trained model's velocity at the states of `batch` (a dict or its reference), on the next rank in
        turn (every rank holds the same weights); returns the reference."""
        rank = self.ranks[self._next % len(self.ranks)]
        self._next += 1
        return rank.predict.remote(batch)

    def lora_state_ref(self) -> "ray.ObjectRef":
        """The student's weights as an object reference: rollout workers fetch them from rank 0 directly."""
        return self.ranks[0].lora_state.remote()

    def optimizer_state(self) -> dict:
        return ray.get(self.ranks[0].optimizer_state.remote())

    def all_lora_states(self) -> list[dict]:
        return ray.get([r.lora_state.remote() for r in self.ranks])

    def load_state(self, lora: dict, optimizer: dict | None) -> None:
        ray.get([r.load_state.remote(lora, optimizer) for r in self.ranks])

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        ray.util.remove_placement_group(self.pg)


def gather_ranks(refs: list, wait_s: float = 60.0) -> list:
    """The ranks' results of one collective step. A rank that dies mid-step breaks DDP's connections, and its
    peers may fail first, with a RuntimeError from gloo or NCCL ("Connection closed by peer"): the death that
    Ray reports shortly after (within `wait_s`) is raised instead, so the driver sees the crash, not a symptom."""
    try:
        return ray.get(refs)
    except RayTaskError as err:
        if not isinstance(err.cause, RuntimeError):
            raise
        pending, deadline = list(refs), time.monotonic() + wait_s
        while pending and (left := deadline - time.monotonic()) > 0:
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                try:
                    ray.get(ref)
                except RayActorError as died:
                    raise died from err
                except RayTaskError:
                    pass
        raise
