"""Gemma 1 and Gemma 2 in Flax, with a real KV cache, loadable from Hugging Face checkpoints.

The architecture follows transformers' `GemmaForCausalLM` / `Gemma2ForCausalLM` (eager attention):
- token embeddings scaled by sqrt(hidden_size) (the scale rounded to the compute dtype, as HF does), tied head;
- RMSNorm computed in float32 with weight (1 + w), cast back to the compute dtype;
- GeGLU MLP `down(gelu(gate(x)) * up(x))` (tanh-approximate gelu), RoPE (rotate-half layout),
  grouped-query attention (`num_key_value_heads` <= `num_attention_heads`, 1 = multi-query), `head_dim` from config;
- Gemma 2 adds: post-attention / pre- and post-feedforward norms, attention-logit soft-capping, final-logit
  soft-capping, query scale `query_pre_attn_scalar ** -0.5`, and layers alternating between a sliding window
  (a query at position p sees keys at positions > p - sliding_window) and global attention.

Padding: rows are left-padded; a token's position is `cumsum(mask) - 1`, so padding shifts nothing. Padding
keys are never attended to; logits at padding positions are finite but meaningless.

Cache (`init_cache`): per layer k/v buffers [B, L, K, H] in the compute dtype, the position held in each slot
`pos_BL` (-1 = empty or padding), the next slot `index` and each row's next position `next_pos_B`. `prefill`
fills slots [0, P) in one pass on an empty cache; each `decode` writes one slot and attends over the buffer.
Writing more than L tokens in all is not detected under jit (the last slot would be overwritten): size L as
prompt length + new tokens, as `guard_jax.sampling.sample` does.
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

from guard_jax.models.base import pad_to

MODEL_TYPES = ("gemma", "gemma2")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_NEG = -1e30  # masked attention score (finite: a row with no visible key gives uniform weights, not NaN)


def _dtype_name(dtype: Any, arg: str) -> str:
    name = jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"{arg} must be one of {sorted(_DTYPES)}, got {name}")
    return name


@dataclasses.dataclass(frozen=True)
class Gemma:
    """Static configuration of a Gemma 1 (`version=1`) or Gemma 2 (`version=2`) causal LM (an ARM, see base.py).

    `layer_types` gives each layer "sliding_attention" or "full_attention" (Gemma 1: all full).
    `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    version: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    query_pre_attn_scalar: float | None = None  # None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # None: all "full_attention"
    approximate_gelu: bool = True
    bos_id: int = 2
    eos_id: int | None = 1
    pad_id: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 (Gemma) or 2 (Gemma 2), got {self.version}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        _dtype_name(self.dtype, "dtype")
        _dtype_name(self.param_dtype, "param_dtype")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
            if bad:
                raise ValueError(f"layer_types may hold 'sliding_attention' or 'full_attention', got {sorted(bad)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need a positive sliding_window")

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer (None = global attention)."""
        if self.layer_types is not None and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def scale(self) -> float:
        """The query scale of attention."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def _module(self) -> _GemmaModule:
        return _GemmaModule(self)

    # ------------------------------------------------------------------ ARM protocol

    def init(self, key: jax.Array) -> dict:
        """Random parameters (normal(0.02) matrices, zero norm weights) in `param_dtype`."""
        tokens_BT = jnp.zeros((1, 1), jnp.int32)
        return self._module.init(key, tokens_BT, tokens_BT)["params"]

    def apply(self, params: dict, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits: tokens_BT [B, T] (left-padded if mask_BT [B, T] is given) -> logits_BTV (float32)."""
        if mask_BT is None:
            mask_BT = jnp.ones_like(tokens_BT)
        x_BTD, _ = self._module.apply({"params": params}, tokens_BT, positions(mask_BT))
        return self._head(params, x_BTD)

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
        x_BPD, kv = self._module.apply({"params": params}, tokens_BP, pos_BP)
        write = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, 0, 0))
        cache = {
            "k": tuple(write(buf, k) for buf, (k, _) in zip(cache["k"], kv)),
            "v": tuple(write(buf, v) for buf, (_, v) in zip(cache["v"], kv)),
            "pos_BL": jax.lax.dynamic_update_slice(cache["pos_BL"], pos_BP, (0, 0)),
            "index": jnp.asarray(P, jnp.int32),
            "next_pos_B": jnp.sum(mask_BP > 0, axis=1).astype(jnp.int32),
        }
        return self._head(params, x_BPD[:, -1]), cache

    def grow_cache(self, cache: dict, max_len: int) -> dict:
        """The cache in buffers of `max_len` slots (new slots empty: position -1)."""
        return {**cache, "k": tuple(pad_to(k, max_len, 1) for k in cache["k"]), "v": tuple(pad_to(v, max_len, 1) for v in cache["v"]),
                "pos_BL": pad_to(cache["pos_BL"], max_len, 1, -1)}

    def decode(self, params: dict, token_B: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Append one token per row -> (logits_BV of the next token, cache)."""
        index, pos_B = cache["index"], cache["next_pos_B"]
        pos_BL = jax.lax.dynamic_update_slice(cache["pos_BL"], pos_B[:, None], (jnp.zeros_like(index), index))
        layer_caches = tuple(zip(cache["k"], cache["v"]))
        x_B1D, kv = self._module.apply(
            {"params": params}, token_B[:, None].astype(jnp.int32), pos_B[:, None], layer_caches, index, pos_BL
        )
        cache = {
            "k": tuple(k for k, _ in kv),
            "v": tuple(v for _, v in kv),
            "pos_BL": pos_BL,
            "index": index + 1,
            "next_pos_B": pos_B + 1,
        }
        return self._head(params, x_B1D[:, 0]), cache

    def _head(self, params: dict, x_xD: jax.Array) -> jax.Array:
        """Tied output head (float32 accumulation) and Gemma 2's final soft-capping: x [..., D] -> logits [..., V]."""
        embedding_VD = params["embed_tokens"]["embedding"].astype(self.dtype)
        logits = jnp.einsum("...d,vd->...v", x_xD, embedding_VD, preferred_element_type=jnp.float32)
        if self.final_logit_softcapping:
            logits = jnp.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits


def positions(mask_BT: jax.Array) -> jax.Array:
    """Token positions of left-padded rows: cumsum(mask) - 1 on real tokens, -1 on padding. -> pos_BT int32."""
    mask_BT = mask_BT > 0
    return jnp.where(mask_BT, jnp.cumsum(mask_BT, axis=1) - 1, -1).astype(jnp.int32)


# ---------------------------------------------------------------------- Flax modules


class _RMSNorm(nn.Module):
    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x_xD):
        w_D = self.param("scale", nn.initializers.zeros, (x_xD.shape[-1],), self.param_dtype)
        x32 = x_xD.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + w_D.astype(jnp.float32))).astype(x_xD.dtype)


def _rope(x_BTNH: jax.Array, pos_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half layout, angles in float32 and cos/sin cast to x's dtype (as HF)."""
    H = x_BTNH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    angle_BTh = pos_BT.astype(jnp.float32)[..., None] * inv_freq
    angle_BTH = jnp.concatenate([angle_BTh, angle_BTh], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angle_BTH).astype(x_BTNH.dtype), jnp.sin(angle_BTH).astype(x_BTNH.dtype)
    x1, x2 = x_BTNH[..., : H // 2], x_BTNH[..., H // 2 :]
    return x_BTNH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, scale, softcap, window):
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
    config: Gemma
    layer: int

    @nn.compact
    def __call__(self, x_BTD, pos_BT, cache=None, index=None, k_pos_BL=None):
        """One decoder layer. Without cache: attends over its own keys and returns them (k, v) [B, T, K, H].
        With cache (k_BLKH, v_BLKH): writes its keys at slot `index`, attends over the buffer (slot positions
        k_pos_BL) and returns the updated buffers."""
        c = self.config
        B, T, _ = x_BTD.shape
        norm = lambda name: _RMSNorm(c.rms_norm_eps, c.param_dtype, name=name)
        dense = lambda features, name: nn.Dense(
            features, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(0.02), name=name,
        )
        N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        h_BTD = norm("input_layernorm")(x_BTD)
        q_BTNH = _rope(dense(N * H, "q_proj")(h_BTD).reshape(B, T, N, H), pos_BT, c.rope_theta)
        k_BTKH = _rope(dense(K * H, "k_proj")(h_BTD).reshape(B, T, K, H), pos_BT, c.rope_theta)
        v_BTKH = dense(K * H, "v_proj")(h_BTD).reshape(B, T, K, H)
        if cache is None:
            keys, values, k_pos = k_BTKH, v_BTKH, pos_BT
        else:
            start = (jnp.zeros_like(index), index, jnp.zeros_like(index), jnp.zeros_like(index))
            keys = jax.lax.dynamic_update_slice(cache[0], k_BTKH.astype(cache[0].dtype), start)
            values = jax.lax.dynamic_update_slice(cache[1], v_BTKH.astype(cache[1].dtype), start)
            k_pos = k_pos_BL
        out_BTNH = _attention(
            q_BTNH, keys, values, pos_BT, k_pos, c.scale, c.attn_logit_softcapping, c.window(self.layer)
        )
        h_BTD = nn.Dense(
            c.hidden_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(0.02), name="o_proj",
        )(out_BTNH.reshape(B, T, N * H))
        if c.version == 2:
            h_BTD = norm("post_attention_layernorm")(h_BTD)
            x_BTD = x_BTD + h_BTD
            h_BTD = norm("pre_feedforward_layernorm")(x_BTD)
        else:
            x_BTD = x_BTD + h_BTD
            h_BTD = norm("post_attention_layernorm")(x_BTD)
        gate = nn.gelu(dense(c.intermediate_size, "gate_proj")(h_BTD), approximate=c.approximate_gelu)
        h_BTD = dense(c.hidden_size, "down_proj")(gate * dense(c.intermediate_size, "up_proj")(h_BTD))
        if c.version == 2:
            h_BTD = norm("post_feedforward_layernorm")(h_BTD)
        return x_BTD + h_BTD, (keys, values)


class _GemmaModule(nn.Module):
    """Embedding, decoder layers and final norm -> (hidden states x_BTD after the final norm, per-layer (k, v))."""

    config: Gemma

    @nn.compact
    def __call__(self, tokens_BT, pos_BT, caches=None, index=None, k_pos_BL=None):
        c = self.config
        embed = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(0.02), name="embed_tokens",
        )
        x_BTD = embed(tokens_BT) * jnp.asarray(math.sqrt(c.hidden_size), c.dtype)
        kv = []
        for i in range(c.num_hidden_layers):
            layer = _Block(c, i, name=f"layers_{i}")
            x_BTD, kv_i = layer(x_BTD, pos_BT, None if caches is None else caches[i], index, k_pos_BL)
            kv.append(kv_i)
        return _RMSNorm(c.rms_norm_eps, c.param_dtype, name="norm")(x_BTD), tuple(kv)


# ---------------------------------------------------------------------- Hugging Face config and tensors


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"config rope type {rope_type!r} is not supported (only the default RoPE of Gemma)")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _gelu_is_approximate(config: dict, version: int) -> bool:
    # Gemma 1 reads `hidden_act` and treats the legacy "gelu" as the tanh approximation; Gemma 2 reads `hidden_activation`.
    if version == 1:
        act = config.get("hidden_act") or config.get("hidden_activation") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    else:
        act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"config activation {act!r} is not supported (gelu_pytorch_tanh or gelu)")
    return act == "gelu_pytorch_tanh"


def from_hf_config(config: dict, dtype=jnp.float32, param_dtype=jnp.float32) -> Gemma:
    """A `Gemma` from a Hugging Face config.json dict (model_type "gemma" or "gemma2")."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config model_type {model_type!r} is not a Gemma; this module reads {MODEL_TYPES}")
    version = 1 if model_type == "gemma" else 2
    if not config.get("tie_word_embeddings", True):
        raise ValueError("config tie_word_embeddings=False is not supported: Gemma ties its output head to the embedding")
    if config.get("attention_bias", False):
        raise ValueError("config attention_bias=True is not supported by this Gemma")
    if config.get("use_bidirectional_attention"):
        raise ValueError("config use_bidirectional_attention=True is not a causal LM")
    heads = config["num_attention_heads"]
    eos = config.get("eos_token_id", 1)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None  # the ARM protocol has one end token: the first one listed
    fields = dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        version=version,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(config),
        max_position_embeddings=config.get("max_position_embeddings", 8192),
        approximate_gelu=_gelu_is_approximate(config, version),
        bos_id=config.get("bos_token_id", 2),
        eos_id=eos,
        pad_id=config.get("pad_token_id", 0) if config.get("pad_token_id") is not None else 0,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    if version == 2:
        n = config["num_hidden_layers"]
        layer_types = config.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
        ]
        fields.update(
            query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=config.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=config.get("final_logit_softcapping", 30.0),
            sliding_window=config.get("sliding_window", 4096),
            layer_types=tuple(layer_types),
        )
    return Gemma(**fields)


def to_hf_config(model: Gemma) -> dict:
    """A config.json dict that transformers loads into the same architecture."""
    config = {
        "architectures": ["GemmaForCausalLM" if model.version == 1 else "Gemma2ForCausalLM"],
        "model_type": MODEL_TYPES[model.version - 1],
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_key_value_heads,
        "head_dim": model.head_dim,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "rope_theta": model.rope_theta,
        "max_position_embeddings": model.max_position_embeddings,
        "bos_token_id": model.bos_id,
        "eos_token_id": model.eos_id,
        "pad_token_id": model.pad_id,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "dtype": _dtype_name(model.param_dtype, "param_dtype"),
    }
    act = "gelu_pytorch_tanh" if model.approximate_gelu else "gelu"
    if model.version == 1:
        if not model.approximate_gelu:
            raise ValueError("Gemma 1 in transformers always uses the tanh-approximate gelu; approximate_gelu must be True")
        config["hidden_act"] = act
    else:
        config.update(
            hidden_activation=act,
            query_pre_attn_scalar=model.query_pre_attn_scalar or model.head_dim,
            attn_logit_softcapping=model.attn_logit_softcapping,
            final_logit_softcapping=model.final_logit_softcapping,
            sliding_window=model.sliding_window,
            layer_types=list(model.layer_types or ["full_attention"] * model.num_hidden_layers),
        )
    return config


def _hf_name(path: tuple[str, ...]) -> str:
    """HF-grouped param path -> HF tensor name: ('layers_3', 'self_attn', 'q_proj', 'kernel') -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = list(path)
    if parts[0].startswith("layers_"):
        parts[0:1] = ["layers", parts[0][len("layers_"):]]
    parts[-1] = "weight"
    return "model." + ".".join(parts)


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _param_paths(model: Gemma) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter's Flax path -> its Flax shape (HF shape is the reverse for kernels)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def _hf_path(path: tuple[str, ...]) -> tuple[str, ...]:
    # Flax nests attention projections under the block; HF puts them under self_attn / mlp.
    if len(path) == 3 and path[1] in _ATTN:
        return (path[0], "self_attn") + path[1:]
    if len(path) == 3 and path[1] in ("gate_proj", "up_proj", "down_proj"):
        return (path[0], "mlp") + path[1:]
    return path


_IGNORED = ("lm_head.weight",)  # tied to the embedding


def params_from_hf(model: Gemma, get_tensor: Callable[[str], np.ndarray], names: set[str]) -> dict:
    """Parameters from HF tensors, read one at a time with `get_tensor(name)`; `names` = the checkpoint's tensors.

    Raises ValueError naming the tensor when one is missing, has the wrong shape, or is not part of this model.
    """
    paths = _param_paths(model)
    expected = {_hf_name(_hf_path(p)): p for p in paths}
    unexpected = sorted(n for n in names if n not in expected and n not in _IGNORED and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"checkpoint tensors not in this {MODEL_TYPES[model.version - 1]} model: {unexpected[:5]}")
    params: dict = {}
    for name, path in expected.items():
        if name not in names:
            raise ValueError(f"checkpoint has no tensor {name!r} (needed for {MODEL_TYPES[model.version - 1]})")
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


def params_to_hf(model: Gemma, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF tensor name, array in HF layout) for every parameter, one at a time (for a safetensors export)."""
    for path in _param_paths(model):
        leaf = params
        for key in path:
            leaf = leaf[key]
        array = np.asarray(jax.device_get(leaf))
        yield _hf_name(_hf_path(path)), np.ascontiguousarray(array.T if path[-1] == "kernel" else array)
