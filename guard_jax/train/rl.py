"""KL-regularized RL (REINFORCE with a KL penalty to a), the baseline GUARD's target is contrasted with.

The objective J(pi) = E_pi[r] - beta KL(pi || a) has the ideal solution pi_beta(y) = a(y) exp(r(y)/beta) / Z_beta
(`guard_jax.exact.log_rl_ideal`), which keeps mass on b = 0 for every beta > 0, where GUARD's g keeps none.
Its policy gradient is E_pi[(r - beta (log pi - log a) - baseline) grad log pi]. `RL` is the REINFORCE
trainer for the shared loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guard_jax.lm import LM
from guard_jax.parallel import shard_params, split_batch
from guard_jax.sampling import check_finite_logp, log_prob, per_iteration
from guard_jax.train.common import (a_params, adam, apply_updates, check_frozen_base, check_mesh_batch, check_split,
                                    init_opt_state, jit_step, minibatched_log_prob, repeat_prompt, sample_many, trainable, trainable_value_and_grad)
from guard_jax.train.loop import TrainState


def _check_beta(beta) -> None:
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"beta must be > 0 (the KL coefficient), got {beta}")


def exact_objective(log_pi_N, log_a_N, rewards_N, beta):
    """-J(pi) = -(E_pi[r] - beta KL(pi || a)) over a toy grid (differentiable in log_pi_N)."""
    _check_beta(beta)
    pi_N = jnp.exp(log_pi_N)
    kl = jnp.sum(jnp.where(pi_N > 0, pi_N * (log_pi_N - jnp.where(pi_N > 0, log_a_N, 0.0)), 0.0))
    return -(jnp.sum(pi_N * rewards_N) - beta * kl)


def advantages(logp_pi_B, logp_a_B, rewards_B, beta):
    """The per-sample return r - beta (log pi - log a) minus its batch mean (the baseline), without gradient
    -> (advantage_B, aux with the mean reward, the KL estimate and the objective estimate)."""
    _check_beta(beta)
    kl_B = jax.lax.stop_gradient(logp_pi_B) - logp_a_B
    ret_B = jnp.asarray(rewards_B, logp_pi_B.dtype) - beta * kl_B
    advantage_B = jax.lax.stop_gradient(ret_B - ret_B.mean())
    return advantage_B, {"reward": jnp.mean(rewards_B), "kl_pi_a": jnp.mean(kl_B), "objective": jnp.mean(ret_B)}


def sampled_loss(logp_pi_B, logp_a_B, rewards_B, beta):
    """REINFORCE surrogate on samples of pi: logp_pi_B with gradient, logp_a_B of the frozen base; the
    `advantages` weight -log pi. -> (loss, aux as in `advantages`)."""
    advantage_B, aux = advantages(logp_pi_B, logp_a_B, rewards_B, beta)
    return -jnp.mean(advantage_B * logp_pi_B), aux


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """beta: the KL coefficient; n_samples: policy samples per update (the baseline is their mean return),
    processed `minibatch` at a time for the gradient (accumulated: the same update, memory bounded by the
    minibatch; None = all at once)."""

    beta: float
    n_samples: int = 256
    max_new_tokens: int = 30
    learning_rate: float = 1e-4
    minibatch: int | None = None

    def __post_init__(self):
        _check_beta(self.beta)
        if self.n_samples < 2 or self.max_new_tokens < 1:
            raise ValueError(f"need n_samples >= 2 (the baseline) and max_new_tokens >= 1, got {self.n_samples}, {self.max_new_tokens}")
        check_split(self.n_samples, self.minibatch or self.n_samples)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


class RL:
    """REINFORCE with a KL penalty to the frozen base a, for the shared loop.

    `reward(tokens_NT, lengths_N) -> values_N` runs on the host (a GUARD `Constraint` gives r = b). Each step
    draws `n_samples` of the current policy. Metrics: loss, reward (E_pi[r] on the samples), kl_pi_a (the
    sample mean of log pi - log a), objective (E[r] - beta KL), grad_norm, samples (= n_samples drawn).
    `base`: a (its model and params, frozen) and the prompt that a and pi condition on. On `base.mesh`, the
    state and a's params are sharded by guard_jax.parallel's rules and each minibatch is split over the
    devices (minibatch divisible by the mesh size).
    """

    def __init__(self, base: LM, reward, config: RLConfig):
        if not callable(reward):
            raise TypeError(f"reward must be callable (tokens_NT, lengths_N) -> values_N, got {type(reward).__name__}")
        check_mesh_batch(base.mesh, **{"config.minibatch": config.minibatch or config.n_samples})
        self.mesh = base.mesh
        self.base, self.model, self.reward, self.config = base, base.model, reward, config
        self.base_params = shard_params(base.mesh, trainable(base.params))  # LoRA: a's adapters (weights: the policy's)
        self.prompt, self.mask = base.prompt_arrays(1)
        self.optimizer = adam(config.learning_rate)

    def init_state(self, params) -> TrainState:
        check_frozen_base(self.base.params, params)
        return shard_params(self.mesh, TrainState(jnp.asarray(0, jnp.int32), params, init_opt_state(self.optimizer, params), {}))

    def step(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        c = self.config
        mb = c.minibatch or c.n_samples
        M = c.n_samples // mb
        tokens, lengths, logp_pi = sample_many(key, self.model, state.params, self.prompt, self.mask, M, mb, c.max_new_tokens, self.mesh)
        check_finite_logp(logp_pi, f"RL step {int(state.step)}: samples of the policy")
        r_N = jnp.asarray(np.asarray(self.reward(np.asarray(tokens), np.asarray(lengths)), np.float32))
        state, metrics = _rl_update(state, self.base_params, self.prompt, self.mask, tokens.reshape(M, mb, -1), lengths.reshape(M, mb),
                                    logp_pi.reshape(M, mb), r_N.reshape(M, mb), jnp.asarray(c.beta, jnp.float32),
                                    model=self.model, optimizer=self.optimizer, mesh=self.mesh)
        return state, metrics | {"samples": c.n_samples}


@jit_step(("model", "optimizer", "mesh"))
def _rl_update(state, base_params, prompt_1P, mask_1P, tokens_MBT, lengths_MB, logp_pi_MB, r_MB, beta, *, model, optimizer, mesh=None):
    """One update on M minibatches of B samples of pi (logp_pi_MB: their log-probs from the sampler): the
    `advantages` over all M B samples first, then each minibatch's share of `sampled_loss` (summed gradients =
    the whole batch's gradient; the gradient pass differentiates log pi of each minibatch, its value being the
    sampler's, so the output head runs in the backward pass only)."""
    M, B = lengths_MB.shape
    tokens_MBT, lengths_MB, logp_pi_MB, r_MB = (split_batch(x, mesh, axis=1) for x in (tokens_MBT, lengths_MB, logp_pi_MB, r_MB))
    prompt_B, mask_B = repeat_prompt(prompt_1P, mask_1P, B, mesh)
    logp_a_MB = minibatched_log_prob(model, a_params(base_params, state.params), prompt_1P, mask_1P, tokens_MBT, lengths_MB, mesh)
    advantage_N, aux = advantages(logp_pi_MB.reshape(-1), logp_a_MB.reshape(-1), r_MB.reshape(-1), beta)
    advantage_MB = advantage_N.reshape(M, B)

    def minibatch(grad_sum, xs):
        params, xs = per_iteration(state.params, xs)
        tokens_BT, lengths_B, logp_pi_B, advantage_B = (split_batch(x, mesh) for x in xs)
        logp_B = lambda p: log_prob(model, p, prompt_B, mask_B, tokens_BT, lengths_B, known_B=logp_pi_B)[0]  # value known: no head forward
        _, g = trainable_value_and_grad(lambda p: -jnp.sum(advantage_B * logp_B(p)) / (M * B), params)
        return jax.tree.map(jnp.add, grad_sum, g), None

    xs = (tokens_MBT, lengths_MB, logp_pi_MB, advantage_MB)
    grads, _ = jax.lax.scan(minibatch, jax.tree.map(jnp.zeros_like, trainable(state.params)), xs)
    loss = -jnp.mean(advantage_MB * logp_pi_MB)
    params, opt_state = apply_updates(optimizer, state.params, state.opt_state, grads, mesh)
    return TrainState(state.step + 1, params, opt_state, state.extra), aux | {"loss": loss, "grad_norm": optax.tree.norm(grads)}
