"""RTDMD stage 2's math and objective against independent computations: the CPS log-prob and its policy
gradient, SubGRPO's step draws, the reward back-propagation hinge and the differentiable rewards, and the
generator objective's gradient on each kind of state."""
import math

import numpy as np
import pytest
import torch

from flowopd.config import ConfigError, RTDMDConfig, validate
from flowopd.dmd import cps_policy_loss, dmd_direction, reward_bp_loss, subgrpo_steps
from flowopd.flow import cps_step, timestep_sigmas
from flowopd.models import decode_latents, load_vae
from flowopd.objectives import RewardBackprop, RTDMDGenerator
from rewards.simple import Brightness
from tests.conftest import tiny_config_dict
from world.verifiers import Vividness

SIGMAS = timestep_sigmas([1000, 750, 500, 250])  # [1, .9, .75, .5, 0]
ETA = 0.9


def _mean(x, v, s, s2):
    """The CPS mean written out: (1-s') (x - s v) + s' cos(eta pi/2) (x + (1-s) v)."""
    c = math.cos(ETA * math.pi / 2)
    return (1 - s2) * (x - s * v) + s2 * c * (x + (1 - s) * v)


def test_cps_log_prob_is_the_released_unnormalised_one():
    g = torch.Generator().manual_seed(0)
    x, v, xi = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    x_next, mean, logp = cps_step(x, v, 0.9, 0.75, ETA, noise=xi)
    torch.testing.assert_close(mean, _mean(x, v, 0.9, 0.75))
    torch.testing.assert_close(x_next, mean + 0.75 * math.sin(ETA * math.pi / 2) * xi)
    rho = 0.75 * math.sin(ETA * math.pi / 2)
    torch.testing.assert_close(logp, -(rho * xi).pow(2).flatten(1).mean(1))
    assert not cps_step(x, v, 0.5, 0.0, ETA)[2].any()  # the deterministic last step scores 0


def test_on_policy_policy_gradient_is_the_score_function():
    """At ratio 1 the clipped loss's gradient in v is -A d logp/dv = -A 2 b (x' - mean) / D per state, with
    b = -(1-s') s + s' cos(eta pi/2) (1-s) the mean's coefficient of v."""
    g = torch.Generator().manual_seed(1)
    x, v0, xi = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    s, s2 = SIGMAS[1].item(), SIGMAS[2].item()
    x_next, _, logp_old = cps_step(x, v0, s, s2, ETA, noise=xi)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0])
    v = v0.clone().requires_grad_(True)
    loss, ratio = cps_policy_loss(v, x, x_next, logp_old, adv, s, s2, ETA, clip_range=1e-5)
    loss.sum().backward()
    torch.testing.assert_close(ratio, torch.ones(4))
    b = -(1 - s2) * s + s2 * math.cos(ETA * math.pi / 2) * (1 - s)
    D = x[0].numel()
    expected = -adv.view(-1, 1, 1, 1) * 2 * b * (x_next - _mean(x, v0, s, s2)) / D
    torch.testing.assert_close(v.grad, expected)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    g = torch.Generator().manual_seed(2)
    x, v0, xi = (torch.randn(2, 2, 3, 3, generator=g) for _ in range(3))
    x_next, _, logp_old = cps_step(x, v0, 0.9, 0.75, ETA, noise=xi)
    v = (v0 + 0.3 * torch.randn(2, 2, 3, 3, generator=g)).requires_grad_(True)
    loss, ratio = cps_policy_loss(v, x, x_next, logp_old, torch.tensor([1.0, 1.0]), 0.9, 0.75, ETA, 1e-5)
    loss.sum().backward()
    # with A > 0 the loss is max(-A r, -A clip(r)): a ratio above 1 + eps is clipped (no gradient), below 1 - eps
    # it is not
    for i in range(2):
        clipped = bool(ratio[i] > 1 + 1e-5)
        assert (v.grad[i].abs().max() == 0) == clipped, (ratio[i], clipped)


def test_subgrpo_draws_distinct_steps_the_same_everywhere():
    draws = [subgrpo_steps(0, step, 0, 2, 2) for step in range(1, 200)]
    assert all(len(set(d)) == 2 and d == sorted(d) and set(d) <= {0, 1, 2} for d in draws)
    assert {tuple(d) for d in draws} == {(0, 1), (0, 2), (1, 2)}
    counts = np.bincount(np.concatenate(draws), minlength=3) / len(draws)
    assert np.allclose(counts, 2 / 3, atol=0.1)
    assert draws == [subgrpo_steps(0, step, 0, 2, 2) for step in range(1, 200)]
    assert draws != [subgrpo_steps(1, step, 0, 2, 2) for step in range(1, 200)]
    assert subgrpo_steps(0, 5, 1, 1, 1) == [1]


