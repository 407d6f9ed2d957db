"""The paired, prompt-stratified bootstrap against its closed-form variance."""
import numpy as np
import pytest

from flowopd.stats import bootstrap_mean, verdict


def _data(seed=0):
    rng = np.random.default_rng(seed)
    strata = np.repeat(np.arange(12), 20)
    values = rng.normal(size=len(strata)) * (1 + strata % 3) + strata  # prompt means and spreads differ
    return values, strata


def test_half_width_matches_the_stratified_closed_form():
    """Resampling within strata: Var(mean) = sum_s n_s var_s / N^2 (population variances)."""
    values, strata = _data()
    est = bootstrap_mean(values, strata, n_boot=20000)
    var = sum((strata == s).sum() * values[strata == s].var() for s in np.unique(strata)) / len(values) ** 2
    assert est.mean == pytest.approx(values.mean())
    assert est.half_width == pytest.approx(1.96 * np.sqrt(var), rel=0.05)
    # between-prompt spread does not enter: the prompts are the fixed benchmark
    assert est.half_width < 0.7 * 1.96 * values.std() / np.sqrt(len(values))


def test_average_over_groups_is_the_mean_of_group_means():
    values, strata = _data(1)
    groups = np.where(strata < 4, "a", "b")  # 80 and 160 samples: unweighted average of the two means
    est = bootstrap_mean(values, strata, groups, n_boot=20000)
    assert est.mean == pytest.approx((values[groups == "a"].mean() + values[groups == "b"].mean()) / 2)

    def var_of_mean(m):
        v, s = values[m], strata[m]
        return sum((s == k).sum() * v[s == k].var() for k in np.unique(s)) / len(v) ** 2
    want = 1.96 * np.sqrt((var_of_mean(groups == "a") + var_of_mean(groups == "b")) / 4)
    assert est.half_width == pytest.approx(want, rel=0.05)


def test_verdicts_follow_the_interval():
    values, strata = _data(2)
    shifted = bootstrap_mean(values - values.mean() + 1.0, strata)
    centred = bootstrap_mean(values - values.mean(), strata)
    assert shifted.excludes_zero() and "higher" in verdict(shifted, "x")
    assert not centred.excludes_zero() and "not shown" in verdict(centred, "x")
    assert bootstrap_mean(np.zeros(10), np.arange(10)).half_width == 0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one stratum per value"):
        bootstrap_mean(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean(np.array([1.0, np.nan]), np.zeros(2))


def test_a_constant_has_a_point_interval():
    est = bootstrap_mean(np.full(18, 1 / 3), np.repeat(np.arange(3), 6))
    assert est.lo <= est.mean <= est.hi and est.hi - est.lo < 1e-12
