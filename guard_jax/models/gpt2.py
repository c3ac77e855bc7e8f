"""GPT-2 (the architecture of Hugging Face `GPT2LMHeadModel`) in Flax, with a real KV cache.

Pre-LN transformer: learned token and position embeddings, fused QKV projection (`c_attn`), GELU MLP,
final LayerNorm and a head tied to the token embedding. Parameters keep Hugging Face's names and layouts
(`Conv1D` weights are [in, out], like Flax `Dense` kernels), so checkpoint conversion is a renaming.

Left-padded batches: positions are `cumsum(mask) - 1`, so padding never shifts a row, and padded keys are
masked out. The decoding cache holds fixed-size key/value buffers [B, H, L, K] per layer, the key mask,
each row's next position and the next write slot (shared by all rows: prompts are left-padded).

Shapes: B batch, T query positions, L cache slots, D model width, H heads, K head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.models import lora as lora_lib
from guard_jax.models.base import pad_to

MODEL_TYPES = ("gpt2",)

_ACTIVATIONS = {
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
_NEG = -1e30  # masked attention score (finite: a fully masked padding row stays finite)


def _attend(q_BHTK, k_BHSK, v_BHSK, mask_BTS, scale: float):
    """Softmax attention of T queries over S keys (scores and softmax in float32) -> out_BTHK.

    Keys and values are head-major ([B, H, S, K], the cache layout): both products are then plain batched
    matmuls and XLA never transposes the cache (a [B, S, H, K] cache was copied whole at every step).
    """
    s_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK, k_BHSK, preferred_element_type=jnp.float32) * scale
    s_BHTS = jnp.where(mask_BTS[:, None], s_BHTS, _NEG)
    p_BHTS = jax.nn.softmax(s_BHTS, axis=-1).astype(v_BHSK.dtype)
    return jnp.einsum("bhts,bhsk->bthk", p_BHTS, v_BHSK)


class _Block(nn.Module):
    n_head: int
    n_inner: int
    activation: str
    eps: float
    scale: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BTD, mask_BTS, kv=None, index=None):
        """kv = (k_BHLK, v_BHLK) cache buffers: the T new keys/values are written at slot `index` and the
        queries attend over all L slots; without kv they attend over the T positions themselves."""
        B, T, D = x_BTD.shape
        H, K = self.n_head, D // self.n_head
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                         kernel_init=nn.initializers.normal(0.02))
        norm = lambda name: nn.LayerNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        qkv_BT3D = dense(3 * D, "c_attn")(norm("ln_1")(x_BTD))
        q_BHTK, k_BHTK, v_BHTK = (t.reshape(B, T, H, K).transpose(0, 2, 1, 3) for t in jnp.split(qkv_BT3D, 3, axis=-1))
        if kv is None:
            new_kv = None
            k_BHSK, v_BHSK = k_BHTK, v_BHTK
        else:
            k_BHLK, v_BHLK = kv
            zero = jnp.zeros((), jnp.int32)
            k_BHSK = jax.lax.dynamic_update_slice(k_BHLK, k_BHTK.astype(k_BHLK.dtype), (zero, zero, index, zero))
            v_BHSK = jax.lax.dynamic_update_slice(v_BHLK, v_BHTK.astype(v_BHLK.dtype), (zero, zero, index, zero))
            new_kv = (k_BHSK, v_BHSK)
        a_BTHK = _attend(q_BHTK, k_BHSK, v_BHSK, mask_BTS, self.scale)
        x_BTD = x_BTD + dense(D, "c_proj")(a_BTHK.reshape(B, T, D))
        h_BTF = _ACTIVATIONS[self.activation](dense(self.n_inner, "c_fc")(norm("ln_2")(x_BTD)))
        x_BTD = x_BTD + dense(D, "mlp_c_proj")(h_BTF)
        return x_BTD, new_kv


class _GPT2Net(nn.Module):
    cfg: "GPT2"

    @nn.compact
    def __call__(self, tokens_BT, pos_BT, mask_BTS, kvs=None, index=None, features=False):
        """-> (logits_BTV, new kvs); with `features`, the final hidden states x_BTD before the head."""
        c = self.cfg
        embed_init = nn.initializers.normal(0.02)
        wte = nn.Embed(c.vocab_size, c.n_embd, dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=embed_init, name="wte")
        wpe = nn.Embed(c.n_positions, c.n_embd, dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=embed_init, name="wpe")
        x_BTD = wte(tokens_BT) + wpe(pos_BT)
        new_kvs = []
        for i in range(c.n_layer):
            scale = (c.n_embd // c.n_head) ** -0.5 if c.scale_attn_weights else 1.0
            if c.scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            block_cls = nn.remat(_Block) if c.remat and kvs is None else _Block
            block = block_cls(c.n_head, c.inner, c.activation, c.layer_norm_epsilon, scale, c.dtype, c.param_dtype, name=f"h_{i}")
            x_BTD, kv = block(x_BTD, mask_BTS, None if kvs is None else kvs[i], index)
            new_kvs.append(kv)
        x_BTD = nn.LayerNorm(c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype, name="ln_f")(x_BTD)
        if features:
            return x_BTD, None
        if c.tie_word_embeddings:
            logits_BTV = wte.attend(x_BTD)
        else:
            logits_BTV = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                                  kernel_init=embed_init, name="lm_head")(x_BTD)
        return logits_BTV, (None if kvs is None else tuple(new_kvs))


@dataclasses.dataclass(frozen=True)
class GPT2:
    """A GPT-2 language model (static configuration only; hashable, so it can be a static jit argument).

    Field names follow Hugging Face's `GPT2Config`; `from_hf_config` builds one from a config.json.
    `bos_id` starts an unconditional sequence (GPT-2: <|endoftext|>), `eos_id` (or None) ends one.
    `remat`: recompute each block's activations in the backward pass of a teacher-forced forward
    (`jax.checkpoint`, the same values and gradients; memory ~ one block's activations instead of all).
    `lora`: a `models.lora.LoraSpec` (adapters beside the targeted kernels, see guard_jax/lora.py) or None.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_id: int = 50256
    eos_id: int | None = 50256
    pad_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    lora: lora_lib.LoraSpec | None = None  # LoRA adapters on the targeted projections (guard_jax.lora.with_lora)

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        for name in ("bos_id", "eos_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} must be a token id in [0, vocab_size={self.vocab_size})")

    @property
    def inner(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def pad_id(self) -> int:
        """The token written after EOS: the config's pad token, else EOS, else BOS (GPT-2 has no pad token)."""
        for value in (self.pad_token_id, self.eos_id, self.bos_id):
            if value is not None:
                return value
        return 0

    @property
    def _net(self) -> nn.Module:
        return lora_lib.adapt(_GPT2Net(self), self.lora)

    def init(self, key: jax.Array) -> dict:
        """Random parameters (normal(0.02) weights, zero biases, unit LayerNorm scales, as Hugging Face)."""
        tokens_BT = jnp.zeros((1, 1), jnp.int32)
        return self._net.init(key, tokens_BT, tokens_BT, jnp.ones((1, 1, 1), bool))["params"]

    def _check_len(self, length: int, what: str) -> None:
        if length > self.n_positions:
            raise ValueError(f"{what} is {length} positions but this GPT-2 has n_positions={self.n_positions}; "
                             f"shorten the prompt or max_new_tokens")

    def _teacher_forced(self, params: dict, tokens_BT: jax.Array, mask_BT: jax.Array | None, features: bool):
        B, T = tokens_BT.shape
        self._check_len(T, "tokens_BT")
        mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
        pos_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
        causal_TT = jnp.tril(jnp.ones((T, T), bool))
        mask_BTT = causal_TT[None] & mask_BT[:, None, :]
        return self._net.apply({"params": params}, tokens_BT.astype(jnp.int32), pos_BT, mask_BTT, features=features)[0]

    def apply(self, params: dict, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
        """Teacher-forced forward pass: tokens_BT (left-padded, mask_BT 1 = real) -> logits_BTV (float32)."""
        logits_BTV = self._teacher_forced(params, tokens_BT, mask_BT, features=False)
        return logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))

    def apply_features(self, params: dict, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`apply` before its head: -> (features x_BTD, output embedding w_VD), logits_BTV = x_BTD @ w_VD.T
        (both in the compute dtype). Scorers use it to take log-probs without holding the logits."""
        x_BTD = self._teacher_forced(params, tokens_BT, mask_BT, features=True)
        w_VD = params["wte"]["embedding"] if self.tie_word_embeddings else params["lm_head"]["kernel"].T
        return x_BTD, w_VD.astype(self.dtype)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """Empty cache for `max_len` positions (prompt + new tokens): k/v [B, H, L, K] per layer."""
        self._check_len(max_len, "max_len (prompt + new tokens)")
        shape = (batch_size, self.n_head, max_len, self.n_embd // self.n_head)
        zeros = lambda: jnp.zeros(shape, self.dtype)
        return {
            "kv": tuple((zeros(), zeros()) for _ in range(self.n_layer)),
            "mask_BL": jnp.zeros((batch_size, max_len), bool),
            "pos_B": jnp.zeros((batch_size,), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }

    def grow_cache(self, cache: dict, max_len: int) -> dict:
        """The cache in buffers of `max_len` slots (new slots empty and masked out)."""
        self._check_len(max_len, "max_len (prompt + new tokens)")
        kv = tuple((pad_to(k, max_len, 2), pad_to(v, max_len, 2)) for k, v in cache["kv"])
        return {**cache, "kv": kv, "mask_BL": pad_to(cache["mask_BL"], max_len, 1, False)}

    def _extend(self, params, tokens_BT, mask_BT, cache):
        """Append T tokens (left-padded chunk) at the cache's write slot -> (logits of the last, cache)."""
        T = tokens_BT.shape[1]
        mask_BT = mask_BT.astype(bool)
        index, L = cache["index"], cache["mask_BL"].shape[1]
        pos_BT = jnp.maximum(cache["pos_B"][:, None] + jnp.cumsum(mask_BT, axis=1) - 1, 0)
        mask_BL = jax.lax.dynamic_update_slice(cache["mask_BL"], mask_BT, (jnp.zeros_like(index), index))
        slot_TL = (jnp.arange(L)[None, :] <= index + jnp.arange(T)[:, None])
        mask_BTL = slot_TL[None] & mask_BL[:, None, :]
        logits_BTV, kv = self._net.apply({"params": params}, tokens_BT.astype(jnp.int32), pos_BT, mask_BTL, cache["kv"], index)
        cache = {"kv": kv, "mask_BL": mask_BL, "pos_B": cache["pos_B"] + mask_BT.sum(1, dtype=jnp.int32), "index": index + T}
        logits_BV = logits_BTV[:, -1]
        return logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32)), cache

    def prefill(self, params: dict, tokens_BP: jax.Array, mask_BP: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Consume a left-padded prompt in one pass -> (logits_BV of the first new token, cache)."""
        return self._extend(params, tokens_BP, mask_BP, cache)

    def decode(self, params: dict, token_B: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Append one token per row -> (logits_BV of the next token, cache)."""
        return self._extend(params, token_B[:, None], jnp.ones((token_B.shape[0], 1), bool), cache)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face conversion (see guard_jax/models/hf.py)


def from_hf_config(config: dict, dtype=jnp.float32, param_dtype=jnp.float32) -> GPT2:
    """A `GPT2` from a Hugging Face GPT-2 config.json (as a dict); unsupported options raise ValueError."""
    if config.get("add_cross_attention"):
        raise ValueError("config.json has add_cross_attention=true: encoder-decoder GPT-2 is not supported")
    eos = config.get("eos_token_id", 50256)
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"config.json eos_token_id={eos}: only one EOS token is supported")
        eos = eos[0]
    bos = config.get("bos_token_id", 50256)
    if bos is None:
        bos = eos if eos is not None else 0
    n_inner = config.get("n_inner")
    return GPT2(
        vocab_size=int(config.get("vocab_size", 50257)),
        n_positions=int(config.get("n_positions", config.get("n_ctx", 1024))),
        n_embd=int(config.get("n_embd", 768)),
        n_layer=int(config.get("n_layer", 12)),
        n_head=int(config.get("n_head", 12)),
        n_inner=None if n_inner is None else int(n_inner),
        activation=config.get("activation_function", "gelu_new"),
        layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        scale_attn_weights=bool(config.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_id=int(bos),
        eos_id=None if eos is None else int(eos),
        pad_token_id=config.get("pad_token_id"),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def to_hf_config(model: GPT2) -> dict:
    """A config.json (dict) that transformers loads as `GPT2LMHeadModel`."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": model.vocab_size,
        "n_positions": model.n_positions,
        "n_embd": model.n_embd,
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_inner": model.n_inner,
        "activation_function": model.activation,
        "layer_norm_epsilon": model.layer_norm_epsilon,
        "scale_attn_weights": model.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": model.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": model.tie_word_embeddings,
        "bos_token_id": model.bos_id,
        "eos_token_id": model.eos_id,
        "pad_token_id": model.pad_token_id,
        "dtype": jnp.dtype(model.param_dtype).name,
    }


def _hf_layout(model: GPT2) -> Iterator[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(HF name without prefix, param path, HF shape) for every tensor of the model."""
    D, F, V = model.n_embd, model.inner, model.vocab_size
    yield "wte.weight", ("wte", "embedding"), (V, D)
    yield "wpe.weight", ("wpe", "embedding"), (model.n_positions, D)
    for i in range(model.n_layer):
        h = f"h.{i}."
        for hf_name, path, shape in (
            ("ln_1.weight", ("ln_1", "scale"), (D,)), ("ln_1.bias", ("ln_1", "bias"), (D,)),
            ("attn.c_attn.weight", ("c_attn", "kernel"), (D, 3 * D)), ("attn.c_attn.bias", ("c_attn", "bias"), (3 * D,)),
            ("attn.c_proj.weight", ("c_proj", "kernel"), (D, D)), ("attn.c_proj.bias", ("c_proj", "bias"), (D,)),
            ("ln_2.weight", ("ln_2", "scale"), (D,)), ("ln_2.bias", ("ln_2", "bias"), (D,)),
            ("mlp.c_fc.weight", ("c_fc", "kernel"), (D, F)), ("mlp.c_fc.bias", ("c_fc", "bias"), (F,)),
            ("mlp.c_proj.weight", ("mlp_c_proj", "kernel"), (F, D)), ("mlp.c_proj.bias", ("mlp_c_proj", "bias"), (D,)),
        ):
            yield h + hf_name, (f"h_{i}",) + path, shape
    yield "ln_f.weight", ("ln_f", "scale"), (D,)
    yield "ln_f.bias", ("ln_f", "bias"), (D,)


def params_from_hf(model: GPT2, get_tensor: Callable[[str], np.ndarray], names: set[str]) -> dict:
    """Params from Hugging Face tensors, fetched one at a time with `get_tensor(name)` (names: all available).

    Accepts both `GPT2LMHeadModel` names ("transformer.h.0...") and bare `GPT2Model` names ("h.0...", as in
    the original `gpt2` checkpoint). Buffers such as "attn.bias" are ignored. Raises ValueError naming the
    tensor when one is missing or has the wrong shape.
    """
    prefix = "transformer." if "transformer.wte.weight" in names else ""
    params: dict = {}

    def put(path, value):
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value

    def fetch(name, shape):
        if name not in names:
            raise ValueError(f"checkpoint has no tensor {name!r} (GPT-2 with n_layer={model.n_layer}); "
                             f"is config.json the one saved with these weights?")
        x = get_tensor(name)
        if tuple(x.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {shape} from config.json")
        return jnp.asarray(x, model.param_dtype)

    for hf_name, path, shape in _hf_layout(model):
        put(path, fetch(prefix + hf_name, shape))
    if not model.tie_word_embeddings:
        put(("lm_head", "kernel"), fetch("lm_head.weight", (model.vocab_size, model.n_embd)).T)
    return params


def params_to_hf(model: GPT2, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs in `GPT2LMHeadModel` names and layouts, one tensor at a time (lm_head only if untied)."""
    for hf_name, path, _ in _hf_layout(model):
        x = params
        for p in path:
            x = x[p]
        yield "transformer." + hf_name, np.asarray(x)
    if not model.tie_word_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
