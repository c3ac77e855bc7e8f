"""Monte-Carlo estimates of Z, AR, KL(g||a'), KL(g||g'), KL(g'||g) and importance-sampling Z, with CIs.

The estimators are those of the paper's code: samples of g are b-filtered samples of a, samples of g'
are b-filtered samples of a'. With N_a draws from a (k_a accepted) and N_a' draws from a' (k_a' accepted):

    Z = k_a / N_a,  AR_a' = k_a' / N_a'
    KL(g||a)   = -log Z,  AR gain = AR_a' / Z
    KL(g||a')  = mean_{y~g}[log a(y) - log a'(y)] - log Z
    KL(g||g')  = KL(g||a') + log AR_a'                         (Theorem 2)
    KL(g'||g)  = mean_{y~g'}[log a'(y) - log a(y)] - log AR_a' + log Z

Proportions get Wilson intervals; everything else a delta-method normal interval, adding the variances
of independent parts (the mean term and each log-proportion, Var log p_hat ~ (1 - p) / (N p)).
The exact twins are in `guard_jax.exact`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats


class Estimate(NamedTuple):
    """A point estimate with a two-sided confidence interval [lo, hi] at `level`; `n` samples used."""

    value: float
    lo: float
    hi: float
    level: float
    n: int

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.lo:.4g}, {self.hi:.4g}]"


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(stats.norm.ppf(0.5 + level / 2))


def _check_counts(k: int, n: int, what: str) -> None:
    if n <= 0:
        raise ValueError(f"{what}: the number of draws must be > 0, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"{what}: accepted count must be in [0, {n}], got {k}")


def wilson(k: int, n: int, level: float = 0.95) -> Estimate:
    """Wilson score interval for a binomial proportion k / n."""
    _check_counts(k, n, "wilson")
    z, p = _z(level), k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return Estimate(p, lo, hi, level, n)


def log_proportion_var(k: int, n: int) -> float:
    """Delta-method variance of log(k / n) for a binomial proportion: (1 - p) / (n p)."""
    p = k / n
    return (1 - p) / (n * p)


def normal_interval(value: float, var: float, level: float, n: int) -> Estimate:
    """A symmetric normal interval value ± z_level * sqrt(var)."""
    half = _z(level) * math.sqrt(max(var, 0.0))
    return Estimate(value, value - half, value + half, level, n)


def _mean_and_var(x) -> tuple[float, float, int]:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"need a 1-D array of at least 2 log-prob differences, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("log-prob differences contain inf/NaN: a sample of g has zero probability under a proposal")
    return float(x.mean()), float(x.var(ddof=1) / x.size), int(x.size)


def estimate_ar(accepted: int, draws: int, level: float = 0.95) -> Estimate:
    """AR (and Z = AR_a) from counts, with a Wilson interval."""
    return wilson(accepted, draws, level)


def estimate_kl_g_a2(logp_a_G, logp_a2_G, accepted_a: int, draws_a: int, level: float = 0.95) -> Estimate:
    """KL(g||a') from g-samples (b-filtered a-samples) scored by a and a', and the counts that give Z."""
    _check_counts(accepted_a, draws_a, "estimate_kl_g_a2")
    mean, var, n = _mean_and_var(np.asarray(logp_a_G) - np.asarray(logp_a2_G))
    value = mean - math.log(accepted_a / draws_a)
    return normal_interval(value, var + log_proportion_var(accepted_a, draws_a), level, n)


def estimate_kl_g_a(z: Estimate) -> Estimate:
    """KL(g||a) = -log Z from an estimate of Z (its interval mapped through -log, so lo and hi swap)."""
    if not z.value > 0:
        raise ValueError(f"KL(g||a) = -log Z needs Z > 0, got the estimate {z}: no sample of a satisfied b; draw more samples of a")
    return Estimate(-math.log(z.value), -math.log(z.hi), -math.log(max(z.lo, 1e-300)), z.level, z.n)


def estimate_ar_gain(accepted_a: int, draws_a: int, accepted_a2: int, draws_a2: int, level: float = 0.95) -> Estimate:
    """AR_a' / AR_a = AR_a' / Z from independent counts: a normal interval on the log ratio, exponentiated."""
    _check_counts(accepted_a, draws_a, "estimate_ar_gain (a)")
    _check_counts(accepted_a2, draws_a2, "estimate_ar_gain (a')")
    if accepted_a == 0 or accepted_a2 == 0:
        raise ValueError(f"estimate_ar_gain needs accepted samples of both a and a', got {accepted_a} and {accepted_a2}; draw more")
    log_gain = math.log(accepted_a2 / draws_a2) - math.log(accepted_a / draws_a)
    var = log_proportion_var(accepted_a, draws_a) + log_proportion_var(accepted_a2, draws_a2)
    on_log = normal_interval(log_gain, var, level, draws_a + draws_a2)
    return Estimate(math.exp(on_log.value), math.exp(on_log.lo), math.exp(on_log.hi), level, draws_a + draws_a2)


def estimate_kl_g_g2_from(kl_g_a2: Estimate, accepted_a2: int, draws_a2: int, level: float = 0.95) -> Estimate:
    """KL(g||g') = KL(g||a') + log AR_a' (Theorem 2) from an estimate of KL(g||a') (a normal interval at
    `level`) and independent a'-draws; the variances add."""
    _check_counts(accepted_a2, draws_a2, "estimate_kl_g_g2_from")
    if accepted_a2 == 0:
        raise ValueError(f"estimate_kl_g_g2_from needs accepted samples of a' (log AR_a'), got 0 of {draws_a2}; draw more")
    var = ((kl_g_a2.hi - kl_g_a2.value) / _z(kl_g_a2.level)) ** 2 + log_proportion_var(accepted_a2, draws_a2)
    return normal_interval(kl_g_a2.value + math.log(accepted_a2 / draws_a2), var, level, kl_g_a2.n)


