"""Confidence intervals for evaluation claims: a paired bootstrap over the same prompts and seeds.

Evaluation draws `k` seeds for every held-out prompt and every model sees the same (prompt, seed) pairs.
The prompt set is fixed (it is the benchmark), so the bootstrap resamples seeds *within* each prompt
(stratified), with the same draws for both models of a comparison: the interval is for the difference
of the two models on these prompts, not for a population of prompts.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def _strata_index(strata: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(strata, return_inverse=True)
    return [np.nonzero(inverse == s)[0] for s in range(inverse.max() + 1)]


def _replicates(values: np.ndarray, strata: np.ndarray, rng, n_boot: int) -> np.ndarray:
    """n_boot bootstrap means of `values`, resampling within each stratum."""
    total = np.zeros(n_boot)
    for idx in _strata_index(strata):
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        total += values[idx][draws].sum(1)
    return total / len(values)


def _check(values, strata, groups=None):
    values, strata = np.asarray(values, dtype=np.float64), np.asarray(strata)
    groups = np.zeros(len(values), int) if groups is None else np.asarray(groups)
    if not len(values) == len(strata) == len(groups) or len(values) == 0:
        raise ValueError(f"bootstrap needs one stratum per value and at least one value "
                         f"(got {len(values)} values, {len(strata)} strata, {len(groups)} groups)")
    if not np.isfinite(values).all():
        raise ValueError("bootstrap values must be finite (drop unscored samples first)")
    return values, strata, groups


def bootstrap_mean(values, strata, groups=None, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> Estimate:
    """Mean of `values` with a percentile interval from resampling within each stratum (prompt).

    With `groups` (e.g. each sample's task) the statistic is the unweighted average of the group means,
    like a table's "average" column. For a paired comparison pass per-sample differences of two models."""
    values, strata, groups = _check(values, strata, groups)
    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    boots = np.mean([_replicates(values[groups == g], strata[groups == g], rng, n_boot) for g in names], 0)
    point = float(np.mean([values[groups == g].mean() for g in names]))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    # when every draw is the same number, summation order alone can put it an ulp beside the point
    return Estimate(point, min(float(lo), point), max(float(hi), point), len(values))


def verdict(est: Estimate, what: str) -> str:
    """'shown' only when the interval excludes 0."""
    if not est.excludes_zero():
        return f"{what}: not shown ({est}, 95% CI includes 0)"
    return f"{what}: {'higher' if est.mean > 0 else 'lower'}, {est} (95% CI excludes 0)"
