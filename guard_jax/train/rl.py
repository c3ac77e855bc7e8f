"""KL-regularized RL (REINFORCE with a KL penalty to a), the baseline GUARD's target is contrasted with.

The objective J(pi) = E_pi[r] - beta KL(pi || a) has the ideal solution pi_beta(y) = a(y) exp(r(y)/beta) / Z_beta
(`guard_jax.exact.log_rl_ideal`), which keeps mass on b = 0 for every beta > 0, where GUARD's g keeps none.
Its policy gradient is E_pi[(r - beta (log pi - log a) - baseline) grad log pi].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_beta(beta) -> None:
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"beta must be > 0 (the KL coefficient), got {beta}")


def exact_objective(log_pi_N, log_a_N, rewards_N, beta):
    """-J(pi) = -(E_pi[r] - beta KL(pi || a)) over a toy grid (differentiable in log_pi_N)."""
    _check_beta(beta)
    pi_N = jnp.exp(log_pi_N)
    kl = jnp.sum(jnp.where(pi_N > 0, pi_N * (log_pi_N - jnp.where(pi_N > 0, log_a_N, 0.0)), 0.0))
    return -(jnp.sum(pi_N * rewards_N) - beta * kl)


def sampled_loss(logp_pi_B, logp_a_B, rewards_B, beta):
    """REINFORCE surrogate on samples of pi: logp_pi_B with gradient, logp_a_B of the frozen base.

    The per-sample return r - beta (log pi - log a) minus its batch mean (the baseline) weights
    -log pi. -> (loss, aux with the mean reward, the KL estimate and the objective estimate).
    """
    _check_beta(beta)
    kl_B = jax.lax.stop_gradient(logp_pi_B) - logp_a_B
    ret_B = jnp.asarray(rewards_B, logp_pi_B.dtype) - beta * kl_B
    advantage_B = jax.lax.stop_gradient(ret_B - ret_B.mean())
    loss = -jnp.mean(advantage_B * logp_pi_B)
    return loss, {"reward": jnp.mean(rewards_B), "kl_pi_a": jnp.mean(kl_B), "objective": jnp.mean(ret_B)}
