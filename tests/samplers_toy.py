"""The tiny toy problem behind the samplers' exact tests, and the goodness-of-fit checks they share.

a and a′ are random tabular ARMs over 3 tokens, 4 positions, EOS = 0 (31 valid sequences); b holds on 16 of
them (Z ≈ 0.115, AR_a′ ≈ 0.217, max P/a′ ≈ 14). Everything exact is computed in float64 on the grid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from scipy import stats

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, log_gold
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
    params_a, params_a2 = model.init(key_a, 1.0), model.init(key_a2, 1.0)
    constraint = C.contains_ngram([2, 2]) | C.contains_ngram([1, 1, 1])
    space = SequenceSpace.of(model, T)
    with jax.enable_x64(True):
        log_a = np.asarray(exact_log_prob(model, params_a, T), np.float64)
        log_a2 = np.asarray(exact_log_prob(model, params_a2, T), np.float64)
    b = exact_constraint(space, constraint)
    return Toy(LM.of(model, params_a), LM.of(model, params_a2), constraint, space, log_a, log_a2, b, log_gold(log_a, b))


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


def weighted_fit_p(index_RN, log_w_RN, target_K: np.ndarray, support_K: np.ndarray) -> float:
    """Does E[sum_i w_i 1[y_i = y]] = target(y) hold for every y of the support? (R independent runs.)

    X_rk = sum_i w_ri 1[y_ri = k]; Hotelling's T^2 of the R rows against target_K, its p-value from
    F(K, R - K). Cells outside the support must carry no weight (returns 0 if they do)."""
    w_RN = np.exp(np.asarray(log_w_RN, np.float64))
    R = w_RN.shape[0]
    off = ~np.isin(index_RN, support_K) & (w_RN > 0)
    if off.any():
        return 0.0
    X_RK = np.stack([np.sum(w_RN * (index_RN == k), axis=1) for k in support_K], axis=1)
    d_K = X_RK.mean(0) - target_K
    S_KK = np.cov(X_RK, rowvar=False)
    K = len(support_K)
    t2 = R * d_K @ np.linalg.solve(S_KK, d_K)
    f = t2 * (R - K) / (K * (R - 1))
    return float(stats.f.sf(f, K, R - K))
