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

from flowopd.learner import PER_STATE, Learner
from flowopd.models import quiet_libraries


class LearnerRank:
    def __init__(self, cfg, objective, rank: int, world: int):
        quiet_libraries()
        self.cfg, self.objective, self.rank, self.world = cfg, objective, rank, world
        self.learner = None

    def pid(self) -> int:
        return os.getpid()

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
        self.ranks = []
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

    def lora_state(self) -> dict:
        return ray.get(self.ranks[0].lora_state.remote())

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
