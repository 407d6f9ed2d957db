"""Rollout schedules: Flow-GRPO-Fast's SDE window and same_latent, against hand-written samplers."""
import numpy as np
import pytest
import torch

from flowopd.config import EvalSampling, SamplingConfig
from flowopd.flow import gaussian_logprob, sde_std, shifted_sigmas, transition_mean, transition_scale
from flowopd.models import build_random_pipeline, encode_prompts, velocity
from flowopd.rollout import initial_generators, sample_generators, sample_trajectories, sde_schedule


@pytest.fixture(scope="module")
def tiny():
    pipe = build_random_pipeline("tiny", seed=0)
    e, p = encode_prompts(pipe, ["a red square", "a sign"], 16)
    neg = encode_prompts(pipe, [""], 16)
    return pipe.transformer, e, p, neg


def test_schedule_without_window_trains_the_leading_fraction():
    sc = SamplingConfig(num_steps=10, train_timestep_fraction=0.3)
    assert sde_schedule(10, sc, 0, 1) == (list(range(10)), [0, 1, 2])


def test_window_is_shared_by_workers_varies_by_step_and_stays_in_range():
    sc = SamplingConfig(num_steps=10, sde_window_size=2, sde_window_range=(1, 6))
    starts = set()
    for step in range(1, 60):
        stochastic, trained = sde_schedule(10, sc, 3, step)
        assert stochastic == trained == [stochastic[0], stochastic[0] + 1]
        assert 1 <= stochastic[0] and stochastic[-1] < 6
        assert sde_schedule(10, sc, 3, step) == (stochastic, trained)  # any worker, same window
        starts.add(stochastic[0])
    assert starts == {1, 2, 3, 4}


@pytest.mark.parametrize("bad", [{"sde_window_size": 3, "sde_window_range": (0, 2)},
                                 {"sde_window_range": (4, 4)}, {"sde_window_range": (0, 11)}])
def test_bad_windows_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="sde_window"):
        SamplingConfig(num_steps=10, **bad)
    with pytest.raises(ValueError, match="same_latent"):
        EvalSampling(same_latent=True)


def _reference_sampler(model, e, p, neg, sigmas, a, stochastic, init_noise, step_noise, g):
    """The sampler written out: Euler-Maruyama on the stochastic steps, Euler elsewhere."""
    std = sde_std(sigmas, a)
    x, states, logps = init_noise.clone(), [], []
    for j in range(len(sigmas) - 1):
        v = velocity(model, x, sigmas[j], e, p, *neg, g)
        s, s1 = sigmas[j].item(), sigmas[j + 1].item()
        if j in stochastic:
            mean = transition_mean(x, v, s, s1, std[j].item())
            x_next = mean + transition_scale(s, s1, std[j].item()) * step_noise[j]
            logps.append(gaussian_logprob(x_next, mean, transition_scale(s, s1, std[j].item())))
        else:
            x_next = x + (s1 - s) * v
        states.append(x)
        x = x_next
    return states, logps, x


@torch.no_grad()
def test_windowed_same_latent_rollout_matches_the_written_out_sampler(tiny):
    model, e, p, neg = tiny
    G, sigmas, shape = 3, shifted_sigmas(6, 3.0), (4, 8, 8)
    ids = np.arange(2 * G)  # two prompts, G samples each
    pe, pp = e[ids // G], p[ids // G]
    window = [2, 3]
    states, nexts, logps, final = sample_trajectories(
        model, pe, pp, *neg, sigmas, 0.7, 3.0, shape, sample_generators(5, 7, ids, "cpu"), window,
        stochastic_steps=window, init_gens=initial_generators(5, 7, ids, G, True, "cpu"))
    assert states.shape == (2, 2 * G, *shape) and logps.shape == (2, 2 * G)
    init = torch.stack([torch.randn(shape, generator=g) for g in initial_generators(5, 7, ids, G, True, "cpu")])
    assert torch.equal(init[0], init[G - 1]) and not torch.equal(init[0], init[G])  # shared within a group only
    gens = sample_generators(5, 7, ids, "cpu")
    step_noise = {j: torch.stack([torch.randn(shape, generator=g) for g in gens]) for j in window}
    ref_states, ref_logps, ref_final = _reference_sampler(model, pe, pp, neg, sigmas, 0.7, window, init,
                                                          step_noise, 3.0)
    for k, j in enumerate(window):
        torch.testing.assert_close(states[k], ref_states[j])
        torch.testing.assert_close(nexts[k], ref_states[j + 1])
        torch.testing.assert_close(logps[k], ref_logps[k])
    torch.testing.assert_close(final, ref_final)
    # before the window the group's states are one deterministic path; the window makes them differ
    assert torch.allclose(states[0][0], states[0][1]) and not torch.allclose(final[0], final[1])


@torch.no_grad()
def test_default_rollout_is_the_full_sde_from_each_samples_own_noise(tiny):
    model, e, p, neg = tiny
    sigmas, shape, ids = shifted_sigmas(5, 3.0), (4, 8, 8), np.arange(2)
    states, _, logps, final = sample_trajectories(model, e, p, *neg, sigmas, 0.7, 3.0, shape,
                                                  sample_generators(0, 1, ids, "cpu"), [0, 1])
    gens = sample_generators(0, 1, ids, "cpu")
    init = torch.stack([torch.randn(shape, generator=g) for g in gens])
    step_noise = {j: torch.stack([torch.randn(shape, generator=g) for g in gens]) for j in range(5)}
    ref_states, ref_logps, ref_final = _reference_sampler(model, e, p, neg, sigmas, 0.7, range(5), init,
                                                          step_noise, 3.0)
    assert states.shape[0] == 2
    torch.testing.assert_close(states[1], ref_states[1])
    torch.testing.assert_close(logps[1], ref_logps[1])
    torch.testing.assert_close(final, ref_final)


@torch.no_grad()
def test_ode_rollouts_draw_no_step_noise(tiny):
    """DiffusionOPD's deterministic rollouts: each sample's generator gives its initial noise and nothing
    more, and no transition log-prob is computed (all zero)."""
    model, e, p, neg = tiny
    ids, shape = np.arange(2), (4, 8, 8)
    gens = sample_generators(0, 1, ids, "cpu")
    states, _, logps, _ = sample_trajectories(model, e, p, *neg, shifted_sigmas(5, 3.0), 0.0, 3.0, shape, gens,
                                              [0, 1, 2])
    fresh = sample_generators(0, 1, ids, "cpu")
    for g, f in zip(gens, fresh):
        torch.randn(shape, generator=f)  # the initial noise
        assert torch.equal(torch.randn(8, generator=g), torch.randn(8, generator=f))
    assert states.shape[0] == 3 and not logps.any()
