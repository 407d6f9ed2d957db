"""Flow-GRPO advantages, ratio, clipping and KL against hand-computed values; the reward registry."""
import textwrap

import numpy as np
import pytest
import torch

from flowopd.config import ConfigError, GRPOConfig
from flowopd.grpo import ema_decay_at, ema_update, group_advantages, grpo_loss, informative_groups
from pipelines.preflight import check_reward_specs
from rewards import RewardError, load_reward_class, make_reward
from rewards.base import check_outputs


def test_group_advantages_use_prompt_mean_and_global_std():
    r = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, np.nan])
    g = np.array([0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(r, g)
    std = np.std([1, 2, 3, 5, 5, 5])
    np.testing.assert_allclose(adv[:3], np.array([-1, 0, 1]) / (std + 1e-4))
    np.testing.assert_allclose(adv[3:6], 0)
    assert np.isnan(adv[6])
    assert informative_groups(adv, g).tolist() == [True] * 3 + [False] * 4
    big = group_advantages(np.r_[np.zeros(99), 100.0], np.zeros(100, int))  # z = 9.95 before clipping
    assert big.max() == 5.0  # clipped


def test_grpo_loss_ratio_clip_and_kl_by_hand():
    x = torch.zeros(2, 1, 1, 2)
    v = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    v_ref = torch.zeros_like(v)
    sigma, sigma_next, std = 0.5, 0.4, 0.5
    dt = sigma_next - sigma
    c = 1 + std ** 2 * (1 - sigma) / (2 * sigma)
    mean = v * c * dt  # x = 0
    scale = std * abs(dt) ** 0.5
    x_next = mean.clone()
    logp_at_mean = -np.log(scale) - 0.5 * np.log(2 * np.pi)
    logp_old = torch.full((2,), logp_at_mean) - torch.tensor([0.0, 0.5])  # ratios 1 and e^0.5
    adv = torch.tensor([2.0, 2.0])
    loss, ratio, kl = grpo_loss(v, v_ref, x, x_next, logp_old, adv, sigma, sigma_next, std, clip_range=0.2, beta=0.1)
    np.testing.assert_allclose(ratio.numpy(), [1.0, np.exp(0.5)], rtol=1e-5)
    kl_hand = ((c * dt) ** 2 / (2 * std ** 2), 0.0)  # ||mu - mu_ref||^2 / (2 std^2), mean over dims
    np.testing.assert_allclose(kl.numpy(), kl_hand, rtol=1e-5, atol=1e-8)
    # A > 0: max(-A r, -A clip(r)) picks the clipped ratio 1.2 for the second sample
    np.testing.assert_allclose(loss.detach().numpy(), [-2.0 + 0.1 * kl_hand[0], -2.0 * 1.2], rtol=1e-5)


def test_registry_builtin_file_and_errors(tmp_path):
    assert make_reward("brightness").outputs == ("brightness",)
    assert load_reward_class("rewards.simple:Contrast").__name__ == "Contrast"
    f = tmp_path / "my_reward.py"
    f.write_text(textwrap.dedent("""
        import numpy as np
        class Redness:
            def __init__(self, scale=1.0):
                self.scale = scale
            def __call__(self, images, prompts, metadata):
                return {"red": self.scale * images[..., 0].mean(axis=(1, 2)) / 255.0}
    """))
    red = make_reward(f"{f}:Redness", {"scale": 2.0})
    imgs = np.zeros((3, 4, 4, 3), np.uint8)
    imgs[..., 0] = 255
    np.testing.assert_allclose(red(imgs, [""] * 3, [{}] * 3)["red"], 2.0)
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        load_reward_class("nope")
    with pytest.raises(RewardError, match="cannot load reward 'rewards.simple:Missing'"):
        load_reward_class("rewards.simple:Missing")
    cfg = GRPOConfig.model_validate({"output_dir": "x", "model": {"base": "b"},
                                     "data": {"sources": [{"path": "p", "format": "txt", "task": "t"}]},
                                     "rewards": [{"name": "brightness", "kwargs": {"colour": 1}}]})
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.kwargs: .*colour"):
        check_reward_specs(cfg.rewards)


def test_reward_outputs_are_checked():
    with pytest.raises(RewardError, match="reward 'r' output 'score' has 2 values for 3 images"):
        check_outputs("r", {"score": [1, 2]}, 3)
    with pytest.raises(RewardError, match="reward 'r' returned list"):
        check_outputs("r", [1, 2, 3], 3)
    assert np.isnan(check_outputs("r", {"s": [1, np.nan, 2]}, 3)["s"][1])


def test_merging_worker_scores_where_a_worker_had_no_prompt_of_a_task():
    from actors.reward import RewardPools
    a = {"comp": {"comp": np.array([0.5, 1.0]), "strict": np.array([0.0, 1.0])}}
    b = {"style": {"style": np.array([0.3])}}
    merged = RewardPools.merge([a, b], [2, 1])
    assert list(merged["comp"]) == ["comp", "strict"]
    np.testing.assert_array_equal(merged["comp"]["comp"], [0.5, 1.0, np.nan])
    np.testing.assert_array_equal(merged["style"]["style"], [np.nan, np.nan, 0.3])


def test_ema_follows_flow_grpo_schedule():
    """decay min((1+s)/(10+s), 0.9): 0.5 at s=8, 0.9 from s=80 on; an update is the convex combination."""
    assert ema_decay_at(8, 0.9) == pytest.approx(9 / 18)
    assert ema_decay_at(16, 0.9) == pytest.approx(17 / 26)
    assert ema_decay_at(79, 0.9) == pytest.approx(80 / 89)
    assert ema_decay_at(80, 0.9) == pytest.approx(0.9) and ema_decay_at(5000, 0.9) == pytest.approx(0.9)
    ema, new = {"w": np.zeros(3)}, {"w": np.ones(3)}
    np.testing.assert_allclose(ema_update(ema, new, 8, 0.9)["w"], 0.5)
    # three updates every 8 steps from zero towards a constant 1: 1 - prod(d_s)
    for s in (8, 16, 24):
        ema = ema_update(ema, new, s, 0.9)
    np.testing.assert_allclose(ema["w"], 1 - (9 / 18) * (17 / 26) * (25 / 34))
