"""The learner (pure torch): student LoRA, AdamW, micro-batched optimisation of an Objective, optional DDP.

Two ways to take a step, with the same update (the gradient of the mean loss over all of a step's states):
* `train_step` on this rank's share of the batch: each rank scales its summed per-state loss by
  world/N_total, so DDP's gradient average equals the mean over the whole (possibly unevenly split) batch.
* `accumulate` one micro-group at a time, as they arrive, then `apply`: the micro-groups' summed-loss
  gradients are added in micro-group order, summed over ranks (one all-reduce) and divided by N_total.
"""
import math
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .flow import schedule_sigmas
from .models import (
    add_student_adapter,
    as_tensor,
    load_lora_state,
    load_transformer,
    lora_config,
    lora_state,
    resolve_device,
    resolve_dtype,
    velocity,
)
from .objectives import Objective

# Batch entries with one row per state (the rest are per prompt or shared).
PER_STATE = ("x", "x_next", "logp_old", "step_idx", "prompt_idx", "v_task", "v_mar", "adv",
             # distribution matching (flowopd.dmd): the generator's step noise, the renoised state and its
             # scores, the fake score's targets and consistency moves
             "xi", "x_t", "sigma_t", "xi_back", "v_real", "v_fake", "v_target", "fm_weight", "sigma_c", "xi_1", "xi_2")


def select_states(batch: dict, keep: np.ndarray) -> dict:
    """The batch restricted to the states in `keep` (per-prompt entries are left whole)."""
    return {k: (v[keep] if k in PER_STATE and v is not None else v) for k, v in batch.items()}


