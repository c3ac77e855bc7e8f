"""Gemma 1, 2 and 3 (text) in Flax, with a real KV cache, loadable from Hugging Face checkpoints.

The architecture follows transformers' `GemmaForCausalLM` / `Gemma2ForCausalLM` / `Gemma3ForCausalLM` (eager
attention), built on the shared decoder (decoder.py):
- token embeddings scaled by sqrt(hidden_size) (the scale rounded to the compute dtype, as HF does), tied head;
- RMSNorm computed in float32 with weight (1 + w), cast back to the compute dtype;
- GeGLU MLP `down(gelu(gate(x)) * up(x))` (tanh-approximate gelu), RoPE (rotate-half layout),
  grouped-query attention (`num_key_value_heads` <= `num_attention_heads`, 1 = multi-query), `head_dim` from config;
- Gemma 2 adds: post-attention / pre- and post-feedforward norms, attention-logit soft-capping, final-logit
  soft-capping, query scale `query_pre_attn_scalar ** -0.5`, and layers alternating between a sliding window
  (a query at position p sees keys at positions > p - sliding_window) and global attention;
- Gemma 3 keeps Gemma 2's layout (soft-caps off by default, five sliding layers to one global), adds a per-head
  RMSNorm of queries and keys, and gives sliding layers their own RoPE base (`rope_local_theta`, 10^4) while
  global layers use `rope_theta` (10^6), optionally with linear scaling (`rope_linear_factor`). A multimodal
  Gemma 3 folder (model_type "gemma3", `Gemma3ForConditionalGeneration`) loads as its text model (the vision
  tower is left out) and exports as gemma3_text.

Padding, the cache and its layout are those of decoder.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from guard_jax.models import decoder
from guard_jax.models.lora import LoraSpec
from guard_jax.models.decoder import Arch, RoPE, params_to_hf  # noqa: F401 (the hf.py interface)

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
_TEXT_TYPES = ("gemma", "gemma2", "gemma3_text")  # by version; "gemma3" is Gemma 3's multimodal wrapper
# Gemma3TextConfig's defaults: a multimodal checkpoint's text_config lists only what differs from them
_GEMMA3_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)
# where Gemma3ForConditionalGeneration checkpoints keep the text model's "model." tensors (older, newer layout)
_MULTIMODAL_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")


@dataclasses.dataclass(frozen=True)
class Gemma(decoder.DecoderLM):
    """Static configuration of a Gemma 1, 2 or 3 causal LM (`version` 1, 2, 3; an ARM, see base.py).

    `layer_types` gives each layer "sliding_attention" or "full_attention" (Gemma 1: all full).
    Gemma 3 only: `rope_local_theta` is the RoPE base of sliding layers (None: `rope_theta`) and
    `rope_linear_factor` divides the global layers' RoPE frequencies (None: unscaled).
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
    rope_local_theta: float | None = None
    rope_linear_factor: float | None = None
    bos_id: int = 2
    eos_id: int | None = 1
    pad_id: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False  # jax.checkpoint each layer of a teacher-forced forward (same values, less memory)
    lora: LoraSpec | None = None  # LoRA adapters on the targeted projections (guard_jax.lora.with_lora)

    def __post_init__(self):
        if self.version not in (1, 2, 3):
            raise ValueError(f"version must be 1 (Gemma), 2 (Gemma 2) or 3 (Gemma 3), got {self.version}")
        if self.version < 3 and (self.rope_local_theta is not None or self.rope_linear_factor is not None):
            raise ValueError("rope_local_theta and rope_linear_factor are Gemma 3 options; leave them None for version < 3")
        self.check_config()

    @property
    def model_type(self) -> str:
        return _TEXT_TYPES[self.version - 1]

    @property
    def arch(self) -> Arch:
        return Arch(norm_offset=True, embed_scale=True, sandwich_norms=self.version >= 2, qk_norm=self.version == 3,
                    activation="gelu_pytorch_tanh" if self.approximate_gelu else "gelu")

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer (None = global attention)."""
        if self.layer_types is not None and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def rope(self, layer: int) -> RoPE:
        """The rotary embedding of a layer (Gemma 3: its own base on sliding layers, linear scaling on global ones)."""
        if self.window(layer) and self.rope_local_theta is not None:
            return RoPE(self.rope_local_theta)
        if self.window(layer) is None and self.rope_linear_factor is not None:
            return RoPE(self.rope_theta, "linear", factor=self.rope_linear_factor)
        return RoPE(self.rope_theta)

    @property
    def scale(self) -> float:
        """The query scale of attention."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5


# ---------------------------------------------------------------------- Hugging Face config and tensors


def _default_rope_theta(config: dict) -> float:
    rope = decoder.rope_from_hf(config)
    if rope.type != "default":
        raise ValueError(f"config rope type {rope.type!r} is not supported (only the default RoPE of Gemma)")
    return rope.theta


