"""What a learner optimises, one class per method (docs/method.md states each formula).

A trainer hands the learner one Objective. The learner computes the student's velocity on a micro-batch
of states, with the objective's CFG scale and gradient rule, and the objective turns it into per-state
losses; the learner itself only runs micro-batches, DDP and the optimizer. A new method is one new class
here, one trainer that builds it, and one config class (docs/extending.md).
"""
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from .flow import kl_weights, opd_loss, opd_pg_loss, sde_std
from .grpo import grpo_loss


class Objective(ABC):
    """Per-state losses from the student's velocity `v` on the states `batch[key][sl]` at sigma indices `j`.

    guidance: the CFG scale of the trained velocity (1 = the conditional velocity alone);
    detach_uncond: no gradient through the unconditional branch (Flow-GRPO's policy)."""

    guidance: float = 1.0
    detach_uncond: bool = False

    def to(self, device) -> "Objective":
        """Constant tables (sigmas, weights) onto the model's device, once."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @abstractmethod
    def __call__(self, v: torch.Tensor, batch: dict, sl: slice, j: torch.Tensor,
                 reference: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-state loss to minimise, per-state terms to log). `reference()` is the frozen reference
        model's velocity on the same states (the student with its adapter disabled), computed on demand."""


class VelocityMatching(Objective):
    """Weighted velocity regression to the detached targets `v_task` (and, with weight lambda, `v_mar`):
    L = w_j mean_dims(v - SG(v_task))^2 + lambda w_j mean_dims(v - SG(v_mar))^2."""

    def __init__(self, weights: torch.Tensor, mar_weight: float = 0.0, guidance: float = 1.0,
                 detach_uncond: bool = False):
        self.w, self.mar_weight = weights.float(), mar_weight
        self.guidance, self.detach_uncond = guidance, detach_uncond

    def term(self, v, target, batch, sl, j) -> torch.Tensor:
        return opd_loss(v, target, self.w[j])

    def __call__(self, v, batch, sl, j, reference):
        task = self.term(v, batch["v_task"][sl], batch, sl, j)
        out, loss = {"task_loss": task}, task
        if self.mar_weight > 0:
            out["mar_loss"] = self.term(v, batch["v_mar"][sl], batch, sl, j)
            loss = loss + self.mar_weight * out["mar_loss"]
        return loss, out


class AnalyticOPD(VelocityMatching):
    """Flow-OPD's analytic loss (paper Eq. 15-16): the exact per-step KL w_j ||v - v_T||^2 (or the released
    code's weighting, exact=False), plus MAR; noise_level 0 is DiffusionOPD's mean matching (dt^2 / 2)."""

    def __init__(self, sigmas, noise_level: float, exact: bool = True, mar_weight: float = 0.0,
                 guidance: float = 1.0, detach_uncond: bool = False):
        super().__init__(kl_weights(sigmas, noise_level, exact=exact), mar_weight, guidance, detach_uncond)


class PolicyGradientOPD(AnalyticOPD):
    """Flow-OPD's score-function form (paper Eq. 14) with the single-sample reverse-KL advantage; needs the
    rollouts' transitions (x', log-probs). Rescaled so the released weighting matches the analytic one."""

    def __init__(self, sigmas, noise_level: float, exact: bool = True, mar_weight: float = 0.0,
                 guidance: float = 1.0, detach_uncond: bool = False, clip_range: float | None = None):
        super().__init__(sigmas, noise_level, exact, mar_weight, guidance, detach_uncond)
        self.scale = self.w / kl_weights(sigmas, noise_level, exact=True)
        self.sigmas, self.std, self.clip_range = sigmas.float(), sde_std(sigmas, noise_level), clip_range

    def term(self, v, target, batch, sl, j):
        return self.scale[j] * opd_pg_loss(v, target, batch["x"][sl], batch["x_next"][sl], batch["logp_old"][sl],
                                           self.sigmas[j], self.sigmas[j + 1], self.std[j], self.clip_range)


class FlowMatchingSFT(VelocityMatching):
    """Plain flow matching on given samples: mean_dims(v_c - (eps - x0))^2 with weight 1 at every sigma,
    on the conditional velocity (the SFT cold start)."""

    def __init__(self, num_steps: int):
        super().__init__(torch.ones(num_steps))


class FlowGRPO(Objective):
    """Flow-GRPO's clipped-ratio surrogate on group advantages, plus beta times the KL to the reference."""

    def __init__(self, sigmas, noise_level: float, clip_range: float, beta: float, guidance: float,
                 detach_uncond: bool = True):
        self.sigmas, self.std = sigmas.float(), sde_std(sigmas, noise_level)
        self.clip_range, self.beta = clip_range, beta
        self.guidance, self.detach_uncond = guidance, detach_uncond

    def __call__(self, v, batch, sl, j, reference):
        v_ref = reference() if self.beta > 0 else None
        loss, ratio, kl = grpo_loss(v, v_ref, batch["x"][sl], batch["x_next"][sl], batch["logp_old"][sl],
                                    batch["adv"][sl], self.sigmas[j], self.sigmas[j + 1], self.std[j],
                                    self.clip_range, self.beta)
        return loss, {"loss": loss, "ratio": ratio, "kl": kl}
