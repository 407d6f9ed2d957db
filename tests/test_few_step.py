"""Few-step sampling: explicit timestep schedules, the CPS step, and an evaluation that samples each model
with its own sampler (a few-step generator beside the base at many steps) on the same paired noise."""
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from actors.sampler import Sampler, model_sampling
from flowopd.config import EvalConfig, EvalSampling, SamplingConfig
from flowopd.flow import cps_step, timestep_sigmas
from flowopd.models import save_random_model
from pipelines.evaluate import model_fingerprint, settings_fingerprint

FOUR = [1000, 750, 500, 250]


def test_timestep_sigmas_follow_the_shift_in_closed_form():
    u = torch.tensor(FOUR, dtype=torch.float64) / 1000
    assert torch.allclose(timestep_sigmas(FOUR, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.allclose(timestep_sigmas(FOUR, 3.0)[:-1].double(), 3 * u / (1 + 2 * u))


def test_cps_step_recovers_the_pair_behind_an_exact_velocity():
    """With v = eps - x0 of the point itself, x0_hat = x0 and eps_hat = eps, so the step is the formula."""
    g = torch.Generator().manual_seed(0)
    x0, eps, xi = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    s, s2, eta = 0.8, 0.35, 0.6
    x, v = (1 - s) * x0 + s * eps, eps - x0
    c, r = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
    out, mean, logp = cps_step(x, v, s, s2, eta, noise=xi)
    torch.testing.assert_close(out, (1 - s2) * x0 + s2 * (c * eps + r * xi))
    torch.testing.assert_close(mean, (1 - s2) * x0 + s2 * c * eps)
    assert logp.shape == (3,) and torch.isfinite(logp).all()
    torch.testing.assert_close(cps_step(x, v, s, 0.0, eta, noise=xi)[0], x0)  # sigma' = 0 lands on x0_hat

    before = (torch.get_rng_state(), g.get_state())
    det, det_mean, det_logp = cps_step(x, v, s, s2, 0.0, generator=g)
    assert torch.equal(torch.get_rng_state(), before[0]) and torch.equal(g.get_state(), before[1])  # drew nothing
    torch.testing.assert_close(det, (1 - s2) * x0 + s2 * eps)
    assert torch.equal(det, det_mean) and not det_logp.any()


@pytest.mark.parametrize("eta", [0.0, 0.9])
def test_cps_step_keeps_the_marginal_of_a_gaussian(eta):
    """x0 ~ N(m, S^2): a step from s to s' lands on the marginal N((1-s')m, (1-s')^2 S^2 + s'^2) when x0_hat,
    eps_hat are a posterior draw (a few-step generator's job). With the posterior-mean velocity E[eps - x0 | x]
    the mean still matches but the variance shrinks, to the closed form below."""
    n, m, S, s, s2 = 400_000, 0.5, 1.0, 0.8, 0.3
    g = torch.Generator().manual_seed(1)
    x0, eps, xi = m + S * torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    x = (1 - s) * x0 + s * eps
    out = cps_step(x, eps - x0, s, s2, eta, noise=xi)[0]
    assert abs(out.mean().item() - (1 - s2) * m) < 0.01
    assert out.var().item() == pytest.approx((1 - s2) ** 2 * S ** 2 + s2 ** 2, rel=0.02)

    mu, var = (1 - s) * m, (1 - s) ** 2 * S ** 2 + s ** 2  # the marginal at s
    a, b = (1 - s) * S ** 2 / var, s / var  # E[x0 | x] = m + a (x - mu), E[eps | x] = b (x - mu)
    v = b * (x - mu) - (m + a * (x - mu))
    out = cps_step(x, v, s, s2, eta, noise=xi)[0]
    c, r = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
    assert abs(out.mean().item() - (1 - s2) * m) < 0.01
    assert out.var().item() == pytest.approx(((1 - s2) * a + s2 * c * b) ** 2 * var + s2 ** 2 * r ** 2, rel=0.02)


def test_sampling_config_timesteps():
    assert SamplingConfig(timesteps=FOUR).num_steps == 4
    for bad in ([250, 500, 750, 1000], [1000, 500, 0], [1500, 500]):
        with pytest.raises(ValidationError, match="timesteps"):
            SamplingConfig(timesteps=bad)


def test_a_model_override_merges_over_the_evaluation_sampling():
    ev = EvalSampling(timesteps=[1000, 500])
    assert model_sampling(ev, None) is ev
    few = model_sampling(ev, {"num_steps": 4, "timesteps": None, "sampler": None, "noise_level": None})
    assert (few.num_steps, few.timesteps, few.sampler) == (4, None, "sde")  # the scheduler's 4 steps
    cps = model_sampling(ev, {"timesteps": FOUR, "sampler": "cps", "noise_level": 0.9})
    assert (cps.num_steps, cps.sampler, cps.noise_level, cps.guidance) == (4, "cps", 0.9, ev.guidance)
    for bad, key in (({"timesteps": [250, 500]}, "timesteps"), ({"sampler": "cps", "noise_level": 1.5}, "noise_level")):
        with pytest.raises(ValueError, match=key):
            model_sampling(ev, bad)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_random_model(str(tmp_path_factory.mktemp("few_step") / "base"))


def test_evaluation_samples_each_model_with_its_own_sampler(tiny_base):
    cfg = EvalConfig.model_validate({
        "output_dir": "unused", "model": {"base": tiny_base, "max_sequence_length": 16, "resolution": 16},
        "data": {"sources": [{"path": "unused.txt", "format": "txt"}]}, "rewards": [{"name": "brightness"}],
        "sampling": {"num_steps": 6},
        "models": {"base": {}, "base@4": {"sampling": {"num_steps": 4}},
                   "cps": {"sampling": {"timesteps": FOUR, "sampler": "cps", "noise_level": 0.9}}}})
    models = {name: m.model_dump() for name, m in cfg.models.items()}  # as evaluate() hands them to the Sampler
    sampler = Sampler(cfg.model, models, cfg.sampling, seed=3, batch_size=4, device="cpu")
    prompts, ids = ["a red cube", "a blue ball", "text"], [0, 1, 2]

    def run(name, **kw):
        return sampler.generate(name, prompts, ids, decode=False, **kw)

    base, four = run("base"), run("base@4")
    assert not np.allclose(base, four)
    assert np.array_equal(four, run("base", steps=4))  # the override is the scheduler's 4 steps
    assert np.array_equal(base, run("base@4", steps=6))  # steps= still replaces the schedule

    cps = run("cps")
    assert np.isfinite(cps).all() and not np.allclose(cps, four)
    assert np.array_equal(cps, run("cps"))  # same seed, same images
    assert not np.allclose(cps, run("cps", seed=4))  # the fresh CPS noise and the initial noise follow the seed

    prints = {name: model_fingerprint(spec) for name, spec in models.items()}
    assert len(set(prints.values())) == 3 and prints["base"] == "base/gNone"
    assert model_fingerprint(models["base"] | {"sampling": {"num_steps": None}}) == prints["base"]
    few = cfg.model_copy(update={"sampling": EvalSampling(num_steps=6, sampler="cps")})
    assert settings_fingerprint(few, []) != settings_fingerprint(cfg, [])  # the evaluation's own sampler counts