def _gemma3_ropes(config: dict) -> tuple[float, float | None, float]:
    """(global theta, global linear factor or None, local theta) of a Gemma 3 config."""
    params = config.get("rope_parameters") or {}
    if params and not all(isinstance(v, dict) for v in params.values()):
        params = {"full_attention": params}  # a single dict: the global layers' (as the older rope_scaling)
    full = decoder.rope_from_hf({**config, "rope_parameters": params.get("full_attention")}, 1_000_000.0)
    local = decoder.rope_from_hf({"rope_parameters": params.get("sliding_attention")},
                                 config.get("rope_local_base_freq", 10_000.0))
    if full.type not in ("default", "linear") or local.type != "default":
        raise ValueError(f"config rope types {full.type!r} (full attention) / {local.type!r} (sliding) are not "
                         f"supported by Gemma 3: use 'default' or 'linear' (full) and 'default' (sliding)")
    return full.theta, full.factor if full.type == "linear" else None, local.theta


def _gelu_is_approximate(config: dict, version: int) -> bool:
    # Gemma 1 reads `hidden_act` and treats the legacy "gelu" as the tanh approximation; Gemma 2/3 read `hidden_activation`.
    if version == 1:
        act = config.get("hidden_act") or config.get("hidden_activation") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    else:
        act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"config activation {act!r} is not supported (gelu_pytorch_tanh or gelu)")
    return act == "gelu_pytorch_tanh"


def from_hf_config(config: dict, dtype=jnp.float32, param_dtype=jnp.float32) -> Gemma:
    """A `Gemma` from a Hugging Face config.json dict (model_type "gemma", "gemma2", "gemma3_text", or "gemma3":
    the text model of a multimodal Gemma 3, from its `text_config`; it exports as gemma3_text)."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config model_type {model_type!r} is not a Gemma; this module reads {MODEL_TYPES}")
    if model_type == "gemma3":
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        config = {**ids, **(config.get("text_config") or {}), "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type == "gemma3_text":
        config = {**_GEMMA3_DEFAULTS, **config}
    version = _TEXT_TYPES.index(model_type) + 1
    if not config.get("tie_word_embeddings", True):
        raise ValueError("config tie_word_embeddings=False is not supported: Gemma ties its output head to the embedding")
    if config.get("attention_bias", False):
        raise ValueError("config attention_bias=True is not supported by this Gemma")
    if config.get("use_bidirectional_attention"):
        raise ValueError("config use_bidirectional_attention=True is not a causal LM")
    fields = dict(
        **decoder.shape_from_hf(config),
        version=version,
        max_position_embeddings=config.get("max_position_embeddings", 8192),
        approximate_gelu=_gelu_is_approximate(config, version),
        bos_id=config.get("bos_token_id", 2),
        eos_id=decoder.single_eos(config, 1),
        pad_id=config.get("pad_token_id", 0) if config.get("pad_token_id") is not None else 0,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    if version == 1:
        fields["rope_theta"] = _default_rope_theta(config)
    else:
        n = config["num_hidden_layers"]
        pattern = 2 if version == 2 else config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
        layer_types = config.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
        ]
        fields.update(
            query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=config.get("attn_logit_softcapping", 50.0 if version == 2 else None),
            final_logit_softcapping=config.get("final_logit_softcapping", 30.0 if version == 2 else None),
            sliding_window=config.get("sliding_window", 4096),
            layer_types=tuple(layer_types),
        )
        if version == 2:
            fields["rope_theta"] = _default_rope_theta(config)
        else:
            fields["rope_theta"], fields["rope_linear_factor"], fields["rope_local_theta"] = _gemma3_ropes(config)
    return Gemma(**fields)


_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


def to_hf_config(model: Gemma) -> dict:
    """A config.json dict that transformers loads into the same architecture."""
    config = {
        "architectures": [_ARCHITECTURES[model.version - 1]],
        "model_type": model.model_type,
        **decoder.shape_to_hf(model),
        "max_position_embeddings": model.max_position_embeddings,
        "tie_word_embeddings": True,
        "attention_bias": False,
    }
    if model.version == 3:
        factor = model.rope_linear_factor
        full = RoPE(model.rope_theta, "linear", factor=factor) if factor is not None else RoPE(model.rope_theta)
        config["rope_parameters"] = {
            "full_attention": full.to_hf(),
            "sliding_attention": RoPE(model.rope_local_theta if model.rope_local_theta is not None else model.rope_theta).to_hf(),
        }
    else:
        config["rope_parameters"] = RoPE(model.rope_theta).to_hf()
        config["rope_theta"] = model.rope_theta
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



def params_from_hf(model: Gemma, get_tensor: Callable[[str], np.ndarray], names: set[str]) -> dict:
    """Parameters from HF tensors (see `decoder.params_from_hf`). From a multimodal Gemma 3 checkpoint only the
    text model's tensors are read (the vision tower and projector are left out)."""
    prefix = next((p for p in _MULTIMODAL_TEXT_PREFIXES if any(n.startswith(p) for n in names)), None)
    if prefix is None:
        return decoder.params_from_hf(model, get_tensor, names)
    text = {"model." + n[len(prefix):]: n for n in names if n.startswith(prefix)}
    return decoder.params_from_hf(model, lambda name: get_tensor(text[name]), set(text))
