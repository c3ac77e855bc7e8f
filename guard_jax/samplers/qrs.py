"""Quasi-rejection sampling (QRS, Eikema et al. 2022): rejection sampling from a′ with a bound β that may be too small.

Draw y ~ a′ and accept it with probability min(1, P(y) / (β a′(y))), P = a·b. The accepted samples follow

    q_β(y) = min(P(y), β a′(y)) / (β AR_β),    AR_β = E_a′[min(1, P(y) / (β a′(y)))] = sum_y min(P, β a′) / β.

Guarantees: every sample satisfies b (P = 0 elsewhere). The law is exact, q_β = g, once β >= max_y P(y)/a′(y)
(plain rejection sampling with bound β); below it, q_β is g clipped where P/a′ > β. As β falls, AR_β rises
(to AR_a′ as β -> 0, where q_β -> g′ = a′b / AR_a′, the GUARD law) and the distance to g grows; the
trade-off is exact on toy grids (`qrs_exact`). GUARD's appendix uses β = 0.05 and recommends β = Z.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from guard_jax.exact import log_gold
from guard_jax.lm import LM
from guard_jax.samplers.result import SamplerResult, check_positive, draw_sequences, log_target


def qrs(key: jax.Array, a: LM, a2: LM, constraint, num_samples: int, *, beta: float, max_new_tokens: int,
        batch_size: int = 1024, max_draws: int = 10**6) -> SamplerResult:
    """QRS with proposal a′ = `a2` toward g ∝ a·b: draws in batches of `batch_size` until `num_samples` are
    accepted or `max_draws` are spent (then it returns the samples accepted so far; `info["exhausted"]`).

    -> SamplerResult: equally weighted samples of q_β, acceptance_rate = accepted / drawn, log_z = the
    importance-sampling estimate log mean_a′[P/a′] over every draw (unbiased for Z before the log), model calls
    = draws (+ draws again when a′ is not a, to score them under a). info: `beta`, `draws`, `exhausted`,
    `clipped_fraction` (share of draws with P/a′ > β, where q_β departs from g)."""
    check_positive(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size, max_draws=max_draws)
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the bound on P/a′; exact once beta >= max P/a′), got {beta}")
    log_beta = math.log(beta)
    key_draw, key_u = jax.random.split(key)
    kept, log_w_all = [], []
    draws = calls = accepted = clipped = 0
    batch = 0
    while accepted < num_samples and draws < max_draws:
        n = min(batch_size, max_draws - draws)
        tokens, lengths, logp_a2 = draw_sequences(jax.random.fold_in(key_draw, batch), a2, n, max_new_tokens, batch_size)
        log_p, _, score_calls = log_target(a, a2, constraint, tokens, lengths, logp_a2, batch_size)
        log_w = log_p - logp_a2
        log_u = np.log(np.asarray(jax.random.uniform(jax.random.fold_in(key_u, batch), (n,), minval=1e-38)))
        ok = log_u < np.minimum(0.0, log_w - log_beta)
        kept.append((tokens[ok], lengths[ok]))
        log_w_all.append(log_w)
        draws, calls, accepted = draws + n, calls + n + score_calls, accepted + int(ok.sum())
        clipped += int(np.sum(log_w > log_beta))
        batch += 1
    tokens_NT = np.concatenate([t for t, _ in kept])[:num_samples]
    lengths_N = np.concatenate([n for _, n in kept])[:num_samples]
    log_w = np.concatenate(log_w_all)
    log_z = float(np.logaddexp.reduce(log_w) - math.log(len(log_w))) if np.any(np.isfinite(log_w)) else -math.inf
    return SamplerResult(
        "qrs", tokens_NT, lengths_N, None, np.ones(len(tokens_NT), bool), calls, draws, accepted / draws,
        float(len(tokens_NT)), log_z,
        {"beta": float(beta), "draws": draws, "exhausted": accepted < num_samples, "clipped_fraction": clipped / draws},
    )


class QRSExact(NamedTuple):
    """QRS at one β on a grid, exactly: log_law over the grid (-inf off its support), acceptance rate,
    TV(g, q_β), KL(g‖q_β) and KL(q_β‖g) in nats."""

    log_law: np.ndarray
    acceptance_rate: float
    tv: float
    kl_g_law: float
    kl_law_g: float


def _kl(log_p, log_q) -> float:
    support = np.isfinite(log_p)
    if np.any(support & ~np.isfinite(log_q)):
        return math.inf
    return float(np.sum(np.exp(log_p[support]) * (log_p[support] - log_q[support])))


def qrs_exact(log_a, log_a2, b, beta: float) -> QRSExact:
    """The exact law of `qrs` and its distances to g on a grid (log a, log a′ and b over the same points)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    log_a, log_a2 = np.asarray(log_a, np.float64), np.asarray(log_a2, np.float64)
    b = np.asarray(b, bool)
    log_p = np.where(b, log_a, -np.inf)
    log_m = np.minimum(log_p, math.log(beta) + log_a2)
    log_mass = np.logaddexp.reduce(log_m)
    if not np.isfinite(log_mass):
        raise ValueError("QRS accepts nothing: P = a·b and a′ share no support")
    log_law, log_g = log_m - log_mass, log_gold(log_a, b)
    return QRSExact(
        log_law,
        float(np.exp(log_mass - math.log(beta))),
        float(0.5 * np.sum(np.abs(np.exp(log_g) - np.exp(log_law)))),
        _kl(log_g, log_law),
        _kl(log_law, log_g),
    )
