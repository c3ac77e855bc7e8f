"""The tiny toy problem behind the samplers' exact tests, and the goodness-of-fit checks they share.

a is a random tabular ARM over 3 tokens, 4 positions, EOS = 0 (31 valid sequences); a′ is the exact ARM of
the mixture (a + c) / 2 with c another random ARM, so P/a′ <= 2 and importance weights stay bounded; b holds
on 16 sequences. Everything exact is computed in float64 on the grid.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
import pytest
from scipy import stats

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, arm_from_law, exact_constraint, exact_log_prob, log_gold
from guard_jax.lm import LM
from guard_jax.models.toy import TabularARM

V, T = 3, 4


class Toy(NamedTuple):
    a: LM
    a2: LM
    constraint: C.Constraint
    space: SequenceSpace
    log_a: np.ndarray
    log_a2: np.ndarray
    b: np.ndarray
    log_g: np.ndarray

    @property
    def log_p(self) -> np.ndarray:
        return np.where(self.b, self.log_a, -np.inf)

    @property
    def ratio(self) -> np.ndarray:
        """P(y) / a′(y) on the grid (0 where P = 0)."""
        return np.where(self.b, np.exp(self.log_a - np.where(self.b, self.log_a2, 0.0)), 0.0)

    def index(self, tokens_NT) -> np.ndarray:
        return self.space.index(tokens_NT)


def toy(seed: int = 0) -> Toy:
    model = TabularARM(V, T, eos_id=0)
    key_a, key_a2 = jax.random.split(jax.random.PRNGKey(seed))
    params_a, params_c = model.init(key_a, 1.0), model.init(key_a2, 1.0)
    constraint = C.contains_ngram([2, 2]) | C.contains_ngram([1, 1, 1])
    space = SequenceSpace.of(model, T)
    with jax.enable_x64(True):
        log_a = np.asarray(exact_log_prob(model, params_a, T), np.float64)
        log_c = np.asarray(exact_log_prob(model, params_c, T), np.float64)
        model2, params_a2 = arm_from_law(space, np.logaddexp(log_a, log_c) - np.log(2.0))
        log_a2 = np.asarray(exact_log_prob(model2, params_a2, T), np.float64)
    params_a2 = jax.tree.map(lambda x: np.asarray(x, np.float32), params_a2)
    b = exact_constraint(space, constraint)
    return Toy(LM.of(model, params_a), LM.of(model2, params_a2), constraint, space, log_a, log_a2, b, log_gold(log_a, b))


def chi_square_p(index_N, probs) -> float:
    """Pearson chi-square p-value of grid indices against a law, the rarest cells pooled to expect >= 5."""
    support = np.flatnonzero(probs > 0)
    if np.any(~np.isin(index_N, support)):
        return 0.0
    counts = np.bincount(index_N, minlength=probs.size)[support]
    expected = probs[support] / probs[support].sum() * len(index_N)
    bins_o, bins_e, o, e = [], [], 0, 0.0
    for i in np.argsort(expected):
        o, e = o + counts[i], e + expected[i]
        if e >= 5:
            bins_o.append(o), bins_e.append(e)
            o, e = 0, 0.0
    bins_o[-1] += o
    bins_e[-1] += e
    return float(stats.chisquare(bins_o, bins_e).pvalue)


def weighted_fit_p(index_RN, log_w_RN, log_p, min_hits: float = 100.0) -> float:
    """Does E[sum_i w_i 1[y_i in bin]] = P(bin) hold for every bin? (R independent runs of N weighted particles.)

    Bins pool the support of the unnormalised target P (a grid of log values) in increasing order of P until
    each holds P/Z >= min_hits / (R N), so rare cells do not make the test statistic non-normal. X_rk =
    sum_i w_ri 1[y_ri in bin k]; Hotelling's T^2 of the R rows against P(bin), p-value from F(K, R - K).
    Particles off the support must carry no weight (returns 0 if any does)."""
    w_RN = np.exp(np.asarray(log_w_RN, np.float64))
    R, N = w_RN.shape
    p = np.exp(np.asarray(log_p, np.float64))
    support = np.flatnonzero(p > 0)
    if np.any(~np.isin(index_RN, support) & (w_RN > 0)):
        return 0.0
    bin_of = np.full(p.size, -1)
    k, mass = 0, 0.0
    for i in support[np.argsort(p[support])]:
        bin_of[i], mass = k, mass + p[i] / p.sum()
        if mass >= min_hits / (R * N):
            k, mass = k + 1, 0.0
    if mass > 0:
        bin_of[bin_of == k] = k - 1
    K = int(bin_of.max()) + 1
    cell_RN = bin_of[index_RN]
    X_RK = np.stack([np.sum(w_RN * (cell_RN == j), axis=1) for j in range(K)], axis=1)
    target_K = np.array([p[bin_of == j].sum() for j in range(K)])
    d_K = X_RK.mean(0) - target_K
    S_KK = np.atleast_2d(np.cov(X_RK, rowvar=False))
    t2 = R * d_K @ np.linalg.solve(S_KK, d_K)
    f = t2 * (R - K) / (K * (R - 1))
    return float(stats.f.sf(f, K, R - K))


def check_unbiased_and_properly_weighted(problem: Toy, out, runs: int, particles: int) -> None:
    """A weighted sampler's result of `runs` runs: mean Ẑ within 4 s.e. of Z, weights of a run summing to its Ẑ,
    zero weight wherever b fails, and `weighted_fit_p` > 1e-3."""
    z = math.exp(np.logaddexp.reduce(problem.log_p))
    z_runs = np.exp(out.info["log_z_runs"])
    se = z_runs.std(ddof=1) / math.sqrt(runs)
    assert abs(z_runs.mean() - z) < 4 * se, f"mean Ẑ {z_runs.mean():.5f} vs Z {z:.5f} (s.e. {se:.5f})"
    assert math.exp(out.log_z) == pytest.approx(z_runs.mean(), rel=1e-5)
    # the weights of each run sum to its Ẑ
    w_RN = np.exp(out.log_weights_N.reshape(runs, particles))
    np.testing.assert_allclose(w_RN.sum(1), z_runs, rtol=1e-4)
    assert np.all(out.satisfied_N | (w_RN.reshape(-1) == 0))
    index = problem.index(out.tokens_NT).reshape(runs, particles)
    p_value = weighted_fit_p(index, out.log_weights_N.reshape(runs, particles), problem.log_p)
    assert p_value > 1e-3
