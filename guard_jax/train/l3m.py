"""L3M (Dhillon et al., ICLR 2025): SFT plus relaxed log-barrier penalties on expected-reward constraints.

Constraints E_pi[r_i] >= c_i are written C_i = c_i - E_pi[r_i] <= 0 and the objective is

    G_mu(theta) = L_SFT(theta) + (1/k) sum_i B_{mu, mu^2}(C_i(theta)),

with the relaxed (C^1, linearly extended) log barrier B_{mu,s}(z) = -mu log(-z) for z <= -s and
(mu/s) z + mu - mu log s beyond, s = mu^2, and mu annealed from 1 to 0.01. The barrier's slope
B'(C_i) = mu / (-C_i) acts as the Lagrange multiplier lambda_i (logged). Rewards are b for GUARD's
constraints or a classifier score; E_pi[r_i] and its gradient come from samples of pi (score function
with a mean baseline), or exactly on toy ARMs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_mu(mu) -> None:
    if isinstance(mu, (int, float)) and not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")


def relaxed_log_barrier(z, mu):
    """B_{mu, mu^2}(z): -mu log(-z) for z <= -mu^2, its tangent line beyond (finite for infeasible z)."""
    _check_mu(mu)
    s = mu * mu
    safe = jnp.minimum(z, -s)
    return jnp.where(z <= -s, -mu * jnp.log(-safe), z / mu + mu - mu * jnp.log(s))


def barrier_slope(z, mu):
    """B'(z) = mu / (-z) on the barrier branch, 1 / mu on the linear one: the multiplier lambda of C = z."""
    _check_mu(mu)
    s = mu * mu
    return jnp.where(z <= -s, mu / -jnp.minimum(z, -s), 1.0 / mu)


def mu_schedule(step: int, total_steps: int, mu_start: float = 1.0, mu_end: float = 0.01) -> float:
    """Geometric annealing from mu_start (step 0) to mu_end (last step)."""
    if total_steps < 1 or not 0 < mu_end <= mu_start:
        raise ValueError(f"need total_steps >= 1 and 0 < mu_end <= mu_start, got {total_steps}, {mu_end}, {mu_start}")
    frac = min(step, total_steps - 1) / max(total_steps - 1, 1)
    return mu_start * math.exp(frac * math.log(mu_end / mu_start))


def exact_objective(log_pi_N, log_data_N, rewards_KN, thresholds_K, mu):
    """G_mu on a toy grid with exact expectations: -sum_y D(y) log pi(y) + (1/k) sum_i B(c_i - E_pi[r_i]).

    log_pi_N: the policy's log-probs over the grid (differentiable); log_data_N: the SFT data law D.
    -> (objective, C_K).
    """
    pi_N, d_N = jnp.exp(log_pi_N), jnp.exp(log_data_N)
    nll = -jnp.sum(jnp.where(d_N > 0, d_N * log_pi_N, 0.0))
    c_K = jnp.asarray(thresholds_K) - rewards_KN @ pi_N
    return nll + jnp.mean(relaxed_log_barrier(c_K, mu)), c_K


def sampled_loss(logp_sft_N, logp_pi_B, rewards_KB, thresholds_K, mu):
    """Monte-Carlo surrogate of G_mu whose gradient is the L3M gradient.

    logp_sft_N: log pi of the SFT data (mean NLL over them); logp_pi_B: log pi of samples of pi (with grad)
    and rewards_KB their rewards. The constraint gradient is the score-function estimate
    -E[(r - mean r) grad log pi] weighted by the (stopped) barrier slope. -> (loss, aux dict with C_K,
    lambda_K, the barrier value and the NLL).
    """
    nll = -jnp.mean(logp_sft_N)
    rewards_KB = jnp.asarray(rewards_KB, logp_pi_B.dtype)
    c_K = jnp.asarray(thresholds_K, logp_pi_B.dtype) - rewards_KB.mean(axis=1)
    lam_K = jax.lax.stop_gradient(barrier_slope(c_K, mu))
    advantage_KB = rewards_KB - rewards_KB.mean(axis=1, keepdims=True)
    grad_c_surrogate_K = -jnp.mean(advantage_KB * logp_pi_B[None], axis=1)
    loss = nll + jnp.mean(lam_K * grad_c_surrogate_K)
    return loss, {"nll": nll, "C": c_K, "lambda": lam_K, "barrier": jnp.mean(relaxed_log_barrier(c_K, mu))}
