"""The Llama architecture and its Hugging Face variants in Flax (llama, mistral, qwen2, qwen3), with a KV cache.

Built on the shared decoder (decoder.py), following transformers' `LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM` and `Qwen3ForCausalLM` (eager attention):
- plain token embeddings; a separate `lm_head` or one tied to the embedding (`tie_word_embeddings`);
- RMSNorm `w * normalise(x)` (statistics in float32, cast back before the weight);
- SwiGLU MLP `down(silu(gate(x)) * up(x))` (`hidden_act`), RoPE (rotate-half) with `rope_parameters` of type
  default, linear or llama3 (Llama 3.1's band-wise frequency scaling), grouped-query attention with `head_dim`
  from config and query scale head_dim ** -0.5;
- llama: optional `attention_bias` (q, k, v and o projections) and `mlp_bias`;
- mistral: a sliding window on every layer (a query at position p sees keys at positions > p - sliding_window),
  implemented, not refused; `sliding_window: null` is global attention;
- qwen2: biases on the q, k, v projections (not o); sliding layers where `layer_types` says so
  (`use_sliding_window`, `max_window_layers`);
- qwen3: per-head RMSNorm of queries and keys before RoPE, optional `attention_bias`, Qwen2's sliding layers.

Padding, the cache and its layout are those of decoder.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from guard_jax.models import decoder
from guard_jax.models.lora import LoraSpec
from guard_jax.models.decoder import ACTIVATIONS, Arch, RoPE, params_from_hf, params_to_hf  # noqa: F401 (the hf.py interface)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# model_type -> (transformers class, the switches transformers fixes for that family: field -> required value)
_FAMILIES = {
    "llama": ("LlamaForCausalLM", dict(qk_norm=False, sliding_window=None)),
    "mistral": ("MistralForCausalLM", dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, layer_types=None)),
    "qwen2": ("Qwen2ForCausalLM", dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)),
    "qwen3": ("Qwen3ForCausalLM", dict(mlp_bias=False, qk_norm=True)),
}
# config.json keys a checkpoint may leave out, with transformers' defaults for each family
_DEFAULTS = {
    "llama": dict(tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": dict(tie_word_embeddings=False, max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2,
                    sliding_window=4096),
    "qwen2": dict(tie_word_embeddings=False, max_position_embeddings=32768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
    "qwen3": dict(tie_word_embeddings=False, max_position_embeddings=32768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, head_dim=128),
}


@dataclasses.dataclass(frozen=True)
class Llama(decoder.DecoderLM):
    """Static configuration of a Llama-family causal LM (an ARM, see base.py).

    `family` is the Hugging Face model_type it is and exports as ("llama", "mistral", "qwen2", "qwen3"); the
    switches that family fixes (see `_FAMILIES`) are checked. `qkv_bias` / `o_bias`: biases of the q/k/v and
    output projections; `qk_norm`: per-head q/k RMSNorm. `layer_types` gives each layer "sliding_attention" or
    "full_attention" (None: every layer uses `sliding_window`, None = global). `dtype` is the compute dtype,
    `param_dtype` the storage dtype of the parameters.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    family: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_parameters: RoPE = RoPE()
    max_position_embeddings: int = 8192
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_id: int = 1
    eos_id: int | None = 2
    pad_id: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False  # jax.checkpoint each layer of a teacher-forced forward (same values, less memory)
    lora: LoraSpec | None = None  # LoRA adapters on the targeted projections (guard_jax.lora.with_lora)

    attn_logit_softcapping = None  # no soft-caps in this family (the shared decoder reads both)
    final_logit_softcapping = None

    def __post_init__(self):
        if self.family not in _FAMILIES:
            raise ValueError(f"family must be one of {', '.join(MODEL_TYPES)}, got {self.family!r}")
        fixed = _FAMILIES[self.family][1]
        wrong = {k: getattr(self, k) for k, v in fixed.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(f"a {self.family} model has {', '.join(f'{k}={v!r}' for k, v in fixed.items())}; got {wrong}")
        if self.family in ("llama", "qwen3") and self.qkv_bias != self.o_bias:
            raise ValueError(f"{self.family} has one attention_bias for q, k, v and o: qkv_bias and o_bias must be equal")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        self.check_config()

    @property
    def model_type(self) -> str:
        return self.family

    @property
    def arch(self) -> Arch:
        return Arch(norm_offset=False, embed_scale=False, sandwich_norms=False, activation=self.hidden_act,
                    qk_norm=self.qk_norm, qkv_bias=self.qkv_bias, o_bias=self.o_bias, mlp_bias=self.mlp_bias,
                    tied_head=self.tie_word_embeddings)

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer (None = global attention)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def rope(self, layer: int) -> RoPE:
        """The rotary embedding (the same on every layer)."""
        return self.rope_parameters

    @property
    def scale(self) -> float:
        """The query scale of attention."""
        return float(self.head_dim) ** -0.5


# ---------------------------------------------------------------------- Hugging Face config and tensors


def _bos(config: dict) -> int:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError("config.json has no bos_token_id, eos_token_id or pad_token_id: set bos_token_id to the token "
                     "that starts a sequence")


def from_hf_config(config: dict, dtype=jnp.float32, param_dtype=jnp.float32) -> Llama:
    """A `Llama` from a Hugging Face config.json dict (model_type "llama", "mistral", "qwen2" or "qwen3")."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config model_type {model_type!r} is not a Llama variant; this module reads {MODEL_TYPES}")
    config = {**_DEFAULTS[model_type], **config}
    if (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config partial_rotary_factor != 1 is not supported: RoPE rotates the whole head here")
    n = config["num_hidden_layers"]
    eos = decoder.single_eos(config, None)
    pad = config.get("pad_token_id")
    fields = dict(
        **decoder.shape_from_hf(config),
        family=model_type,
        rope_parameters=decoder.rope_from_hf(config),
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=bool(config["tie_word_embeddings"]),
        hidden_act=config.get("hidden_act", "silu"),
        bos_id=_bos(config),
        eos_id=eos,
        pad_id=int(pad) if pad is not None else (eos if eos is not None else 0),
        dtype=dtype,
        param_dtype=param_dtype,
    )
    bias = bool(config.get("attention_bias", False))
    if model_type == "llama":
        fields.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(config.get("mlp_bias", False)))
    elif model_type == "mistral":
        fields["sliding_window"] = config.get("sliding_window")
    else:
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        layer_types = config.get("layer_types") or [
            "sliding_attention" if i >= config["max_window_layers"] else "full_attention" for i in range(n)
        ]
        if window is None:  # transformers drops the window when use_sliding_window is false: all layers global
            layer_types = ["full_attention"] * n
        fields.update(sliding_window=window, layer_types=tuple(layer_types))
        if model_type == "qwen2":
            fields.update(qkv_bias=True)
        else:
            fields.update(qkv_bias=bias, o_bias=bias, qk_norm=True)
    return Llama(**fields)


def to_hf_config(model: Llama) -> dict:
    """A config.json dict that transformers loads into the same architecture."""
    config = {
        "architectures": [_FAMILIES[model.family][0]],
        "model_type": model.family,
        **decoder.shape_to_hf(model),
        "hidden_act": model.hidden_act,
        "rope_parameters": model.rope_parameters.to_hf(),
        "max_position_embeddings": model.max_position_embeddings,
        "tie_word_embeddings": model.tie_word_embeddings,
    }
    if model.family == "llama":
        config.update(attention_bias=model.qkv_bias, mlp_bias=model.mlp_bias)
    elif model.family == "mistral":
        config["sliding_window"] = model.sliding_window
    else:
        layer_types = [
            "sliding_attention" if model.window(i) is not None else "full_attention" for i in range(model.num_hidden_layers)
        ]
        sliding = "sliding_attention" in layer_types
        config.update(
            use_sliding_window=sliding,
            sliding_window=model.sliding_window if sliding else None,
            max_window_layers=layer_types.index("sliding_attention") if sliding else model.num_hidden_layers,
            layer_types=layer_types,
        )
        if model.family == "qwen3":
            config["attention_bias"] = model.qkv_bias
    return config

