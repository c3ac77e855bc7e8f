"""Independent Metropolis–Hastings (IMH) toward g with proposal a′, chains started from GUARD samples.

Each chain holds a sequence y with b(y) = 1. A round proposes y′ ~ a′ for every chain (one batch) and moves
to it with probability min(1, w(y′) / w(y)), w = P / a′, P = a·b. Started from accepted GUARD samples (law
g′ = a′b / AR_a′), as in GUARD's appendix (50 rounds there).

Guarantees: every state satisfies b (a proposal with b = 0 has w = 0 and is never accepted). g is the
stationary law of the chain (detailed balance); the law after k rounds is g′ K^k for the transition matrix K
(`imh_transition_matrix`), which tends to g as k grows whenever a′ > 0 on the support of g (softmax
proposals always are); it is not g after finitely many rounds unless a′ ∝ g there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from guard_jax.lm import LM
from guard_jax.samplers.result import SamplerResult, check_positive, draw_sequences, log_target, score_sequences


def guard_start(key: jax.Array, a2: LM, constraint, num: int, *, max_new_tokens: int, batch_size: int = 1024,
                max_draws: int = 10**6) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """`num` GUARD samples of a′ (draw until b holds) -> (tokens_NT, lengths_N, logp_a2_N, draws).

    Raises ValueError naming `max_init_draws` when the budget runs out first."""
    kept, draws, accepted, batch = [], 0, 0, 0
    while accepted < num:
        if draws >= max_draws:
            raise ValueError(f"max_init_draws={max_draws} draws of a′ gave only {accepted} of the {num} GUARD starts; "
                             f"raise max_init_draws or pass init=")
        tokens, lengths, logp = draw_sequences(jax.random.fold_in(key, batch), a2, batch_size, max_new_tokens, batch_size)
        ok = np.asarray(constraint(tokens, lengths), bool)
        kept.append((tokens[ok], lengths[ok], logp[ok]))
        draws, accepted, batch = draws + batch_size, accepted + int(ok.sum()), batch + 1
    tokens, lengths, logp = (np.concatenate(x)[:num] for x in zip(*kept))
    return tokens, lengths, logp, draws


def imh(key: jax.Array, a: LM, a2: LM, constraint, num_chains: int, *, num_steps: int, max_new_tokens: int,
        batch_size: int = 1024, init: tuple[np.ndarray, np.ndarray] | None = None, max_init_draws: int = 10**6
        ) -> SamplerResult:
    """`num_chains` IMH chains of `num_steps` rounds each -> their final states (equally weighted).

    `init` = (tokens_NT, lengths_N) of num_chains starting sequences satisfying b; default: GUARD samples of
    a′ (drawn here, at most `max_init_draws`, and counted in model_calls). Proposals of one round are drawn in
    batches of `batch_size`. acceptance_rate: accepted moves / proposals over all rounds; log_z: None.
    info: `acceptance_by_step` (per round), `init_draws`, `num_steps`."""
    check_positive(num_chains=num_chains, num_steps=num_steps, max_new_tokens=max_new_tokens, batch_size=batch_size)
    key_init, key_prop, key_u = jax.random.split(key, 3)
    calls = init_draws = 0
    if init is None:
        tokens, lengths, logp_a2, init_draws = guard_start(key_init, a2, constraint, num_chains, max_new_tokens=max_new_tokens,
                                                           batch_size=min(batch_size, num_chains), max_draws=max_init_draws)
        calls += init_draws
    else:
        tokens, lengths = (np.asarray(x) for x in init)
        if tokens.shape != (num_chains, max_new_tokens) or lengths.shape != (num_chains,):
            raise ValueError(f"init must be (tokens [{num_chains}, {max_new_tokens}], lengths [{num_chains}]), got shapes "
                             f"{tokens.shape}, {lengths.shape}")
        logp_a2, calls = score_sequences(a2, tokens, lengths, batch_size), num_chains
    log_p, ok, score_calls = log_target(a, a2, constraint, tokens, lengths, logp_a2, batch_size)
    if not ok.all():
        raise ValueError(f"init has {int((~ok).sum())} sequences with b = 0: IMH chains must start where b holds")
    calls += score_calls
    log_w = log_p - logp_a2
    rates = []
    for step in range(num_steps):
        prop_t, prop_n, prop_q = draw_sequences(jax.random.fold_in(key_prop, step), a2, num_chains, max_new_tokens, batch_size)
        prop_p, _, score_calls = log_target(a, a2, constraint, prop_t, prop_n, prop_q, batch_size)
        prop_w = prop_p - prop_q
        log_u = np.log(np.asarray(jax.random.uniform(jax.random.fold_in(key_u, step), (num_chains,), minval=1e-38)))
        move = np.isfinite(prop_w) & (log_u < prop_w - log_w)
        tokens, lengths, log_w = np.where(move[:, None], prop_t, tokens), np.where(move, prop_n, lengths), np.where(move, prop_w, log_w)
        calls += num_chains + score_calls
        rates.append(float(move.mean()))
    return SamplerResult(
        "imh", tokens, lengths, None, np.ones(num_chains, bool), calls, init_draws + num_chains * (num_steps + 1),
        float(np.mean(rates)), float(num_chains), None,
        {"acceptance_by_step": rates, "init_draws": init_draws, "num_steps": num_steps},
    )


class IMHExact(NamedTuple):
    """IMH on the support of g, exactly: support_K (grid indices where P > 0), K_KK the transition matrix
    (row = current state), log_g_K."""

    support_K: np.ndarray
    K_KK: np.ndarray
    log_g_K: np.ndarray

    def law_after(self, start_K: np.ndarray, steps: int) -> np.ndarray:
        """The law after `steps` rounds from the law `start_K` on the support: start_K K^steps."""
        return np.asarray(start_K, np.float64) @ np.linalg.matrix_power(self.K_KK, steps)


def imh_exact(log_a, log_a2, b) -> IMHExact:
    """The IMH transition matrix over the support of g by enumeration: K[y, y′] = a′(y′) min(1, w(y′)/w(y))
    for y′ ≠ y, and the rest of the row's mass (rejections, including every proposal with b = 0) on y."""
    log_a, log_a2 = np.asarray(log_a, np.float64), np.asarray(log_a2, np.float64)
    support = np.flatnonzero(np.asarray(b, bool) & np.isfinite(log_a))
    log_w = log_a[support] - log_a2[support]
    accept_KK = np.exp(np.minimum(0.0, log_w[None, :] - log_w[:, None]))
    K_KK = np.exp(log_a2[support])[None, :] * accept_KK
    np.fill_diagonal(K_KK, 0.0)
    K_KK[np.diag_indices_from(K_KK)] = 1.0 - K_KK.sum(1)
    log_z = np.logaddexp.reduce(log_a[support])
    return IMHExact(support, K_KK, log_a[support] - log_z)
