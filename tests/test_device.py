"""GPU readiness without a GPU: a learner step with every tensor on the `meta` device. Any constant table
or index left on the CPU (which fails on a GPU with "Expected all tensors to be on the same device")
fails here the same way."""
import numpy as np
import pytest

from actors.dmd_trainer import DMDTrainer
from actors.grpo_trainer import GRPOTrainer
from actors.opd_trainer import OPDTrainer
from actors.rtdmd_trainer import RTDMDTrainer
from flowopd.config import DMDConfig, GRPOConfig, OPDConfig, RTDMDConfig
from flowopd.learner import Learner
from flowopd.models import encode_prompts, load_pipeline
from flowopd.objectives import ACFakeScore
from tests.conftest import tiny_config_dict


def _batch(tiny_assets, n=6, pg=False, grpo=False):
    pipe = load_pipeline(str(tiny_assets / "base"))
    e, p = encode_prompts(pipe, ["a red cube", "a cat"], 16)
    ne, npool = encode_prompts(pipe, [""], 16)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4, 8, 8)).astype(np.float32)
    b = {"x": x, "v_task": x, "v_mar": x, "step_idx": np.arange(n) % 9, "prompt_idx": np.arange(n) % 2,
         "embeds": e.numpy(), "pooled": p.numpy(), "neg_embeds": ne.numpy(), "neg_pooled": npool.numpy(),
         "x_next": x if pg or grpo else None, "logp_old": np.zeros(n, np.float32) if pg or grpo else None}
    if grpo:
        b["adv"] = rng.normal(size=n).astype(np.float32)
    return b


@pytest.mark.parametrize("kind", ["analytic", "policy_gradient", "grpo", "dmd_generator", "fake_score", "rtdmd"])
def test_a_learner_step_stays_on_the_model_device(tiny_assets, tmp_path, kind, monkeypatch):
    raw = tiny_config_dict(tiny_assets, tmp_path, **{"loss.form": kind if kind in ("analytic", "policy_gradient")
                                                     else "analytic"})
    batch = _batch(tiny_assets, pg=kind == "policy_gradient", grpo=kind in ("grpo", "rtdmd"))
    if kind == "rtdmd":  # SubGRPO states and last-step states (reward back-propagation looks up prompt text on
        # the host, which a meta tensor cannot give)
        import torch.fx.experimental._config as fx_config
        monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)  # meta tensors hold no values
        cfg = RTDMDConfig.model_validate(tiny_config_dict(tiny_assets, tmp_path, config="tiny_rtdmd.yaml",
                                                          **{"rtdmd.backprop": None}))
        n, rng = len(batch["x"]), np.random.default_rng(1)
        batch.update({k: batch["x"] for k in ("x_t", "v_real", "v_fake")}, step_idx=np.arange(n) % 4,
                     sigma_t=rng.uniform(0.1, 0.9, n).astype(np.float32), prompts=["a red cube", "a cat"],
                     metadata=[{}, {}])
        objective = RTDMDTrainer.make_objective(cfg)
    elif kind in ("dmd_generator", "fake_score"):
        cfg = DMDConfig.model_validate(tiny_config_dict(tiny_assets, tmp_path, config="tiny_dmd.yaml"))
        n, rng = len(batch["x"]), np.random.default_rng(1)
        batch.update({k: batch["x"] for k in ("xi", "x_t", "xi_back", "v_real", "v_fake", "v_target", "xi_1", "xi_2")},
                     step_idx=np.arange(n) % 4, sigma_t=rng.uniform(0.1, 0.9, n).astype(np.float32),
                     fm_weight=np.ones(n, np.float32), sigma_c=rng.uniform(0.0, 0.1, n).astype(np.float32))
        objective = (DMDTrainer.make_objective(cfg) if kind == "dmd_generator"
                     else ACFakeScore(cfg.sampling.noise_level, cfg.dmd.consistency_weight))
    elif kind == "grpo":
        raw = {k: raw[k] for k in ("seed", "output_dir", "model", "student", "sampling", "data", "learner")}
        raw.update(rewards=[{"name": "brightness"}], grpo={"beta": 0.04})
        cfg = GRPOConfig.model_validate(raw)
        objective = GRPOTrainer.make_objective(cfg)
    else:
        cfg = OPDConfig.model_validate(raw)
        objective = OPDTrainer.make_objective(cfg)
    learner = Learner(cfg, objective, device="meta")
    terms, grad_norm = learner.step(batch, 6)
    assert grad_norm.device.type == "meta" and terms and all(t.device.type == "meta" for t in terms.values())


def test_gradient_checkpointing_leaves_the_update_unchanged(tiny_assets, tmp_path):
    """Recomputing activations in the backward pass is a memory trade, never a different update."""
    states = []
    for ckpt in (False, True):
        cfg = OPDConfig.model_validate(tiny_config_dict(tiny_assets, tmp_path, **{"learner.gradient_checkpointing": ckpt}))
        learner = Learner(cfg, OPDTrainer.make_objective(cfg), device="cpu")
        assert learner.model.base_model.model.gradient_checkpointing is ckpt
        learner.train_step(_batch(tiny_assets), 6)
        states.append(learner.lora_state())
    moved = max(np.abs(states[0][k]).max() for k in states[0] if "lora_B" in k)
    assert moved > 1e-4
    for k in states[0]:
        np.testing.assert_allclose(states[1][k], states[0][k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_cosine_learning_rate_schedule_sets_each_optimizer_step(tiny_assets, tmp_path):
    """With a cosine schedule the learner's step k uses lr * factor(k) (warm-up 2 of 5 steps, final 0.1),
    the closed form written out here, not read from flowopd.learner."""
    import math
    lr, total, warmup, final = 1e-2, 5, 2, 0.1
    raw = tiny_config_dict(tiny_assets, tmp_path, **{"learner.lr": lr, "learner.lr_schedule": "cosine",
                                                     "learner.lr_warmup": warmup, "learner.lr_final": final,
                                                     "train.steps": total})
    cfg = OPDConfig.model_validate(raw)
    learner = Learner(cfg, OPDTrainer.make_objective(cfg), device="cpu")
    expected = [1 / 2, 2 / 2] + [final + (1 - final) * (1 + math.cos(math.pi * p)) / 2 for p in (0, 0.5, 1)]
    seen = []
    for _ in range(total):
        learner.train_step(_batch(tiny_assets), 6)
        seen.append(learner.opt.param_groups[0]["lr"] / lr)
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[-1] == pytest.approx(final) and seen[2] == pytest.approx(1.0)
