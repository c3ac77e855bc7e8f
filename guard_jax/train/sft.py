"""SFT: fine-tune on given continuations (e.g. b-filtered samples of a, of a CAP prompt, of ASAp), NLL on the
continuation only (never on the prompt or the padding), minibatches drawn by (seed, step)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guard_jax.data.packing import batch_indices
from guard_jax.models.base import ARM
from guard_jax.sampling import log_prob
from guard_jax.train.common import adam, left_pad_prompts
from guard_jax.train.loop import TrainState


class SFT:
    """Trainer for the shared loop. tokens_NT/lengths_N: the continuations; `context`: their prompt tokens
    (default [BOS]); one step = one minibatch of `batch_size` rows (an epoch is N // batch_size steps).
    `optimizer` (default Adam at `learning_rate`): pass one shared instance to several SFT trainers over
    same-shaped batches and they share one compiled step."""

    def __init__(self, model: ARM, tokens_NT, lengths_N, *, batch_size: int, learning_rate: float, context: list[int] | None = None,
                 seed: int = 0, warmup_steps: int = 0, optimizer: optax.GradientTransformation | None = None):
        tokens_NT, lengths_N = np.asarray(tokens_NT, np.int32), np.asarray(lengths_N, np.int32)
        if tokens_NT.ndim != 2 or lengths_N.shape != tokens_NT.shape[:1]:
            raise ValueError(f"tokens_NT must be [N, T] and lengths_N [N], got {tokens_NT.shape} and {lengths_N.shape}")
        if not 0 < batch_size <= len(tokens_NT):
            raise ValueError(f"batch_size must be in [1, N={len(tokens_NT)}] (the number of training sequences), got {batch_size}")
        self.model, self.tokens, self.lengths, self.batch_size, self.seed = model, tokens_NT, lengths_N, batch_size, seed
        ((prompt, mask),) = left_pad_prompts([model.bos_id] if context is None else list(context), pad_id=model.pad_id)
        self.prompt_B, self.mask_B = jnp.repeat(prompt, batch_size, 0), jnp.repeat(mask, batch_size, 0)
        self.optimizer = adam(learning_rate, warmup_steps) if optimizer is None else optimizer

    @property
    def steps_per_epoch(self) -> int:
        return len(self.tokens) // self.batch_size

    def init_state(self, params) -> TrainState:
        return TrainState(jnp.asarray(0, jnp.int32), params, self.optimizer.init(params), {})

    def step(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        del key  # the minibatch is a function of (seed, step)
        idx = batch_indices(len(self.tokens), self.batch_size, self.seed, int(state.step))
        state, metrics = _update(state, self.prompt_B, self.mask_B, jnp.asarray(self.tokens[idx]), jnp.asarray(self.lengths[idx]),
                                 model=self.model, optimizer=self.optimizer)
        return state, metrics | {"samples": self.batch_size}


def nll_per_token(model: ARM, params, prompt_BP, mask_BP, tokens_BT, lengths_B):
    """Mean negative log-likelihood per continuation token (the SFT loss)."""
    _, logp_BT = log_prob(model, params, prompt_BP, mask_BP, tokens_BT, lengths_B)
    return -jnp.sum(logp_BT) / jnp.maximum(jnp.sum(lengths_B), 1)


@functools.partial(jax.jit, static_argnames=("model", "optimizer"))
def _update(state, prompt_B, mask_B, tokens, lengths, *, model, optimizer):
    loss, grads = jax.value_and_grad(lambda p: nll_per_token(model, p, prompt_B, mask_B, tokens, lengths))(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state, state.extra), {"loss": loss, "grad_norm": optax.tree.norm(grads)}
