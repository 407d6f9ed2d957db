"""The learner (pure torch): student LoRA, AdamW, micro-batched optimisation of an Objective, optional DDP.

Each rank scales its summed per-state loss by world/N_total, so DDP's gradient average equals the
gradient of the mean loss over the whole (possibly unevenly split) batch.
"""
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .flow import shifted_sigmas
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
PER_STATE = ("x", "x_next", "logp_old", "step_idx", "prompt_idx", "v_task", "v_mar", "adv")


class Learner:
    """Runs micro-batches, DDP and the optimizer; what is optimised is the `objective`'s business."""

    def __init__(self, cfg, objective: Objective, world_size: int = 1, device: str = "auto"):
        self.cfg, self.world = cfg, world_size
        self.device = resolve_device(device)
        dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.autocast = dtype if dtype != torch.float32 else None
        s = cfg.student
        base = load_transformer(cfg.student_base(), dtype, self.device)
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
        self.sigmas = shifted_sigmas(cfg.sampling.num_steps, cfg.sampling.shift).to(self.device)
        self.objective = objective.to(self.device)

    def _reference(self, b, sl, j, pi) -> torch.Tensor:
        """The frozen reference velocity: the student with its adapter disabled, the objective's guidance."""
        with torch.no_grad(), self.model.disable_adapter():
            return velocity(self.model, b["x"][sl], self.sigmas[j], b["embeds"][pi], b["pooled"][pi],
                            b["neg_embeds"], b["neg_pooled"], self.objective.guidance, self.autocast)

    def train_step(self, batch: dict, total_states: int) -> dict:
        """One optimizer step on this rank's share of the states; returns per-state terms and grad norm."""
        terms, grad_norm = self.step(batch, total_states)
        return {**{k: v.cpu().numpy() for k, v in terms.items()}, "grad_norm": float(grad_norm)}

    def step(self, batch: dict, total_states: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The optimizer step itself; per-state terms and the grad norm stay on the model's device."""
        b = {k: as_tensor(v, self.device) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
        n = b["x"].shape[0]
        mb = self.cfg.learner.micro_batch_size
        chunks = [slice(i, min(i + mb, n)) for i in range(0, n, mb)]
        model, obj = self.ddp or self.model, self.objective
        terms: dict[str, list] = {}
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        for ci, sl in enumerate(chunks):
            sync = ci == len(chunks) - 1 or self.ddp is None
            with (nullcontext() if sync else self.ddp.no_sync()):
                j = b["step_idx"][sl].long()
                pi = b["prompt_idx"][sl].long()
                v = velocity(model, b["x"][sl], self.sigmas[j], b["embeds"][pi], b["pooled"][pi],
                             b["neg_embeds"], b["neg_pooled"], obj.guidance, self.autocast, obj.detach_uncond)
                loss, out = obj(v, b, sl, j, partial(self._reference, b, sl, j, pi))
                for k, val in out.items():
                    terms.setdefault(k, []).append(val.detach().float())
                (loss.sum() * self.world / total_states).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.learner.grad_clip)
        self.opt.step()
        self.model.eval()
        return {k: torch.cat(v) for k, v in terms.items()}, grad_norm

    def lora_state(self) -> dict:
        return {k: v.numpy() for k, v in lora_state(self.model).items()}

    def load_lora_state(self, state: dict) -> None:
        load_lora_state(self.model, state)

    def optimizer_state(self) -> dict:
        return self.opt.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state)

    def save_adapter(self, path: str) -> None:
        self.model.save_pretrained(path)
