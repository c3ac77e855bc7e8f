"""DPG: train a policy pi toward g = a·b / Z by distributional policy gradient (Khalifa et al.; GUARD §4).

For samples y ~ q, the gradient of KL(g || pi) is estimated by

    grad = -E_q[(P(y) / (Z q(y)) - pi(y) / q(y)) grad log pi(y)],   P = a·b,

the pi/q term being the baseline of disco v1 (= 1 on-policy, where q = pi). Z-hat is the running
importance-sampling mean of P/q over every sample seen so far, kept in log space in the train state.
Samples with b = 0 (log P = -inf) get weight 0, never NaN. On-policy, q is the current policy; off-policy
q is a frozen proposal (e.g. a CAP-prompted a, or an SFT model) replaced by pi whenever the estimated
KL(g || pi) beats KL(g || q), checked every `swap_every` steps. `n_samples` per update are drawn and scored
in minibatches with gradient accumulation, so memory is bounded by the minibatch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from guard_jax.lm import LM, common_prompt_length
from guard_jax.models.base import ARM
from guard_jax.parallel import check_divisible, shard_params, split_batch
from guard_jax.sampling import log_prob
from guard_jax.train.common import adam, apply_updates, check_split, host_constraint, minibatched_log_prob, repeat_prompt, sample_many
from guard_jax.train.loop import TrainState


@dataclasses.dataclass(frozen=True)
class DPGConfig:
    """n_samples per update (the paper: 10,000) in minibatches (the paper: 500); lr 1.41e-5 is the paper's
    (disco's) default for GPT-2/Gemma-size models; toy models need larger."""

    n_samples: int = 10_000
    minibatch: int = 500
    max_new_tokens: int = 30
    learning_rate: float = 1.41e-5
    warmup_steps: int = 0
    on_policy: bool = True
    swap_every: int = 10

    def __post_init__(self):
        check_split(self.n_samples, self.minibatch)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_new_tokens < 1 or self.swap_every < 1:
            raise ValueError(f"max_new_tokens and swap_every must be >= 1, got {self.max_new_tokens}, {self.swap_every}")


class DPG:
    """DPG trainer for the shared loop: the policy pi (params from `init_state`) conditions on `base.prompt`,
    and a = base (its model and params, frozen) defines g = a·b / Z.

    Off-policy (`config.on_policy=False`), q starts as `proposal`, a frozen first proposal with the model of
    `base` (its params and prompt: e.g. `base.with_prefix(cap_prompt)` for CAP, or an SFT model's params;
    default: pi's initial params on base's prompt). The mesh is `base.mesh` (`guard_jax.parallel.make_mesh`
    or `data_mesh`): the state and a's params are sharded by the rules of guard_jax.parallel (replicated on a
    1-D data mesh) and each minibatch is split over the devices for sampling, scoring and the gradient (XLA
    sums the gradients across them)."""

    def __init__(self, base: LM, constraint, config: DPGConfig, *, proposal: LM | None = None):
        if proposal is not None:
            if config.on_policy:
                raise ValueError("proposal needs config.on_policy=False (off-policy DPG); on-policy, q is the policy itself")
            if proposal.model != base.model:
                raise ValueError(f"proposal must have the model of base ({base.model}), got {proposal.model}: "
                                 "the policy, a and q share one architecture")
        mesh = base.mesh
        base_params = base.params
        if mesh is not None:
            check_divisible(config.minibatch, mesh.size, "minibatch")
            base_params = shard_params(mesh, base_params)
        self.mesh = mesh
        self.model, self.base_params, self.constraint, self.config = base.model, base_params, constraint, config
        q = base if proposal is None else proposal
        length = common_prompt_length(base, q)
        (self.prompt, self.mask), (self.q_prompt, self.q_mask) = base.prompt_arrays(1, length), q.prompt_arrays(1, length)
        self.proposal_params = None if proposal is None else proposal.params
        self.optimizer = adam(config.learning_rate, config.warmup_steps)

    def init_state(self, params) -> TrainState:
        extra = {"log_z_sum": jnp.asarray(-jnp.inf, jnp.float32), "n_seen": jnp.asarray(0.0, jnp.float32)}
        if not self.config.on_policy:
            proposal = params if self.proposal_params is None else self.proposal_params
            extra |= {"proposal": proposal, "q_prompt": self.q_prompt, "q_mask": self.q_mask}
        state = TrainState(jnp.asarray(0, jnp.int32), params, self.optimizer.init(params), extra)
        return shard_params(self.mesh, state)

    def step(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        c = self.config
        M = c.n_samples // c.minibatch
        if c.on_policy:
            q_params, q_prompt, q_mask = state.params, self.prompt, self.mask
        else:
            q_params, q_prompt, q_mask = state.extra["proposal"], state.extra["q_prompt"], state.extra["q_mask"]
        tokens, lengths, logq = sample_many(key, self.model, q_params, q_prompt, q_mask, M, c.minibatch, c.max_new_tokens, self.mesh)
        b = host_constraint(self.constraint, tokens, lengths)
        if not b.any() and float(state.extra["n_seen"]) == 0.0:
            raise ValueError(f"no sample of the proposal satisfied the constraint in the first DPG step ({c.n_samples} samples): "
                             "Z-hat = 0 gives no gradient. Warm-start the policy (SFT or a CAP proposal) or raise n_samples.")
        T = c.max_new_tokens
        state, metrics = _update(state, self.base_params, self.prompt, self.mask, tokens.reshape(M, c.minibatch, T),
                                 lengths.reshape(M, c.minibatch), logq.reshape(M, c.minibatch), jnp.asarray(b).reshape(M, c.minibatch),
                                 model=self.model, optimizer=self.optimizer, mesh=self.mesh)
        metrics["samples"] = c.n_samples
        if not c.on_policy:
            swap = int(state.step) % c.swap_every == 0 and float(metrics["kl_g_pi"]) < float(metrics["kl_g_q"])
            if swap:
                state = state._replace(extra=state.extra | {"proposal": state.params, "q_prompt": self.prompt, "q_mask": self.mask})
            metrics["swapped"] = float(swap)
        return state, metrics


def dpg_loss(params, model: ARM, prompt_BP, mask_BP, tokens_BT, lengths_B, logq_B, logP_B, log_z):
    """-mean[(P/(Z q) - pi/q) log pi] on samples of q; its gradient estimates grad KL(g || pi). -> (loss, log pi_B)."""
    logpi_B = log_prob(model, params, prompt_BP, mask_BP, tokens_BT, lengths_B)[0]
    w_B = jnp.exp(logP_B - log_z - logq_B)  # g / q; 0 where b = 0
    baseline_B = jnp.exp(jax.lax.stop_gradient(logpi_B) - logq_B)  # pi / q
    return -jnp.mean((w_B - baseline_B) * logpi_B), logpi_B


@functools.partial(jax.jit, static_argnames=("model", "optimizer", "mesh"))
def _update(state, base_params, prompt, mask, tokens_MBT, lengths_MB, logq_MB, b_MB, *, model, optimizer, mesh=None):
    tokens_MBT, lengths_MB, logq_MB, b_MB = (split_batch(x, mesh, axis=1) for x in (tokens_MBT, lengths_MB, logq_MB, b_MB))
    log_a_MB = minibatched_log_prob(model, base_params, prompt, mask, tokens_MBT, lengths_MB, mesh)
    logP_MB = jnp.where(b_MB, log_a_MB, -jnp.inf)
    N = logP_MB.size
    log_z_sum = jnp.logaddexp(state.extra["log_z_sum"], jax.scipy.special.logsumexp(logP_MB - logq_MB))
    n_seen = state.extra["n_seen"] + N
    log_z = log_z_sum - jnp.log(n_seen)
    B = tokens_MBT.shape[1]
    prompt_B, mask_B = repeat_prompt(prompt, mask, B, mesh)

    def minibatch(grad_sum, xs):
        xs = tuple(split_batch(x, mesh) for x in xs)
        (loss, logpi), g = jax.value_and_grad(dpg_loss, has_aux=True)(state.params, model, prompt_B, mask_B, *xs, log_z)
        return jax.tree.map(jnp.add, grad_sum, g), (loss, logpi)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, (loss_M, logpi_MB) = jax.lax.scan(minibatch, zeros, (tokens_MBT, lengths_MB, logq_MB, logP_MB))
    grads = jax.tree.map(lambda g: g / tokens_MBT.shape[0], grad_sum)
    params, opt_state = apply_updates(optimizer, state.params, state.opt_state, grads, mesh)
    w = jnp.exp(logP_MB - logq_MB - log_z)
    finite = jnp.isfinite(logP_MB)
    kl_g = lambda log_r: -log_z + jnp.mean(jnp.where(finite, w * (logP_MB - log_r), 0.0))  # IS estimate of KL(g || r)
    metrics = {
        "loss": jnp.mean(loss_M),
        "log_z": log_z,
        "z": jnp.exp(log_z),
        "ar": jnp.mean(b_MB.astype(jnp.float32)),  # fraction of this step's samples (of q) satisfying b
        "ar_pi": jnp.mean(jnp.exp(logpi_MB - logq_MB) * b_MB),  # AR of pi, by importance sampling
        "kl_g_pi": kl_g(logpi_MB),
        "kl_g_q": kl_g(logq_MB),
        "grad_norm": optax.tree.norm(grads),
    }
    extra = state.extra | {"log_z_sum": log_z_sum, "n_seen": n_seen}
    return TrainState(state.step + 1, params, opt_state, extra), metrics