def estimate_kl_g_g2(
    logp_a_G, logp_a2_G, accepted_a: int, draws_a: int, accepted_a2: int, draws_a2: int, level: float = 0.95
) -> Estimate:
    """KL(g||g') = KL(g||a') + log AR_a' (Theorem 2), AR_a' from independent a'-draws."""
    _check_counts(accepted_a2, draws_a2, "estimate_kl_g_g2")
    return estimate_kl_g_g2_from(estimate_kl_g_a2(logp_a_G, logp_a2_G, accepted_a, draws_a, level), accepted_a2, draws_a2, level)


def estimate_kl_g2_g(
    logp_a2_G2, logp_a_G2, accepted_a2: int, draws_a2: int, accepted_a: int, draws_a: int, level: float = 0.95
) -> Estimate:
    """KL(g'||g) from g'-samples (b-filtered a'-samples) scored by a' and a, and both sets of counts."""
    _check_counts(accepted_a2, draws_a2, "estimate_kl_g2_g")
    _check_counts(accepted_a, draws_a, "estimate_kl_g2_g")
    mean, var, n = _mean_and_var(np.asarray(logp_a2_G2) - np.asarray(logp_a_G2))
    value = mean - math.log(accepted_a2 / draws_a2) + math.log(accepted_a / draws_a)
    var += log_proportion_var(accepted_a2, draws_a2) + log_proportion_var(accepted_a, draws_a)
    return normal_interval(value, var, level, n)


class ISEstimate(NamedTuple):
    """log Z by importance sampling, with its CI (on log Z) and the effective sample size."""

    log_z: Estimate
    ess: float


def estimate_log_z_is(log_target_N, log_proposal_N, level: float = 0.95) -> ISEstimate:
    """log Z = log mean_q[P/q] for an unnormalised target P (log P = -inf allowed) and samples of q.

    Computed in log space (no underflow); CI by the delta method on the mean weight; ESS = (sum w)^2 / sum w^2.
    """
    log_w = np.asarray(log_target_N, np.float64) - np.asarray(log_proposal_N, np.float64)
    if log_w.ndim != 1 or log_w.size < 2:
        raise ValueError(f"need at least 2 samples, got shape {log_w.shape}")
    if np.any(np.isnan(log_w)) or np.any(log_w == np.inf):
        raise ValueError("log weights contain NaN or +inf: the proposal gives zero probability to its own samples")
    n = log_w.size
    m = log_w.max()
    if m == -np.inf:
        raise ValueError("every importance weight is 0 (the target is 0 on all samples): log Z cannot be estimated")
    w = np.exp(log_w - m)
    mean_w = w.mean()
    rel_var = w.var(ddof=1) / n / mean_w**2
    ess = float(w.sum() ** 2 / np.sum(w**2))
    return ISEstimate(normal_interval(m + math.log(mean_w), rel_var, level, n), ess)
