"""The autoregressive-model contract every guard_jax model follows.

A model is a small frozen (hashable) object that holds only static configuration, so it can be a
static argument of `jax.jit`; its parameters are a separate pytree. All methods are pure functions.

Conventions (B = batch, T = time, V = output vocabulary, L = cache length):
- `apply(params, tokens_BT, mask_BT=None) -> logits_BTV`: teacher-forced forward pass;
    `logits_BTV[:, t]` is the (unnormalised) log-distribution of the token at position t + 1 given
    `tokens_BT[:, : t + 1]`. `mask_BT` (1 = real token, 0 = padding) supports left-padded batches.
- `init_cache(batch_size, max_len) -> cache`: an empty decoding state (a pytree).
- `prefill(params, tokens_BP, mask_BP, cache) -> (logits_BV, cache)`: consume a (left-padded) prompt;
    returns the logits of the first new token.
- `decode(params, token_B, cache) -> (logits_BV, cache)`: append one token per row; returns the logits of
    the next one.
- `grow_cache(cache, max_len) -> cache`: the same decoding state in buffers of `max_len` >= the current
    length (the sampler starts with a short buffer and grows it, so early steps attend over fewer slots).
- optional `apply_features(params, tokens_BT, mask_BT=None) -> (features_BTD, w_VD)`: `apply` before a
    linear head (logits = features @ w.T); `sampling.log_prob` then scores through
    `guard_jax.logprob.token_log_prob`, chunked, without the B×T×V logits.

`bos_id` is the token that starts an unconditional sequence, `eos_id` (or None) ends one, and `pad_id`
fills positions after the end.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

Params = Any
Cache = Any


class ARM(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int | None
    pad_id: int

    def init(self, key: jax.Array) -> Params: ...

    def apply(self, params: Params, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array: ...

    def init_cache(self, batch_size: int, max_len: int) -> Cache: ...

    def prefill(self, params: Params, tokens_BP: jax.Array, mask_BP: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]: ...

    def decode(self, params: Params, token_B: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]: ...

    def grow_cache(self, cache: Cache, max_len: int) -> Cache: ...


def pad_to(x: jax.Array, length: int, axis: int, value=0) -> jax.Array:
    """Pad `x` at the end of `axis` with `value` up to `length` (a cache buffer grown; never shrunk)."""
    extra = length - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot shrink a cache buffer from {x.shape[axis]} to max_len={length} slots")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
