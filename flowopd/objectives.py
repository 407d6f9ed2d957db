"""What a learner optimises, one class per method (docs/method.md states each formula).

A trainer hands the learner one Objective. The learner computes the student's velocity on a micro-batch
of states, with the objective's CFG scale and gradient rule, and the objective turns it into per-state
losses; the learner itself only runs micro-batches, DDP and the optimizer. A new method is one new class
here, one trainer that builds it, and one config class (docs/extending.md).
"""
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from .dmd import (
    consistency_loss,
    cps_policy_loss,
    denoised,
    dmd_direction,
    dmd_loss,
    fake_score_loss,
    reward_bp_loss,
)
from .flow import cps_step, kl_weights, opd_loss, opd_pg_loss, sde_std
from .grpo import grpo_loss
from .models import decode_latents, load_vae


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

    def state_sigma(self, batch: dict, sl: slice, j: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The noise level of each state: the sampling schedule's sigma at its step index, by default."""
        return sigmas[j]

    @abstractmethod
    def __call__(self, v: torch.Tensor, batch: dict, sl: slice, j: torch.Tensor,
                 reference: Callable[[], torch.Tensor],
                 student: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-state loss to minimise, per-state terms to log). `reference()` is the frozen reference
        model's velocity on the same states (the student with its adapter disabled), computed on demand;
        `student(x, sigma)` the trained model's velocity (with its gradient) at other states of the same
        prompts."""


class VelocityMatching(Objective):
    """Weighted velocity regression to the detached targets `v_task` (and, with weight lambda, `v_mar`):
    L = w_j mean_dims(v - SG(v_task))^2 + lambda w_j mean_dims(v - SG(v_mar))^2."""

    def __init__(self, weights: torch.Tensor, mar_weight: float = 0.0, guidance: float = 1.0,
                 detach_uncond: bool = False):
        self.w, self.mar_weight = weights.float(), mar_weight
        self.guidance, self.detach_uncond = guidance, detach_uncond

    def term(self, v, target, batch, sl, j) -> torch.Tensor:
        return opd_loss(v, target, self.w[j])

    def __call__(self, v, batch, sl, j, reference, student):
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

    def __call__(self, v, batch, sl, j, reference, student):
        v_ref = reference() if self.beta > 0 else None
        loss, ratio, kl = grpo_loss(v, v_ref, batch["x"][sl], batch["x_next"][sl], batch["logp_old"][sl],
                                    batch["adv"][sl], self.sigmas[j], self.sigmas[j + 1], self.std[j],
                                    self.clip_range, self.beta)
        return loss, {"loss": loss, "ratio": ratio, "kl": kl}


class ACDMDGenerator(Objective):
    """AC-DMD's generator loss (RTDMD stage 1): the state `x` at sigma_j takes its CPS step to s = sigma_{j+1}
    with the rollout's noise `xi`, x_s = CPS(x, v_theta); then 0.5 mean_dims(x_s - SG(x_s - g)) with g the DMD
    direction from the real and fake scores at the renoised state (`x_t`, `sigma_t`). No CFG (the generator
    samples without it)."""

    def __init__(self, sigmas, eta: float):
        self.sigmas, self.eta = sigmas.float(), eta

    def __call__(self, v, batch, sl, j, reference, student):
        s = self.sigmas[j + 1]
        x_s = cps_step(batch["x"][sl], v, self.sigmas[j], s, self.eta, noise=batch["xi"][sl])[0]
        g = dmd_direction(x_s.detach(), batch["x_t"][sl], batch["sigma_t"][sl], s, batch["v_real"][sl],
                          batch["v_fake"][sl], self.eta, batch["xi_back"][sl])
        loss = dmd_loss(x_s, g)
        return loss, {"dmd_loss": loss}


class ACFakeScore(Objective):
    """AC-DMD's fake score: flow matching on the generator's renoised outputs, w * mean_dims(v - v*)^2 at
    (`x` = x_t, `sigma_t`), plus `consistency` x the two-sample consistency term: from x_t, two CPS moves
    (noises `xi_1`, `xi_2`, the fake's own detached velocity) to the lower level `sigma_c`, where the fake's
    denoised predictions should agree with the one at x_t. No CFG."""

    def __init__(self, eta: float, consistency: float):
        self.eta, self.consistency = eta, consistency

    def state_sigma(self, batch, sl, j, sigmas):
        return batch["sigma_t"][sl]

    def __call__(self, v, batch, sl, j, reference, student):
        fm = fake_score_loss(v, batch["v_target"][sl], batch["fm_weight"][sl])
        out, loss = {"fm_loss": fm}, fm
        if self.consistency > 0:
            x_t, sigma_t, sigma_c = batch["x"][sl], batch["sigma_t"][sl], batch["sigma_c"][sl]
            anchor = denoised(x_t, v, sigma_t)
            moved = [cps_step(x_t, v.detach(), sigma_t, sigma_c, self.eta, noise=batch[k][sl])[0]
                     for k in ("xi_1", "xi_2")]
            h = [denoised(x, student(x, sigma_c), sigma_c) for x in moved]
            out["consistency"] = consistency_loss(anchor, *h)
            loss = loss + self.consistency * out["consistency"]
        return loss, out


class RewardBackprop:
    """Reward back-propagation through the decoder: the generator's last output x0_hat is decoded by the
    frozen VAE of `base` and scored by a differentiable reward (`make_reward()` builds it in the learner's
    process: the objective travels to the learners before anything heavy is loaded);
    loss scale * relu(margin - r)."""

    def __init__(self, base: str, make_reward: Callable, margin: float, scale: float):
        self.base, self.make_reward, self.margin, self.scale = base, make_reward, margin, scale
        self.vae = self.reward = None

    def load(self, device) -> None:
        self.vae, self.reward = load_vae(self.base, device=device), self.make_reward()

    def __call__(self, x0: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss, reward) of the latents `x0`."""
        r = self.reward.differentiable(decode_latents(self.vae, x0), prompts, metadata).float()
        return reward_bp_loss(r, self.margin, self.scale), r.detach()


class RTDMDGenerator(Objective):
    """RTDMD stage 2 on the states of a CPS rollout. A state at a SubGRPO step: the clipped policy loss of its
    stored transition, with its sample's advantage. A state at the deterministic last step (to sigma 0):
    `dmd_weight` x the AC-DMD loss on x0_hat = x - sigma v (real and fake scores at its renoised state, as in
    ACDMDGenerator), plus, with `backprop`, the reward back-propagation loss on the decoded x0_hat. No CFG."""

    def __init__(self, sigmas, eta: float, clip_range: float, dmd_weight: float,
                 backprop: RewardBackprop | None = None):
        self.sigmas, self.eta, self.clip_range = sigmas.float(), eta, clip_range
        self.dmd_weight, self.backprop = dmd_weight, backprop

    def to(self, device) -> "RTDMDGenerator":
        super().to(device)
        if self.backprop is not None and self.backprop.vae is None:
            self.backprop.load(device)
        return self

    def __call__(self, v, batch, sl, j, reference, student):
        sigma, sigma_next, x = self.sigmas[j], self.sigmas[j + 1], batch["x"][sl]
        pg, ratio = cps_policy_loss(v, x, batch["x_next"][sl], batch["logp_old"][sl], batch["adv"][sl], sigma,
                                    sigma_next, self.eta, self.clip_range)
        last = sigma_next == 0
        zero = torch.zeros_like(pg)
        out = {"policy_loss": torch.where(last, zero, pg), "ratio": ratio, "dmd_loss": zero, "bp_reward": zero}
        loss = out["policy_loss"]
        rows = torch.nonzero(last).squeeze(1)
        if len(rows):
            x0 = denoised(x[rows], v[rows], sigma[rows])
            label = {k: batch[k][sl][rows] for k in ("x_t", "sigma_t", "v_real", "v_fake")}
            g = dmd_direction(x0.detach(), label["x_t"], label["sigma_t"], 0.0, label["v_real"], label["v_fake"],
                              self.eta, torch.zeros_like(x0))
            dmd = dmd_loss(x0, g)
            last_loss = self.dmd_weight * dmd
            out["dmd_loss"] = zero.index_put((rows,), dmd.detach())
            if self.backprop is not None:
                pi = batch["prompt_idx"][sl][rows].tolist()
                bp, r = self.backprop(x0, [batch["prompts"][i] for i in pi], [batch["metadata"][i] for i in pi])
                last_loss = last_loss + bp
                out["bp_reward"] = zero.index_put((rows,), r)
            loss = loss.index_put((rows,), last_loss)
        return loss, {**out, "loss": loss.detach()}
