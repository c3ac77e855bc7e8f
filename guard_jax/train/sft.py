"""SFT: fine-tune on given continuations (e.g. b-filtered samples of a, of a CAP prompt, of ASAp), NLL on the
continuation only (never on the prompt or the padding), minibatches drawn by (seed, step)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guard_jax.data.packing import batch_indices
from guard_jax.lm import LM
from guard_jax.models.base import ARM
from guard_jax.sampling import log_prob
from guard_jax.parallel import shard_params, split_batch
from guard_jax.train.common import adam, apply_updates, check_mesh_batch, init_opt_state, jit_step, trainable_value_and_grad
from guard_jax.train.loop import TrainState


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """batch_size: rows per step (an epoch is N // batch_size steps); minibatches are drawn by (seed, step);
    warmup_steps: linear learning-rate warm-up of Adam."""

    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError(f"batch_size must be >= 1 and warmup_steps >= 0, got {self.batch_size}, {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


class SFT:
    """Trainer for the shared loop: fine-tune `lm.model`, conditioned on `lm.prompt`, on the continuations
    tokens_NT / lengths_N; one step = one minibatch of `config.batch_size` rows.
    `optimizer` (default Adam at `config.learning_rate` with `config.warmup_steps`): pass one shared
    instance to several SFT trainers over same-shaped batches and they share one compiled step.
    On `lm.mesh`, the state is sharded by guard_jax.parallel's rules and each minibatch split over the
    devices (config.batch_size divisible by the mesh size). With a LoRA `lm` (guard_jax.lora.with_lora) only the
    adapters are trained (and have Adam moments)."""

    def __init__(self, lm: LM, tokens_NT, lengths_N, config: SFTConfig = SFTConfig(), *,
                 optimizer: optax.GradientTransformation | None = None):
        tokens_NT, lengths_N = np.asarray(tokens_NT, np.int32), np.asarray(lengths_N, np.int32)
        if tokens_NT.ndim != 2 or lengths_N.shape != tokens_NT.shape[:1]:
            raise ValueError(f"tokens_NT must be [N, T] and lengths_N [N], got {tokens_NT.shape} and {lengths_N.shape}")
        if not config.batch_size <= len(tokens_NT):
            raise ValueError(f"config.batch_size must be in [1, N={len(tokens_NT)}] (the number of training sequences), "
                             f"got {config.batch_size}")
        check_mesh_batch(lm.mesh, **{"config.batch_size": config.batch_size})
        self.lm, self.model, self.config, self.mesh = lm, lm.model, config, lm.mesh
        self.tokens, self.lengths, self.batch_size, self.seed = tokens_NT, lengths_N, config.batch_size, config.seed
        self.prompt_B, self.mask_B = lm.prompt_arrays(config.batch_size)
        self.optimizer = adam(config.learning_rate, config.warmup_steps) if optimizer is None else optimizer

    @property
    def steps_per_epoch(self) -> int:
        return len(self.tokens) // self.batch_size

    def init_state(self, params) -> TrainState:
        return shard_params(self.mesh, TrainState(jnp.asarray(0, jnp.int32), params, init_opt_state(self.optimizer, params), {}))

    def step(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        del key  # the minibatch is a function of (seed, step)
        idx = batch_indices(len(self.tokens), self.batch_size, self.seed, int(state.step))
        state, metrics = _update(state, self.prompt_B, self.mask_B, jnp.asarray(self.tokens[idx]), jnp.asarray(self.lengths[idx]),
                                 model=self.model, optimizer=self.optimizer, mesh=self.mesh)
        return state, metrics | {"samples": self.batch_size}


def nll_per_token(model: ARM, params, prompt_BP, mask_BP, tokens_BT, lengths_B):
    """Mean negative log-likelihood per continuation token (the SFT loss)."""
    _, logp_BT = log_prob(model, params, prompt_BP, mask_BP, tokens_BT, lengths_B)
    return -jnp.sum(logp_BT) / jnp.maximum(jnp.sum(lengths_B), 1)


@jit_step(("model", "optimizer", "mesh"))
def _update(state, prompt_B, mask_B, tokens, lengths, *, model, optimizer, mesh=None):
    prompt_B, mask_B, tokens, lengths = (split_batch(x, mesh) for x in (prompt_B, mask_B, tokens, lengths))
    loss, grads = trainable_value_and_grad(lambda p: nll_per_token(model, p, prompt_B, mask_B, tokens, lengths), state.params)
    params, opt_state = apply_updates(optimizer, state.params, state.opt_state, grads, mesh)
    return TrainState(state.step + 1, params, opt_state, state.extra), {"loss": loss, "grad_norm": optax.tree.norm(grads)}