def payload_bytes(obj) -> int:
    """Bytes of the arrays in a (nested) payload: what moving it between processes costs."""
    if isinstance(obj, np.ndarray | torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(payload_bytes(v) for v in obj)
    return 0


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0, final: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`, as a fraction of the configured one:
    1 for "constant"; for "cosine" (step + 1) / warmup during the warm-up, then
    final + (1 - final) (1 + cos(pi p)) / 2 with p = (step - warmup) / (total - warmup - 1) going 0 -> 1."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))


class Learner:
    """Runs micro-batches, DDP and the optimizer; what is optimised is the `objective`'s business."""

    def __init__(self, cfg, objective: Objective, world_size: int = 1, device: str = "auto"):
        self.cfg, self.world = cfg, world_size
        self.device = resolve_device(device)
        dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.autocast = dtype if dtype != torch.float32 else None
        s = cfg.student
        base = load_transformer(cfg.student_base(), dtype, self.device, cfg.model.compile)
        if cfg.learner.gradient_checkpointing:
            base.enable_gradient_checkpointing()
        torch.manual_seed(cfg.seed)  # the same fresh LoRA init on every rank and in every run
        self.model = add_student_adapter(base, lora_config(s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_init),
                                         s.init_adapter)
        for p in self.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp = DDP(self.model) if world_size > 1 else None
        lc = cfg.learner
        self.opt = torch.optim.AdamW(self.params, lr=lc.lr, weight_decay=lc.weight_decay, betas=lc.betas)
        # constant tables live on the model's device once: they are indexed by per-state step indices there
        self.sigmas = schedule_sigmas(cfg.sampling.num_steps, cfg.sampling.shift, cfg.sampling.timesteps).to(self.device)
        self.objective = objective.to(self.device)
        self._pending: dict[int, torch.Tensor] = {}  # accumulated micro-group gradients, by group id

    def _reference(self, b, sl, j, pi) -> torch.Tensor:
        """The frozen reference velocity: the student with its adapter disabled, the objective's guidance."""
        with torch.no_grad(), self.model.disable_adapter():
            return velocity(self.model, b["x"][sl], self.sigmas[j], b["embeds"][pi], b["pooled"][pi],
                            b["neg_embeds"], b["neg_pooled"], self.objective.guidance, self.autocast)

    def _student(self, b, pi, x, sigma) -> torch.Tensor:
        """The trained model's velocity, with its gradient, at further states of the chunk's prompts."""
        obj = self.objective
        return velocity(self.model, x, sigma, b["embeds"][pi], b["pooled"][pi], b["neg_embeds"], b["neg_pooled"],
                        obj.guidance, self.autocast, obj.detach_uncond)

    @torch.no_grad()
    def predict(self, batch: dict, guidance: float = 1.0) -> np.ndarray:
        """The trained model's velocity at every state of `batch` (`x` at the objective's noise levels), for
        other actors (a fake score labelling the generator's states)."""
        b = self._tensors(batch)
        out = []
        for i in range(0, len(b["x"]), self.cfg.learner.micro_batch_size):
            sl = slice(i, i + self.cfg.learner.micro_batch_size)
            j, pi = b["step_idx"][sl].long(), b["prompt_idx"][sl].long()
            out.append(velocity(self.model, b["x"][sl], self.objective.state_sigma(b, sl, j, self.sigmas),
                                b["embeds"][pi], b["pooled"][pi], b["neg_embeds"], b["neg_pooled"], guidance,
                                self.autocast).float().cpu().numpy())
        return np.concatenate(out)

    def train_step(self, batch: dict, total_states: int) -> dict:
        """One optimizer step on this rank's share of the states; returns per-state terms and grad norm."""
        terms, grad_norm = self.step(batch, total_states)
        return {**{k: v.cpu().numpy() for k, v in terms.items()}, "grad_norm": float(grad_norm)}

    def step(self, batch: dict, total_states: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The optimizer step itself; per-state terms and the grad norm stay on the model's device."""
        self.opt.zero_grad(set_to_none=True)
        terms = self._backward(self._tensors(batch), self.world / total_states, self.ddp)
        return terms, self._clip_and_step()

    def accumulate(self, group: int, batch: dict) -> dict[str, torch.Tensor]:
        """Backward of one micro-group's summed per-state loss; its gradient is kept apart (one flat vector)
        until `apply`, which adds them in group order, so the update does not depend on arrival order."""
        for p in self.params:
            p.grad = None
        terms = self._backward(self._tensors(batch), 1.0)
        self._pending[group] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                          for p in self.params])
        return terms

    def apply(self, total_states: int) -> torch.Tensor:
        """One optimizer step from the accumulated micro-groups of every rank: the gradient of the mean loss
        over the step's `total_states` states. Returns the grad norm (before clipping)."""
        flat = torch.zeros(sum(p.numel() for p in self.params), device=self.device)
        for group in sorted(self._pending):
            flat += self._pending[group]
        self._pending.clear()
        if self.world > 1:
            dist.all_reduce(flat)
        flat /= total_states
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return self._clip_and_step()

    def _tensors(self, batch: dict) -> dict:
        return {k: as_tensor(v, self.device) if isinstance(v, np.ndarray) else v for k, v in batch.items()}

    def _backward(self, b: dict, scale: float, ddp: DDP | None = None) -> dict[str, torch.Tensor]:
        """Backward of `scale` x the summed per-state loss, one micro-batch at a time (through `ddp`, which
        then reduces gradients once, after the last micro-batch); returns the per-state terms."""
        n = b["x"].shape[0]
        mb = self.cfg.learner.micro_batch_size
        chunks = [slice(i, min(i + mb, n)) for i in range(0, n, mb)]
        model, obj = ddp or self.model, self.objective
        terms: dict[str, list] = {}
        self.model.train()
        for ci, sl in enumerate(chunks):
            sync = ci == len(chunks) - 1 or ddp is None
            with (nullcontext() if sync else ddp.no_sync()):
                j = b["step_idx"][sl].long()
                pi = b["prompt_idx"][sl].long()
                v = velocity(model, b["x"][sl], obj.state_sigma(b, sl, j, self.sigmas), b["embeds"][pi],
                             b["pooled"][pi], b["neg_embeds"], b["neg_pooled"], obj.guidance, self.autocast,
                             obj.detach_uncond)
                loss, out = obj(v, b, sl, j, partial(self._reference, b, sl, j, pi), partial(self._student, b, pi))
                for k, val in out.items():
                    terms.setdefault(k, []).append(val.detach().float())
                (loss.sum() * scale).backward()
        self.model.eval()
        return {k: torch.cat(v) for k, v in terms.items()}

    def _clip_and_step(self) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.learner.grad_clip)
        lc = self.cfg.learner
        if lc.lr_schedule != "constant":  # the step count lives in the optimizer state: resumes continue it
            done = int(self.opt.state[self.params[0]]["step"]) if self.opt.state else 0
            for group in self.opt.param_groups:
                group["lr"] = lc.lr * lr_factor(done, self.cfg.optimizer_steps(), lc.lr_schedule, lc.lr_warmup,
                                                lc.lr_final)
        self.opt.step()
        return grad_norm

    def lora_state(self) -> dict:
        return {k: v.numpy() for k, v in lora_state(self.model).items()}

    def load_lora_state(self, state: dict) -> None:
        """New weights start a new step: micro-groups accumulated for an abandoned one are dropped."""
        load_lora_state(self.model, state)
        self._pending.clear()

    def optimizer_state(self) -> dict:
        return self.opt.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state)

    def save_adapter(self, path: str) -> None:
        self.model.save_pretrained(path)
