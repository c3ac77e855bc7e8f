"""The decoder-only transformer shared by the Gemma and Llama families, with a real KV cache.

Both families are one skeleton (transformers' eager attention path):
    embed (Gemma: x sqrt(hidden_size)) -> per layer [RMSNorm -> q/k/v projections (optional biases) -> optional
    per-head q/k RMSNorm -> RoPE -> grouped-query attention (optional soft-cap, optional sliding window) -> o_proj
    (-> Gemma 2/3: post-attention norm) -> residual -> norm -> gated MLP down(act(gate(x)) * up(x)) (-> Gemma 2/3:
    post-feedforward norm) -> residual] -> final RMSNorm -> tied or separate head (optional final soft-cap).
A model class (`Gemma`, `Llama`) holds the static configuration and says which switches it uses through
`arch` (an `Arch`), `rope(layer)`, `window(layer)` and `scale`; `DecoderLM` gives it the ARM methods
(see base.py) and `params_from_hf` / `params_to_hf` map its parameters to Hugging Face tensors.

Padding: rows are left-padded; a token's position is `cumsum(mask) - 1`, so padding shifts nothing. Padding
keys are never attended to; logits at padding positions are finite but meaningless.

Cache (`init_cache`): per layer k/v buffers [B, L, K, H] in the compute dtype, the position held in each slot
`pos_BL` (-1 = empty or padding), the next slot `index` and each row's next position `next_pos_B`. `prefill`
fills slots [0, P) in one pass on an empty cache; each `decode` writes one slot and attends over the buffer.
A sliding window is applied by positions, so the buffer keeps every slot. Writing more than L tokens in all
is not detected under jit (the last slot would be overwritten): size L as prompt length + new tokens, as
`guard_jax.sampling.sample` does.

Shapes: B batch, T query positions, S key positions, L cache slots, D model width, N query heads,
K key/value heads, G = N / K queries per key head, H head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.models import lora as lora_lib
from guard_jax.models.base import pad_to

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACTIVATIONS = {
    "silu": nn.silu,
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
}
_NEG = -1e30  # masked attention score (finite: a row with no visible key gives uniform weights, not NaN)


def dtype_name(dtype: Any, arg: str) -> str:
    """The name of a supported compute/storage dtype; ValueError naming `arg` otherwise."""
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"{arg} must be one of {sorted(DTYPES)}, got {name}")
    return name


@dataclasses.dataclass(frozen=True)
class Arch:
    """The structural switches of a decoder family.

    norm_offset: RMSNorm weight applied as (1 + w) in float32, zero-initialised (Gemma); else w times the
        normalised input cast back to the compute dtype, one-initialised (Llama).
    embed_scale: embeddings multiplied by sqrt(hidden_size), rounded to the compute dtype (Gemma).
    sandwich_norms: post-attention, pre- and post-feedforward norms (Gemma 2, 3); else one norm before the MLP
        named `post_attention_layernorm` (Gemma 1, Llama).
    qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    qkv_bias / o_bias / mlp_bias: biases of the q/k/v, output and MLP projections.
    activation: the MLP's gate activation, a key of `ACTIVATIONS`.
    tied_head: the output head is the token embedding; else a separate `lm_head`.
    """

    norm_offset: bool
    embed_scale: bool
    sandwich_norms: bool
    activation: str
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied_head: bool = True


# ---------------------------------------------------------------------- RoPE

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RoPE:
    """Rotary embedding parameters as Hugging Face's `rope_parameters` (one dict per layer type where they differ).

    type "default": inv_freq = theta^(-2i/H); "linear": divided by `factor`; "llama3": Llama 3.1's band-wise
    scaling (`factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings")}.get(self.type, ())
        missing = [k for k in needs if getattr(self, k) is None]
        if missing:
            raise ValueError(f"rope_type {self.type!r} needs {', '.join(missing)} in rope_parameters")

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """[head_dim / 2] float32 inverse frequencies, computed in float32 as transformers does."""
        exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv = (np.float32(1.0) / np.power(np.float32(self.theta), exponent)).astype(np.float32)
        if self.type == "linear":
            inv = inv / np.float32(self.factor)
        elif self.type == "llama3":
            old = float(self.original_max_position_embeddings)
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = np.float32(2 * math.pi) / inv
            scaled = np.where(wavelen > low_wavelen, inv / np.float32(self.factor), inv)
            smooth = (np.float32(old) / wavelen - np.float32(self.low_freq_factor)) / np.float32(
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return np.asarray(inv, np.float32)

    def to_hf(self) -> dict:
        """The `rope_parameters` dict of config.json."""
        out = {"rope_type": self.type, "rope_theta": self.theta}
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps")


def shape_from_hf(config: dict) -> dict:
    """The fields every decoder family reads alike from config.json (`SHAPE_FIELDS`): sizes, heads (key/value
    heads default to the attention heads, head_dim to hidden_size / heads) and rms_norm_eps (default 1e-6)."""
    heads = config["num_attention_heads"]
    return dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
    )


def shape_to_hf(model) -> dict:
    """The config.json entries of `SHAPE_FIELDS`, the token ids and the storage dtype of a decoder model."""
    return {**{name: getattr(model, name) for name in SHAPE_FIELDS}, "bos_token_id": model.bos_id, "eos_token_id": model.eos_id,
            "pad_token_id": model.pad_id, "attention_dropout": 0.0, "dtype": dtype_name(model.param_dtype, "param_dtype")}


def rope_from_hf(config: dict, default_theta: float = 10000.0, layer_type: str | None = None) -> RoPE:
    """The RoPE of config.json: `rope_parameters` (transformers 5; per layer type when `layer_type` is given and
    the dict is keyed by layer types) or the older `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters")
    if layer_type is not None and isinstance(params, dict) and layer_type in params:
        params = params[layer_type]
    elif isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"config rope_parameters is keyed by layer types {sorted(params)}; this model reads one dict")
    params = dict(params or {})
    scaling = config.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    theta = params.get("rope_theta", config.get("rope_theta", default_theta))
    kwargs = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
              if params.get(k) is not None}
    rope_type = params.get("rope_type") or "default"
    if rope_type == "default":
        kwargs = {}
    elif rope_type == "llama3" and "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = config.get("max_position_embeddings")
    return RoPE(theta=float(theta), type=rope_type, **kwargs)