def test_reward_backprop_hinge():
    r = torch.tensor([0.5, 2.9, 3.0, 4.0], requires_grad=True)
    loss = reward_bp_loss(r, margin=3.0, scale=1e-4)
    torch.testing.assert_close(loss, torch.tensor([2.5e-4, 1e-5, 0.0, 0.0]), atol=1e-9, rtol=1e-5)
    loss.sum().backward()
    torch.testing.assert_close(r.grad, torch.tensor([-1e-4, -1e-4, 0.0, 0.0]))


@pytest.mark.parametrize("reward", [Vividness(), Brightness(), Brightness(invert=True)], ids=["vivid", "bright", "dark"])
def test_differentiable_rewards_equal_their_image_scores(reward):
    """The torch form on float images equals the numpy score on the same images as uint8, and has a gradient."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 12, 12, 3), dtype=np.uint8)
    images[0] = 0  # a black image: saturation 0 where max is 0
    expected = next(iter(reward.score(images, [""] * 5, [{}] * 5).values()))
    t = torch.as_tensor(images, dtype=torch.float64).permute(0, 3, 1, 2).div(255).requires_grad_(True)
    got = reward.differentiable(t, [""] * 5, [{}] * 5)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert torch.isfinite(t.grad).all() and t.grad[1:].abs().sum() > 0


def _batch(n_pg: int = 3, n_last: int = 3, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """States of a CPS rollout: `n_pg` at step 1 (stochastic) and `n_last` at step 3 (to sigma 0), labelled."""
    g = torch.Generator().manual_seed(seed)
    n, shape = n_pg + n_last, (4, 4, 4)
    j = torch.tensor([1] * n_pg + [3] * n_last)
    x, v_old, xi = (torch.randn(n, *shape, generator=g) for _ in range(3))
    x_next, logp_old = torch.empty_like(x), torch.empty(n)
    for i in range(n):
        out = cps_step(x[i:i + 1], v_old[i:i + 1], SIGMAS[j[i]].item(), SIGMAS[j[i] + 1].item(), ETA, noise=xi[i:i + 1])
        x_next[i], logp_old[i] = out[0][0], out[2][0]
    batch = {"x": x, "x_next": x_next, "logp_old": logp_old, "adv": torch.randn(n, generator=g),
             "x_t": torch.randn(n, *shape, generator=g), "sigma_t": torch.rand(n, generator=g) * 0.9 + 0.05,
             "v_real": torch.randn(n, *shape, generator=g), "v_fake": torch.randn(n, *shape, generator=g),
             "prompt_idx": torch.zeros(n, dtype=torch.long), "prompts": ["a"], "metadata": [{}]}
    return batch, v_old, j


def test_generator_objective_gradient_per_kind_of_state():
    """Stochastic states: the policy gradient; last-step states: dmd_weight x the DMD direction through
    x0_hat = x - 0.5 v, i.e. d/dv = -0.5 dmd_weight g / D, with g from both scores mapped back to 0."""
    batch, v_old, j = _batch()
    obj = RTDMDGenerator(SIGMAS, ETA, clip_range=1e-5, dmd_weight=1e-3)
    v = v_old.clone().requires_grad_(True)
    loss, out = obj(v, batch, slice(None), j, None, None)
    loss.sum().backward()
    D = v[0].numel()
    pg = slice(0, 3)
    b = -(1 - 0.75) * 0.9 + 0.75 * math.cos(ETA * math.pi / 2) * 0.1
    step_noise = batch["x_next"][pg] - _mean(batch["x"][pg], v_old[pg], 0.9, 0.75)
    expected_pg = -batch["adv"][pg].view(-1, 1, 1, 1) * 2 * b * step_noise / D
    torch.testing.assert_close(v.grad[pg], expected_pg)
    last = slice(3, 6)
    x0 = batch["x"][last] - 0.5 * v_old[last]
    x_real = batch["x_t"][last] - batch["sigma_t"][last].view(-1, 1, 1, 1) * batch["v_real"][last]
    x_fake = batch["x_t"][last] - batch["sigma_t"][last].view(-1, 1, 1, 1) * batch["v_fake"][last]
    g = (x_fake - x_real) / (x0 - x_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(v.grad[last], -0.5 * 1e-3 * g / D, rtol=1e-4, atol=1e-10)
    assert (out["dmd_loss"][pg] == 0).all() and (out["policy_loss"][last] == 0).all() and (out["dmd_loss"][last] > 0).all()
    torch.testing.assert_close(dmd_direction(x0, batch["x_t"][last], batch["sigma_t"][last], 0.0, batch["v_real"][last],
                                             batch["v_fake"][last], ETA), g)


def test_reward_backprop_through_the_vae_raises_the_reward(tiny_assets):
    """The back-propagated brightness through the tiny model's VAE: its gradient on the last step's velocity is
    that of scale x relu(margin - r) (checked by a finite difference), and a step along it brightens x0_hat."""
    base = str(tiny_assets / "base")
    bp = RewardBackprop(base, Brightness, margin=3.0, scale=1.0)
    obj = RTDMDGenerator(SIGMAS, ETA, clip_range=1e-5, dmd_weight=0.0, backprop=bp).to("cpu")
    vae = load_vae(base)
    batch, v_old, j = _batch(n_pg=0, n_last=4, seed=3)
    v = v_old.clone().requires_grad_(True)
    loss, out = obj(v, batch, slice(None), j, None, None)
    loss.sum().backward()

    def brightness(vel):
        with torch.no_grad():
            return decode_latents(vae, batch["x"] - 0.5 * vel).flatten(1).mean(1)
    torch.testing.assert_close(out["bp_reward"], brightness(v_old))
    direction = torch.randn(v.shape, generator=torch.Generator().manual_seed(4))
    eps = 1e-3
    fd = ((brightness(v_old + eps * direction) - brightness(v_old - eps * direction)) / (2 * eps))
    torch.testing.assert_close((v.grad * direction).flatten(1).sum(1), -fd, rtol=2e-2, atol=1e-6)
    assert (brightness(v_old - 0.5 * v.grad / v.grad.norm()) > brightness(v_old)).all()


@pytest.mark.parametrize("change, key", [({"rtdmd": {"train_range": [0, 3]}}, "train_range"),
                                         ({"rtdmd": {"train_range": [1, 2], "train_steps": 3}}, "train_steps"),
                                         ({"rtdmd": {"backprop": {"reward": "pickscore"}}}, "backprop.reward"),
                                         ({"rewards": []}, "rewards")])
def test_config_errors_name_the_key(tiny_assets, tmp_path, change, key):
    raw = {**tiny_config_dict(tiny_assets, tmp_path, config="tiny_rtdmd.yaml"), **change}
    with pytest.raises(ConfigError, match=key):
        validate(RTDMDConfig, raw, "job.yaml")


@pytest.mark.parametrize("cls", ["CLIPScore", "PickScore"])
def test_clip_rewards_differentiable_form_matches_their_score(clip_dir, cls):
    """The torch preprocessing (bicubic resize, centre crop, normalisation) gives the processor's score up to
    resampling differences, with a gradient on the pixels (the released reward back-propagation's rewards)."""
    from rewards import clip
    reward = getattr(clip, cls)(str(clip_dir), device="cpu")
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(4, 12, 16, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # 48 x 64: a resize and a crop, smooth enough
    prompts = ["a red cube", "two dogs", "blue", "a cat"]
    expected = next(iter(reward.score(images, prompts, [{}] * 4).values()))
    t = torch.as_tensor(images, dtype=torch.float32).permute(0, 3, 1, 2).div(255).requires_grad_(True)
    got = reward.differentiable(t, prompts, [{}] * 4)
    scale = reward.model.logit_scale.exp().item() if reward.scale else 1.0
    np.testing.assert_allclose(got.detach().numpy(), expected, atol=0.03 * scale)
    assert np.corrcoef(got.detach().numpy(), expected)[0, 1] > 0.9
    got.sum().backward()
    assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_preflight_refuses_a_reward_without_a_differentiable_form(tiny_assets, tmp_path):
    from pipelines.preflight import preflight
    raw = tiny_config_dict(tiny_assets, tmp_path, config="tiny_rtdmd.yaml")
    raw["rewards"] = [{"name": "contrast", "num_cpus": 0.25}]
    raw["rtdmd"]["backprop"]["reward"] = "contrast"
    with pytest.raises(ConfigError, match="rtdmd.backprop.reward: reward 'contrast'"):
        preflight(validate(RTDMDConfig, raw, "job.yaml"))
    raw["rtdmd"]["backprop"] = None
    assert preflight(validate(RTDMDConfig, raw, "job.yaml"))  # GRPO and DMD alone need no differentiable reward
