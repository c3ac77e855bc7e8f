"""Adaptive weighted rejection sampling (AWRS, Lipkin et al. 2025) as the token step of SMC toward g.

At each token, with proposal conditionals q = a′(· | x_<t) and a token-level check c(v) (v allowed by the
prefix information of a token mask), AWRS walks the tokens in the order of a draw without replacement from q
(Gumbel keys), checking c on each until one passes; the first allowed token x is returned. This is an exact
draw from q restricted to the allowed tokens, but with no sum over the vocabulary: its normaliser
Z_c = sum_{v allowed} q(v) is replaced by an unbiased estimate. With R = the q-mass rejected before x, the
recursive estimator checks one more token y (the next one of the walk):

    W = 1 - R            if y is allowed or there is no next token of positive mass,
    W = q(x)             otherwise,

and E[W f(x)] = sum_{v allowed} q(v) f(v) (proper weighting; the test enumerates every order exactly).
Within SMC the step's weight is W a(x) / q(x) times the twist ratio (`guard_jax.samplers.smc`).

Guarantees: as `smc` — particles with weight > 0 satisfy b; Ẑ unbiased; the weighted particles properly
weighted for g (E[sum_i w_i f(y_i)] = sum_y a b f); the self-normalised law tends to g as particles grow.
Cost: the number of checks (walk length + 1) per token instead of V for a full mask; counted in
`constraint_calls`. Here every token's check is one gather from the automaton's table, so the vectorised code
reads the allowed row and walks it in sorted order: the same draws as the sequential algorithm, whose
check count is what `constraint_calls` reports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guard_jax.lm import LM
from guard_jax.samplers.result import SamplerResult
from guard_jax.samplers.smc import Twist, smc


def awrs_from_order(order_BV: jax.Array, log_q_BV: jax.Array, allowed_BV: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AWRS given each row's walk order (a permutation of the vocabulary, first checked first).

    -> (token_B: the first allowed token of positive mass, log_W_B: log of the recursive estimate of
    sum_{v allowed} q(v), checks_B: tokens checked = its position + 1, + 1 for the next token when there is
    one). A row with no allowed token of positive mass gets log_W = -inf (its particle dies)."""
    V = order_BV.shape[1]
    lq_o = jnp.take_along_axis(log_q_BV, order_BV, axis=1)
    ok_o = jnp.take_along_axis(allowed_BV, order_BV, axis=1) & (lq_o > -jnp.inf)
    k_B = jnp.argmax(ok_o, axis=1)
    any_B = ok_o.any(axis=1)
    pos_V = jnp.arange(V)
    log_rest_B = jax.scipy.special.logsumexp(jnp.where(pos_V[None] >= k_B[:, None], lq_o, -jnp.inf), axis=1)  # log(1 - R)
    nxt_B = jnp.minimum(k_B + 1, V - 1)
    has_next_B = (k_B + 1 < V) & (jnp.take_along_axis(lq_o, nxt_B[:, None], axis=1)[:, 0] > -jnp.inf)
    next_ok_B = has_next_B & jnp.take_along_axis(ok_o, nxt_B[:, None], axis=1)[:, 0]
    log_x_B = jnp.take_along_axis(lq_o, k_B[:, None], axis=1)[:, 0]
    log_W_B = jnp.where(next_ok_B | ~has_next_B, log_rest_B, log_x_B)
    token_B = jnp.take_along_axis(order_BV, k_B[:, None], axis=1)[:, 0]
    checks_B = jnp.where(any_B, k_B + 1 + has_next_B, jnp.sum(lq_o > -jnp.inf, axis=1))
    return token_B.astype(jnp.int32), jnp.where(any_B, log_W_B, -jnp.inf), checks_B.astype(jnp.int32)


def awrs_step(key: jax.Array, log_q_BV: jax.Array, allowed_BV: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The AWRS token step for `smc`: the walk order of a draw without replacement from q (Gumbel-top-V)."""
    keys_BV = log_q_BV + jax.random.gumbel(key, log_q_BV.shape)
    return awrs_from_order(jnp.argsort(-keys_BV, axis=1), log_q_BV, allowed_BV)


def awrs(key: jax.Array, a: LM, a2: LM, constraint, num_particles: int, *, mask, max_new_tokens: int,
         ess_threshold: float = 0.5, twist: Twist | None = None, num_runs: int = 1) -> SamplerResult:
    """SMC with AWRS token steps against the token mask `mask` (a TokenAutomaton: the prefix information AWRS
    needs), proposal a′ = `a2`, optional twist; the arguments and result of `guard_jax.samplers.smc`."""
    if mask is None:
        raise ValueError("awrs needs mask= (a TokenAutomaton whose allowed tokens are the check); without one use smc")
    return smc(key, a, a2, constraint, num_particles, max_new_tokens=max_new_tokens, ess_threshold=ess_threshold,
               twist=twist, mask=mask, num_runs=num_runs, token_step=awrs_step, method="awrs")