def rope(x_BTNH: jax.Array, pos_BT: jax.Array, inv_freq_h: np.ndarray) -> jax.Array:
    """Rotary embedding, rotate-half layout, angles in float32 and cos/sin cast to x's dtype (as transformers)."""
    H = x_BTNH.shape[-1]
    angle_BTh = pos_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
    angle_BTH = jnp.concatenate([angle_BTh, angle_BTh], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angle_BTH).astype(x_BTNH.dtype), jnp.sin(angle_BTH).astype(x_BTNH.dtype)
    x1, x2 = x_BTNH[..., : H // 2], x_BTNH[..., H // 2 :]
    return x_BTNH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def positions(mask_BT: jax.Array) -> jax.Array:
    """Token positions of left-padded rows: cumsum(mask) - 1 on real tokens, -1 on padding. -> pos_BT int32."""
    mask_BT = mask_BT > 0
    return jnp.where(mask_BT, jnp.cumsum(mask_BT, axis=1) - 1, -1).astype(jnp.int32)


# ---------------------------------------------------------------------- Flax modules


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, statistics in float32; `offset`: Gemma's (1 + w) form (see `Arch`)."""

    eps: float
    param_dtype: Any
    offset: bool

    @nn.compact
    def __call__(self, x_xD):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        w_D = self.param("scale", init, (x_xD.shape[-1],), self.param_dtype)
        x32 = x_xD.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (y * (1.0 + w_D.astype(jnp.float32))).astype(x_xD.dtype)
        return w_D.astype(x_xD.dtype) * y.astype(x_xD.dtype)


def attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, scale, softcap, window):
    """Grouped-query attention by positions: a query sees keys with 0 <= k_pos <= q_pos (and > q_pos - window).

    Scores and softmax in float32; -> out_BTNH in v's dtype.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    if softcap:
        s_BKGTS = jnp.tanh(s_BKGTS / softcap) * softcap
    q_BT1, k_B1S = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
    visible_BTS = (k_B1S >= 0) & (k_B1S <= q_BT1)
    if window:
        visible_BTS &= k_B1S > q_BT1 - window
    s_BKGTS = jnp.where(visible_BTS[:, None, None], s_BKGTS, _NEG)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


class _Block(nn.Module):
    config: Any  # a DecoderLM
    layer: int

    @nn.compact
    def __call__(self, x_BTD, pos_BT, cache=None, index=None, k_pos_BL=None):
        """One decoder layer. Without cache: attends over its own keys and returns them (k, v) [B, T, K, H].
        With cache (k_BLKH, v_BLKH): writes its keys at slot `index`, attends over the buffer (slot positions
        k_pos_BL) and returns the updated buffers."""
        c, a = self.config, self.config.arch
        B, T, _ = x_BTD.shape
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.param_dtype, a.norm_offset, name=name)
        dense = lambda features, bias, name: nn.Dense(
            features, use_bias=bias, dtype=c.dtype, param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(0.02), name=name,
        )
        N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        inv_freq_h = c.rope(self.layer).inv_freq(H)

        h_BTD = norm("input_layernorm")(x_BTD)
        q_BTNH = dense(N * H, a.qkv_bias, "q_proj")(h_BTD).reshape(B, T, N, H)
        k_BTKH = dense(K * H, a.qkv_bias, "k_proj")(h_BTD).reshape(B, T, K, H)
        v_BTKH = dense(K * H, a.qkv_bias, "v_proj")(h_BTD).reshape(B, T, K, H)
        if a.qk_norm:
            q_BTNH, k_BTKH = norm("q_norm")(q_BTNH), norm("k_norm")(k_BTKH)
        q_BTNH, k_BTKH = rope(q_BTNH, pos_BT, inv_freq_h), rope(k_BTKH, pos_BT, inv_freq_h)
        if cache is None:
            keys, values, k_pos = k_BTKH, v_BTKH, pos_BT
        else:
            start = (jnp.zeros_like(index), index, jnp.zeros_like(index), jnp.zeros_like(index))
            keys = jax.lax.dynamic_update_slice(cache[0], k_BTKH.astype(cache[0].dtype), start)
            values = jax.lax.dynamic_update_slice(cache[1], v_BTKH.astype(cache[1].dtype), start)
            k_pos = k_pos_BL
        out_BTNH = attention(q_BTNH, keys, values, pos_BT, k_pos, c.scale, c.attn_logit_softcapping, c.window(self.layer))
        h_BTD = dense(c.hidden_size, a.o_bias, "o_proj")(out_BTNH.reshape(B, T, N * H))
        if a.sandwich_norms:
            x_BTD = x_BTD + norm("post_attention_layernorm")(h_BTD)
            h_BTD = norm("pre_feedforward_layernorm")(x_BTD)
        else:
            x_BTD = x_BTD + h_BTD
            h_BTD = norm("post_attention_layernorm")(x_BTD)
        gate_BTF = ACTIVATIONS[a.activation](dense(c.intermediate_size, a.mlp_bias, "gate_proj")(h_BTD))
        h_BTD = dense(c.hidden_size, a.mlp_bias, "down_proj")(gate_BTF * dense(c.intermediate_size, a.mlp_bias, "up_proj")(h_BTD))
        if a.sandwich_norms:
            h_BTD = norm("post_feedforward_layernorm")(h_BTD)
        return x_BTD + h_BTD, (keys, values)


class _Decoder(nn.Module):
    """Embedding, decoder layers, final norm and head -> (logits_BTV float32, per-layer (k, v)).

    `last_only`: the head is applied to the last position only (prefill) -> logits_B1V. `features`: no head,
    -> (the final norm's output x_BTD, the head's weights head_VD)."""

    config: Any  # a DecoderLM

    @nn.compact
    def __call__(self, tokens_BT, pos_BT, caches=None, index=None, k_pos_BL=None, last_only=False, features=False):
        c, a = self.config, self.config.arch
        embed = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(0.02), name="embed_tokens",
        )
        x_BTD = embed(tokens_BT)
        if a.embed_scale:
            x_BTD = x_BTD * jnp.asarray(math.sqrt(c.hidden_size), c.dtype)
        kv = []
        block_cls = nn.remat(_Block) if c.remat and caches is None else _Block  # recompute in the backward pass
        for i in range(c.num_hidden_layers):
            x_BTD, kv_i = block_cls(c, i, name=f"layers_{i}")(x_BTD, pos_BT, None if caches is None else caches[i], index, k_pos_BL)
            kv.append(kv_i)
        x_BTD = RMSNorm(c.rms_norm_eps, c.param_dtype, a.norm_offset, name="norm")(x_BTD)
        if last_only:
            x_BTD = x_BTD[:, -1:]
        if a.tied_head:
            head_VD = embed.embedding.astype(c.dtype)
        else:
            head_VD = self.param("lm_head", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size), c.param_dtype)
            head_VD = head_VD.astype(c.dtype)
        if features:  # (x_BTD, head_VD): logits = softcap(x @ head.T), see DecoderLM.apply_features
            return x_BTD, head_VD
        logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, head_VD, preferred_element_type=jnp.float32)
        if c.final_logit_softcapping:
            logits_BTV = jnp.tanh(logits_BTV / c.final_logit_softcapping) * c.final_logit_softcapping
        return logits_BTV, tuple(kv)


# ---------------------------------------------------------------------- the ARM methods


class DecoderLM:
    """The ARM methods (see base.py) of a decoder-only transformer.

    Mixed into a frozen dataclass that has the fields vocab_size, hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, sliding_window,
    layer_types, attn_logit_softcapping, final_logit_softcapping, dtype, param_dtype, remat, lora, bos_id, eos_id, pad_id,
    and provides `arch`, `rope(layer)`, `window(layer)`, `scale` and `model_type` (the Hugging Face family
    it exports as)."""

    def check_config(self) -> None:
        """ValueError naming the field when the heads, dtypes, layer_types or sliding_window are inconsistent."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        dtype_name(self.dtype, "dtype")
        dtype_name(self.param_dtype, "param_dtype")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None (global attention), got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
            if bad:
                raise ValueError(f"layer_types may hold 'sliding_attention' or 'full_attention', got {sorted(bad)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need a positive sliding_window")

    @property
    def _module(self) -> nn.Module:
        return lora_lib.adapt(_Decoder(self), self.lora)

    def init(self, key: jax.Array) -> dict:
        """Random parameters (normal(0.02) matrices, zero biases, norm weights at identity) in `param_dtype`."""
        tokens_BT = jnp.zeros((1, 1), jnp.int32)
        return self._module.init(key, tokens_BT, tokens_BT)["params"]

    def apply(self, params: dict, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits: tokens_BT [B, T] (left-padded if mask_BT [B, T] is given) -> logits_BTV (float32)."""
        if mask_BT is None:
            mask_BT = jnp.ones_like(tokens_BT)
        logits_BTV, _ = self._module.apply({"params": params}, tokens_BT, positions(mask_BT))
        return logits_BTV

    def apply_features(self, params: dict, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`apply` before its head: -> (features x_BTD, output embedding w_VD), logits_BTV = x_BTD @ w_VD.T
        soft-capped by `logit_softcap` (both in the compute dtype). `sampling.log_prob` scores through it
        without holding the logits."""
        if mask_BT is None:
            mask_BT = jnp.ones_like(tokens_BT)
        return self._module.apply({"params": params}, tokens_BT, positions(mask_BT), features=True)

    @property
    def logit_softcap(self) -> float | None:
        """The final logit soft-cap c (logits = c tanh(z / c)), None for none."""
        return self.final_logit_softcapping or None

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """An empty cache for `batch_size` rows of up to `max_len` tokens in all (prompt + new)."""
        shape = (batch_size, max_len, self.num_key_value_heads, self.head_dim)
        return {
            "k": tuple(jnp.zeros(shape, self.dtype) for _ in range(self.num_hidden_layers)),
            "v": tuple(jnp.zeros(shape, self.dtype) for _ in range(self.num_hidden_layers)),
            "pos_BL": jnp.full((batch_size, max_len), -1, jnp.int32),
            "index": jnp.zeros((), jnp.int32),
            "next_pos_B": jnp.zeros((batch_size,), jnp.int32),
        }

    def prefill(self, params: dict, tokens_BP: jax.Array, mask_BP: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Consume a left-padded prompt [B, P] in one pass into an empty cache -> (logits_BV of the next token, cache)."""
        P, L = tokens_BP.shape[1], cache["pos_BL"].shape[1]
        if P > L:
            raise ValueError(f"prompt of {P} tokens does not fit a cache of max_len={L}: size init_cache for prompt + new tokens")
        pos_BP = positions(mask_BP)
        logits_B1V, kv = self._module.apply({"params": params}, tokens_BP, pos_BP, last_only=True)
        write = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, 0, 0))
        cache = {
            "k": tuple(write(buf, k) for buf, (k, _) in zip(cache["k"], kv)),
            "v": tuple(write(buf, v) for buf, (_, v) in zip(cache["v"], kv)),
            "pos_BL": jax.lax.dynamic_update_slice(cache["pos_BL"], pos_BP, (0, 0)),
            "index": jnp.asarray(P, jnp.int32),
            "next_pos_B": jnp.sum(mask_BP > 0, axis=1).astype(jnp.int32),
        }
        return logits_B1V[:, 0], cache

    def grow_cache(self, cache: dict, max_len: int) -> dict:
        """The cache in buffers of `max_len` slots (new slots empty: position -1)."""
        return {**cache, "k": tuple(pad_to(k, max_len, 1) for k in cache["k"]), "v": tuple(pad_to(v, max_len, 1) for v in cache["v"]),
                "pos_BL": pad_to(cache["pos_BL"], max_len, 1, -1)}

    def decode(self, params: dict, token_B: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Append one token per row -> (logits_BV of the next token, cache)."""
        index, pos_B = cache["index"], cache["next_pos_B"]
        pos_BL = jax.lax.dynamic_update_slice(cache["pos_BL"], pos_B[:, None], (jnp.zeros_like(index), index))
        layer_caches = tuple(zip(cache["k"], cache["v"]))
        logits_B1V, kv = self._module.apply(
            {"params": params}, token_B[:, None].astype(jnp.int32), pos_B[:, None], layer_caches, index, pos_BL
        )
        cache = {
            "k": tuple(k for k, _ in kv),
            "v": tuple(v for _, v in kv),
            "pos_BL": pos_BL,
            "index": index + 1,
            "next_pos_B": pos_B + 1,
        }
        return logits_B1V[:, 0], cache


# ---------------------------------------------------------------------- Hugging Face tensors

_IN_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
_IN_MLP = ("gate_proj", "up_proj", "down_proj")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _param_paths(model: DecoderLM) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter's Flax path -> its Flax shape (the HF shape is the reverse for kernels)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def hf_name(path: tuple[str, ...]) -> str:
    """Flax param path -> HF tensor name: ('layers_3', 'q_proj', 'kernel') -> 'model.layers.3.self_attn.q_proj.weight'."""
    if path == ("lm_head",):
        return "lm_head.weight"
    parts = list(path)
    parts[-1] = _LEAF[parts[-1]]
    if parts[0].startswith("layers_"):
        group = ["self_attn"] if parts[1] in _IN_ATTENTION else ["mlp"] if parts[1] in _IN_MLP else []
        parts[0:1] = ["layers", parts[0][len("layers_"):], *group]
    return "model." + ".".join(parts)


def params_from_hf(model: DecoderLM, get_tensor: Callable[[str], np.ndarray], names: set[str]) -> dict:
    """Parameters from HF tensors, read one at a time with `get_tensor(name)`; `names` = the checkpoint's tensors.

    A tied head's `lm_head.weight` (if saved) and rotary buffers are ignored. Raises ValueError naming the
    tensor when one is missing, has the wrong shape, or is not part of this model.
    """
    paths = _param_paths(model)
    expected = {hf_name(p): p for p in paths}
    ignored = lambda n: n.endswith("rotary_emb.inv_freq") or (n == "lm_head.weight" and model.arch.tied_head)
    unexpected = sorted(n for n in names if n not in expected and not ignored(n))
    if unexpected:
        raise ValueError(f"checkpoint tensors not in this {model.model_type} model: {unexpected[:5]}")
    params: dict = {}
    for name, path in expected.items():
        if name not in names:
            raise ValueError(f"checkpoint has no tensor {name!r} (needed for {model.model_type}); "
                             f"is config.json the one saved with these weights?")
        array = np.asarray(get_tensor(name))
        transpose = path[-1] == "kernel"
        want = paths[path][::-1] if transpose else paths[path]
        if array.shape != want:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {want} from config.json")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(array.T if transpose else array, dtype=model.param_dtype)
        del array
    return params


def params_to_hf(model: DecoderLM, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF tensor name, array in HF layout) for every parameter, one at a time (for a safetensors export)."""
    for path in _param_paths(model):
        leaf = params
        for key in path:
            leaf = leaf[key]
        array = np.asarray(jax.device_get(leaf))
        yield hf_name(path), np.ascontiguousarray(array.T if path[-1] == "kernel" else array)


def single_eos(config: dict, default: int | None) -> int | None:
    """config.json's eos_token_id as one id (the ARM protocol has one end token: the first one listed)."""
    eos = config.get("eos_token_id", default)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)
