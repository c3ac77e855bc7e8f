"""Small exact autoregressive models over a finite space V^T (enumerable; used to check the theory).

Two kinds share the contract of `guard_jax.models.base`:
- `TabularARM`: any distribution over the prefix tree, one row of logits per prefix.
- `TinyTransformerARM`: a one-layer causal transformer in Flax that trainers can fine-tune.

Both are unconditional: the input sequence starts with `bos_id = vocab_size` (an input-only token),
so `apply(params, [bos, y_1, ..., y_{t}])[:, t]` gives the logits of y_{t+1}. Their decoding cache is the
token buffer itself (each step recomputes the forward pass; the spaces are tiny).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from guard_jax.models.base import pad_to


@dataclasses.dataclass(frozen=True)
class _ToyARM:
    """What the toy ARMs share: sequences of up to `max_len` tokens in [0, V) (EOS `eos_id` or None), BOS = V
    as input only, and decoding by recomputation (the cache is the token buffer, its mask and the write index)."""

    vocab_size: int
    max_len: int
    eos_id: int | None = None

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id must be in [0, vocab_size={self.vocab_size}) or None, got {self.eos_id}")

    @property
    def bos_id(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return 0 if self.eos_id is None else self.eos_id

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        return {
            "tokens_BL": jnp.zeros((batch_size, max_len), jnp.int32),
            "mask_BL": jnp.zeros((batch_size, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }

    def grow_cache(self, cache: dict, max_len: int) -> dict:
        return {**cache, "tokens_BL": pad_to(cache["tokens_BL"], max_len, 1), "mask_BL": pad_to(cache["mask_BL"], max_len, 1)}

    def prefill(self, params, tokens_BP, mask_BP, cache):
        P = tokens_BP.shape[1]
        cache = {
            "tokens_BL": cache["tokens_BL"].at[:, :P].set(tokens_BP.astype(jnp.int32)),
            "mask_BL": cache["mask_BL"].at[:, :P].set(mask_BP.astype(jnp.int32)),
            "index": jnp.asarray(P, jnp.int32),
        }
        return self._logits_at(params, cache, P - 1), cache

    def decode(self, params, token_B, cache):
        i = cache["index"]
        cache = {
            "tokens_BL": jax.lax.dynamic_update_slice(cache["tokens_BL"], token_B[:, None].astype(jnp.int32), (jnp.zeros_like(i), i)),
            "mask_BL": jax.lax.dynamic_update_slice(cache["mask_BL"], jnp.ones_like(token_B)[:, None].astype(jnp.int32), (jnp.zeros_like(i), i)),
            "index": i + 1,
        }
        return self._logits_at(params, cache, i), cache

    def _logits_at(self, params, cache, t):
        logits_BLV = self.apply(params, cache["tokens_BL"], cache["mask_BL"])
        return jax.lax.dynamic_index_in_dim(logits_BLV, t, axis=1, keepdims=False)


@dataclasses.dataclass(frozen=True)
class TabularARM(_ToyARM):
    """Any ARM over V^T: `params["logits_NV"]` holds one row per prefix of length 0..T-1.

    Prefixes are indexed level by level in base-V order: the prefix (y_1..y_t) has row
    `(V^t - 1) / (V - 1) + sum_s y_s V^(t - s)`, so N = (V^T - 1) / (V - 1) rows in all.
    """

    @property
    def num_prefixes(self) -> int:
        V, T = self.vocab_size, self.max_len
        return (V**T - 1) // (V - 1)

    def init(self, key: jax.Array, scale: float = 1.0) -> dict:
        """Random logits, i.i.d. normal with standard deviation `scale` (larger = peakier conditionals)."""
        return {"logits_NV": scale * jax.random.normal(key, (self.num_prefixes, self.vocab_size))}

    def apply(self, params: dict, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
        """tokens_BT[:, 0] is BOS (ignored), tokens_BT[:, 1:] the sequence -> logits_BTV.

        T <= max_len + 1; a complete sequence (position max_len) has no next token: its logits are 0.
        """
        del mask_BT  # unconditional: there is no padding before BOS
        B, T = tokens_BT.shape
        if T > self.max_len + 1:
            raise ValueError(f"tokens_BT has {T} positions but this TabularARM has max_len={self.max_len}")
        if T == self.max_len + 1:
            logits_BTV = self.apply(params, tokens_BT[:, :-1])
            return jnp.concatenate([logits_BTV, jnp.zeros_like(logits_BTV[:, :1])], axis=1)
        V = self.vocab_size
        y_BT = tokens_BT[:, 1:].astype(jnp.int32)

        def step(h_B, y_B):
            h_B = h_B * V + y_B
            return h_B, h_B

        _, h_BT = jax.lax.scan(step, jnp.zeros((B,), jnp.int32), y_BT.T)
        code_BT = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), h_BT.T], axis=1)
        offset_T = jnp.asarray([(V**t - 1) // (V - 1) for t in range(T)], jnp.int32)
        return params["logits_NV"][code_BT + offset_T]


class _TinyTransformer(nn.Module):
    vocab_size: int
    num_positions: int
    d_model: int
    num_heads: int

    @nn.compact
    def __call__(self, tokens_BT, mask_BT):
        B, T = tokens_BT.shape
        x_BTD = nn.Embed(self.vocab_size + 1, self.d_model, name="embed")(tokens_BT)
        pos_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)  # left padding does not shift positions
        x_BTD = x_BTD + nn.Embed(self.num_positions, self.d_model, name="pos_embed")(pos_BT)
        pos_T = jnp.arange(T)
        causal_TT = pos_T[:, None] >= pos_T[None, :]
        attn_mask_B1TT = (causal_TT[None] & (mask_BT[:, None, :] > 0))[:, None]
        h_BTD = nn.LayerNorm(name="ln_attn")(x_BTD)
        x_BTD = x_BTD + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(h_BTD, mask=attn_mask_B1TT)
        h_BTD = nn.LayerNorm(name="ln_mlp")(x_BTD)
        h_BTD = nn.Dense(4 * self.d_model, name="mlp_in")(h_BTD)
        x_BTD = x_BTD + nn.Dense(self.d_model, name="mlp_out")(nn.gelu(h_BTD))
        return nn.Dense(self.vocab_size, name="head")(nn.LayerNorm(name="ln_out")(x_BTD))


@dataclasses.dataclass(frozen=True)
class TinyTransformerARM(_ToyARM):
    """A one-layer causal transformer ARM over V tokens (+ BOS as input), sequences up to max_len.

    Its input is a prompt of up to `context_len` tokens (BOS, or BOS and a context such as a CAP prompt, with
    tokens in [0, V]) followed by the sequence; prompts may be left-padded.
    """

    d_model: int = 32
    num_heads: int = 2
    context_len: int = 1

    @property
    def _module(self) -> _TinyTransformer:
        return _TinyTransformer(self.vocab_size, self.context_len + self.max_len, self.d_model, self.num_heads)

    def init(self, key: jax.Array) -> dict:
        tokens_BT = jnp.full((1, self.context_len + self.max_len), self.bos_id, jnp.int32)
        return self._module.init(key, tokens_BT, jnp.ones_like(tokens_BT))["params"]

    def apply(self, params: dict, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
        """tokens_BT: [B, T <= context_len + max_len], a prompt then the sequence -> logits_BTV (float32 or wider)."""
        if mask_BT is None:
            mask_BT = jnp.ones_like(tokens_BT)
        logits_BTV = self._module.apply({"params": params}, tokens_BT, mask_BT)
        return logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
