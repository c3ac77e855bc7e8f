"""L3M (Dhillon et al., ICLR 2025): SFT plus relaxed log-barrier penalties on expected-reward constraints.

Constraints E_pi[r_i] >= c_i are written C_i = c_i - E_pi[r_i] <= 0 and the objective is

    G_mu(theta) = L_SFT(theta) + (1/k) sum_i B_{mu, mu^2}(C_i(theta)),

with the relaxed (C^1, linearly extended) log barrier B_{mu,s}(z) = -mu log(-z) for z <= -s and
(mu/s) z + mu - mu log s beyond, s = mu^2, and mu annealed from 1 to 0.01. The barrier's slope
B'(C_i) = mu / (-C_i) acts as the Lagrange multiplier lambda_i (logged). Rewards are b for GUARD's
constraints or a classifier score; E_pi[r_i] and its gradient come from samples of pi (score function
with a mean baseline), or exactly on toy ARMs. `L3M` is the trainer for the shared loop.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guard_jax.data.packing import batch_indices
from guard_jax.lm import LM
from guard_jax.parallel import shard_params, split_batch
from guard_jax.sampling import check_finite_logp, log_prob
from guard_jax.train.common import adam, apply_updates, check_mesh_batch, init_opt_state, jit_step, repeat_prompt, sample_many, trainable_value_and_grad
from guard_jax.train.loop import TrainState


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


@dataclasses.dataclass(frozen=True)
class L3MConfig:
    """thresholds: the c_i of E_pi[r_i] >= c_i, one per reward; total_steps: the length of the mu schedule
    (mu_start at step 0 to mu_end at step total_steps - 1, then held); n_samples: policy samples per step
    (the expected rewards and their gradient); batch_size: SFT rows per step, drawn by (seed, step)."""

    thresholds: tuple[float, ...]
    total_steps: int
    n_samples: int = 256
    batch_size: int = 64
    max_new_tokens: int = 30
    learning_rate: float = 1e-4
    mu_start: float = 1.0
    mu_end: float = 0.01
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(c) for c in self.thresholds))
        if not self.thresholds:
            raise ValueError("thresholds must hold one c_i per reward (E[r_i] >= c_i), got none")
        mu_schedule(0, self.total_steps, self.mu_start, self.mu_end)  # validates the schedule
        if self.n_samples < 2 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"need n_samples >= 2 (the baseline), batch_size >= 1 and max_new_tokens >= 1, "
                             f"got {self.n_samples}, {self.batch_size}, {self.max_new_tokens}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


class L3M:
    """L3M trainer for the shared loop (`guard_jax.train.loop.run`).

    The policy is `lm.model` conditioned on `lm.prompt`; sft_tokens_NT / sft_lengths_N: the SFT data (e.g.
    b-filtered samples of a); `rewards`: one callable
    r_i(tokens_NT, lengths_N) -> values_N per constraint (a GUARD `Constraint` gives r = b), evaluated on the
    host. Each step takes `config.batch_size` SFT rows (epoch-wise permutations by (config.seed, step)) and draws
    `n_samples` fresh samples of the current policy; mu follows `mu_schedule`. Metrics: loss, nll, mu,
    barrier, and per constraint i: reward_i (E_pi[r_i] on the samples), C_i = c_i - E_pi[r_i] and the
    multiplier lambda_i = mu / (-C_i) (1/mu on the linear branch); `samples` = policy samples drawn.
    On `lm.mesh`, the state is sharded by guard_jax.parallel's rules and the SFT rows and policy samples are
    split over the devices (batch_size and n_samples divisible by the mesh size).
    """

    def __init__(self, lm: LM, sft_tokens_NT, sft_lengths_N, rewards, config: L3MConfig):
        tokens_NT, lengths_N = np.asarray(sft_tokens_NT, np.int32), np.asarray(sft_lengths_N, np.int32)
        if tokens_NT.ndim != 2 or lengths_N.shape != tokens_NT.shape[:1]:
            raise ValueError(f"sft_tokens_NT must be [N, T] and sft_lengths_N [N], got {tokens_NT.shape} and {lengths_N.shape}")
        if not 0 < config.batch_size <= len(tokens_NT):
            raise ValueError(f"config.batch_size must be in [1, N={len(tokens_NT)}] (the SFT rows), got {config.batch_size}")
        rewards = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards]
        if len(rewards) != len(config.thresholds) or not all(callable(r) for r in rewards):
            raise ValueError(f"rewards must be {len(config.thresholds)} callables (one per threshold), got {rewards!r}")
        check_mesh_batch(lm.mesh, **{"config.batch_size": config.batch_size, "config.n_samples": config.n_samples})
        self.mesh = lm.mesh
        self.lm, self.model, self.tokens, self.lengths, self.rewards, self.config = lm, lm.model, tokens_NT, lengths_N, rewards, config
        self.prompt, self.mask = lm.prompt_arrays(1)
        self.optimizer = adam(config.learning_rate)

    def init_state(self, params) -> TrainState:
        return shard_params(self.mesh, TrainState(jnp.asarray(0, jnp.int32), params, init_opt_state(self.optimizer, params), {}))

    def mu(self, step: int) -> float:
        c = self.config
        return mu_schedule(step, c.total_steps, c.mu_start, c.mu_end)

    def step(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        c, s = self.config, int(state.step)
        idx = batch_indices(len(self.tokens), c.batch_size, c.seed, s)
        tokens, lengths, logp = sample_many(key, self.model, state.params, self.prompt, self.mask, 1, c.n_samples, c.max_new_tokens, self.mesh)
        check_finite_logp(logp, f"L3M step {s}: samples of the policy")
        tokens_np, lengths_np = np.asarray(tokens), np.asarray(lengths)
        r_KN = np.stack([np.asarray(r(tokens_np, lengths_np), np.float32) for r in self.rewards])
        mu = self.mu(s)
        state, aux = _l3m_update(state, self.prompt, self.mask, jnp.asarray(self.tokens[idx]), jnp.asarray(self.lengths[idx]),
                                 tokens, lengths, logp, jnp.asarray(r_KN), jnp.asarray(c.thresholds, jnp.float32),
                                 jnp.asarray(mu, jnp.float32), model=self.model, optimizer=self.optimizer, mesh=self.mesh)
        metrics = {k: aux[k] for k in ("loss", "nll", "barrier", "grad_norm")} | {"mu": mu, "samples": c.n_samples}
        for i in range(len(c.thresholds)):
            metrics |= {f"reward_{i}": r_KN[i].mean(), f"C_{i}": aux["C"][i], f"lambda_{i}": aux["lambda"][i]}
        return state, metrics


@jit_step(("model", "optimizer", "mesh"))
def _l3m_update(state, prompt_1P, mask_1P, sft_tokens_BT, sft_lengths_B, tokens_NT, lengths_N, logp_N, r_KN, thresholds_K, mu,
                *, model, optimizer, mesh=None):
    """One L3M update; logp_N: the sampler's log-probs of the policy's samples tokens_NT (the same params), the value of
    their log pi, whose gradient alone is computed (the head runs in the backward pass only)."""
    sft_tokens_BT, sft_lengths_B, tokens_NT, lengths_N, logp_N = (split_batch(x, mesh) for x in (sft_tokens_BT, sft_lengths_B, tokens_NT,
                                                                                                  lengths_N, logp_N))
    r_KN = split_batch(r_KN, mesh, axis=1)
    B, N = sft_tokens_BT.shape[0], tokens_NT.shape[0]

    def loss_fn(params):
        logp_sft_B = log_prob(model, params, *repeat_prompt(prompt_1P, mask_1P, B, mesh), sft_tokens_BT, sft_lengths_B)[0]
        logp_pi_N = log_prob(model, params, *repeat_prompt(prompt_1P, mask_1P, N, mesh), tokens_NT, lengths_N, known_B=logp_N)[0]
        return sampled_loss(logp_sft_B, logp_pi_N, r_KN, thresholds_K, mu)

    (loss, aux), grads = trainable_value_and_grad(loss_fn, state.params, has_aux=True)
    params, opt_state = apply_updates(optimizer, state.params, state.opt_state, grads, mesh)
    return TrainState(state.step + 1, params, opt_state, state.extra), aux | {"loss": loss, "grad_norm": optax.tree.norm(grads)}
