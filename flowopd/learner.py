"""The learner (pure torch): student LoRA, AdamW, micro-batched OPD+MAR or Flow-GRPO loss, optional DDP.

Each rank scales its summed per-state loss by world/N_total, so DDP's gradient average equals the
gradient of the mean loss over the whole (possibly unevenly split) batch.
"""
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .flow import kl_weights, opd_loss, opd_pg_loss, sde_std, shifted_sigmas
from .grpo import grpo_loss
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

# Batch entries with one row per state (the rest are per prompt or shared).
PER_STATE = ("x", "x_next", "logp_old", "step_idx", "prompt_idx", "v_task", "v_mar", "adv")


class Learner:
    def __init__(self, cfg, world_size: int = 1, device: str = "auto"):
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
        sc = cfg.sampling
        self.sigmas = shifted_sigmas(sc.num_steps, sc.shift)
        self.std = sde_std(self.sigmas, sc.noise_level)
        self.grpo = getattr(cfg, "grpo", None)
        self.sft = hasattr(cfg, "sft")  # plain flow matching: weight 1, conditional velocity, target eps - x0
        self.form = cfg.loss.form if hasattr(cfg, "loss") else "analytic"
        exact = self.grpo is not None or self.sft or cfg.loss.kl_weighting == "exact"
        self.w = torch.ones(sc.num_steps) if self.sft else kl_weights(self.sigmas, sc.noise_level, exact=exact)
        self.w_exact = kl_weights(self.sigmas, sc.noise_level, exact=True)
        # constant tables live on the model's device once: they are indexed by per-state step indices there
        self.sigmas, self.std, self.w, self.w_exact = (t.to(self.device) for t in
                                                       (self.sigmas, self.std, self.w, self.w_exact))
        self.detach_uncond = (self.grpo.detach_uncond if self.grpo is not None
                              else (not self.sft and cfg.loss.detach_uncond))

    def _opd_term(self, v, target, x, x_next, logp_old, j):
        if self.form == "analytic":
            return opd_loss(v, target, self.w[j])
        scale = self.w[j] / self.w_exact[j]
        return scale * opd_pg_loss(v, target, x, x_next, logp_old, self.sigmas[j], self.sigmas[j + 1],
                                   self.std[j], self.cfg.loss.clip_range)

    def _opd_chunk(self, v, b, sl, j) -> tuple[torch.Tensor, dict]:
        pg = self.form == "policy_gradient"
        args = (b["x"][sl], b["x_next"][sl] if pg else None, b["logp_old"][sl] if pg else None, j)
        task = self._opd_term(v, b["v_task"][sl], *args)
        out, loss = {"task_loss": task}, task
        mar = getattr(self.cfg, "mar", None)
        lam = mar.weight if mar is not None and mar.teacher else 0.0
        if lam > 0:
            out["mar_loss"] = self._opd_term(v, b["v_mar"][sl], *args)
            loss = loss + lam * out["mar_loss"]
        return loss, out

    def _grpo_chunk(self, v, b, sl, j, pi, guidance) -> tuple[torch.Tensor, dict]:
        g = self.grpo
        v_ref = None
        if g.beta > 0:  # the reference policy is the same model with its adapter disabled
            with torch.no_grad(), self.model.disable_adapter():
                v_ref = velocity(self.model, b["x"][sl], self.sigmas[j], b["embeds"][pi], b["pooled"][pi],
                                 b["neg_embeds"], b["neg_pooled"], guidance, self.autocast)
        loss, ratio, kl = grpo_loss(v, v_ref, b["x"][sl], b["x_next"][sl], b["logp_old"][sl], b["adv"][sl],
                                    self.sigmas[j], self.sigmas[j + 1], self.std[j], g.clip_range, g.beta)
        return loss, {"loss": loss, "ratio": ratio, "kl": kl}

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
        model = self.ddp or self.model
        train_cfg = self.grpo is not None or (not self.sft and self.cfg.loss.train_cfg)
        guidance = self.cfg.sampling.guidance if train_cfg else 1.0
        terms: dict[str, list] = {}
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        for ci, sl in enumerate(chunks):
            sync = ci == len(chunks) - 1 or self.ddp is None
            with (nullcontext() if sync else self.ddp.no_sync()):
                j = b["step_idx"][sl].long()
                pi = b["prompt_idx"][sl].long()
                v = velocity(model, b["x"][sl], self.sigmas[j], b["embeds"][pi], b["pooled"][pi],
                             b["neg_embeds"], b["neg_pooled"], guidance, self.autocast, self.detach_uncond)
                loss, out = (self._grpo_chunk(v, b, sl, j, pi, guidance) if self.grpo is not None
                             else self._opd_chunk(v, b, sl, j))
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
