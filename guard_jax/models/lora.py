"""LoRA adapters on the Flax models through qwix (`qwix.LoraProvider` + `qwix.apply_lora_to_model`).

A model with `lora=LoraSpec(rank, alpha, targets)` (GPT2, Gemma, Llama: the field is on each family's
dataclass) runs its Flax network through qwix's LoRA provider: every matmul of a targeted projection
(`nn.Dense` named in `targets`) computes `x W + (alpha / rank) (x A) B` with two new parameters beside
the kernel, `kernel_lora_a` [in, rank] (he-uniform) and `kernel_lora_b` [rank, out] (zeros, so the adapted
model starts equal to the base: the delta is exactly 0, the log-probs equal up to float rounding), kept in float32 whatever the frozen weights' dtype; the adapted
projection returns the compute dtype. The parameter tree is the base tree with those leaves added.

Pure pytree helpers for the trainers and for export:
- `split(params) -> (trainable, frozen)` / `join(trainable, frozen)`: the adapters and the rest (a tree
  without adapters is all trainable: `(params, None)`);
- `merge_params(spec, params)`: `W + (alpha / rank) A B`, adapters dropped (a plain model's params).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

# every linear projection of the attention and MLP blocks, in both families' names (GPT-2; Gemma/Llama)
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc", "mlp_c_proj",
                   "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUFFIXES = ("_lora_a", "_lora_b")
_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r >= 1, alpha > 0 (the update is scaled by alpha / r), targets: the module names (last path
    component, e.g. "q_proj") whose kernels get adapters."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not float(self.alpha) > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and _NAME.fullmatch(t) for t in targets):
            raise ValueError(f"lora targets must be module names such as ('q_proj', 'v_proj'), got {self.targets!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def provider(self):
        """The qwix provider: one rule matching the targeted modules' paths."""
        return _provider_class()(module_path=r"(.*/)?(" + "|".join(self.targets) + ")", rank=self.rank, alpha=self.alpha)


@functools.cache
def _provider_class():
    """qwix's LoRA provider whose adapted matmuls return the dtype the plain matmul would (the compute dtype).

    qwix adds (x A) B in the adapters' storage dtype: with bfloat16 compute and float32 adapters the projection
    would come out float32 and every later activation with it; the delta is still computed in float32."""
    import qwix

    class Provider(qwix.LoraProvider):
        def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
            out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding)
            return out.astype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))

        def einsum(self, einsum_str, *operands, **kwargs):
            out = super().einsum(einsum_str, *operands, **kwargs)
            return out.astype(kwargs.get("preferred_element_type") or jnp.result_type(*(x.dtype for x in operands)))

    return Provider


def adapt(net: nn.Module, spec: LoraSpec | None) -> nn.Module:
    """The Flax network `net` with LoRA adapters on `spec`'s targets (net itself for spec None)."""
    if spec is None:
        return net
    import qwix

    return qwix.apply_lora_to_model(net, spec.provider())


def _is_adapter(name) -> bool:
    return isinstance(name, str) and name.endswith(SUFFIXES)


def has_adapters(params) -> bool:
    """Whether the tree holds LoRA adapter leaves."""
    return any(_is_adapter(getattr(k, "key", None)) for path, _ in jax.tree_util.tree_leaves_with_path(params) for k in path)


def _partition(tree: dict) -> tuple[dict, dict]:
    adapters, rest = {}, {}
    for name, value in tree.items():
        if isinstance(value, dict):
            a, r = _partition(value)
            if a:
                adapters[name] = a
            if r:
                rest[name] = r
        elif _is_adapter(name):
            adapters[name] = value
        else:
            rest[name] = value
    return adapters, rest


def split(params):
    """-> (trainable, frozen): the adapter leaves and the rest, as two nested dicts; a tree without adapters
    is all trainable: (params, None)."""
    if not has_adapters(params):
        return params, None
    return _partition(params)


def join(trainable, frozen):
    """The inverse of `split`: one nested dict with both trees' leaves."""
    if frozen is None:
        return trainable
    out = dict(frozen)
    for name, value in trainable.items():
        out[name] = join(value, out[name]) if isinstance(value, dict) and name in out else value
    return out


ADAPTER_DTYPE = jnp.float32  # adapters are trained: float32 masters whatever the frozen weights' storage dtype


def float32_adapters(params):
    """`params` with its adapter leaves in float32 (qwix creates them in the kernel's dtype)."""
    train, frozen = split(params)
    if frozen is None:
        return params
    return join(jax.tree.map(lambda x: x.astype(ADAPTER_DTYPE), train), frozen)


def adapters_of(params) -> dict:
    """The adapter leaves of `params` (a nested dict; empty when there are none)."""
    return split(params)[0] if has_adapters(params) else {}


def merge_params(spec: LoraSpec, params):
    """Params of the plain model: every adapted kernel W replaced by W + (alpha / rank) A B (in float32, cast
    back to W's dtype), the adapters dropped."""

    def merge(tree: dict) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = merge(value)
            elif not _is_adapter(name):
                a, b = tree.get(name + "_lora_a"), tree.get(name + "_lora_b")
                if a is None or b is None:
                    out[name] = value
                    continue
                if value.ndim != 2 or a.shape != (value.shape[0], spec.rank) or b.shape != (spec.rank, value.shape[1]):
                    raise ValueError(f"adapters of {name!r} ({a.shape}, {b.shape}) do not factor its [in, out] kernel "
                                     f"{value.shape} at rank {spec.rank}; only nn.Dense kernels can be merged")
                delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
                out[name] = (value.astype(jnp.float32) + spec.scale * delta).astype(value.dtype)
        return out

    return merge(params)
