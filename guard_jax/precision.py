"""Memory levers on an `LM`: a mixed-precision policy and rematerialisation of the transformer blocks.

Policies (`with_precision(lm, policy)`), each a (compute dtype, parameter storage dtype) pair of the model:

- "fp32": float32 compute and storage (the default everywhere; what the parity tests check).
- "bf16_compute": bfloat16 compute (matmuls, activations, KV cache) with float32 master weights; the trainers'
  Adam moments mirror the params, so they are float32 too. Per parameter: 4 (weights) + 8 (Adam) + 4
  (gradients) bytes, as fp32, but activations and the KV cache take half. Attention scores, softmax, norms and
  logits stay float32 inside the models. The recommended training policy.
- "bf16": bfloat16 compute and storage: weights, gradients and Adam moments in bfloat16 (8 bytes per
  parameter in all); updates smaller than bfloat16's resolution (~0.4% of a weight) are lost, so small
  learning rates (the paper's 1.41e-5) mostly do nothing. For sampling and scoring, not for full fine-tuning; with
  LoRA (guard_jax.lora) the frozen weights are stored in bfloat16 and the float32 adapters are what is trained:
  the policy to train adapters in (2 bytes per frozen parameter).

Measured (tests/test_precision.py, a random 2-layer Llama, V = 64, D = 64, 16 rows of 8 tokens): bf16_compute's
teacher-forced sequence log-probs differ from float32's by 0.6% (relative) at most (0.11 nats of 33), its SFT
loss by under 1% (the test's tolerances: 2% and 1%);
`bench/bench_scale.py` reports the per-device memory of each policy at gemma-2b shape.

`with_remat(lm)`: the model's `remat` switch (`jax.checkpoint` of each block in teacher-forced forwards): the
same loss and gradients, the backward pass recomputes each block's activations instead of keeping them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from guard_jax.lm import LM
from guard_jax.models import lora

POLICIES: dict[str, tuple[jnp.dtype, jnp.dtype]] = {
    "fp32": (jnp.float32, jnp.float32),
    "bf16_compute": (jnp.bfloat16, jnp.float32),
    "bf16": (jnp.bfloat16, jnp.bfloat16),
}


def policy_dtypes(policy: str) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter storage dtype) of `policy`; ValueError listing the policies otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    return POLICIES[policy]


def with_precision(lm: LM, policy: str) -> LM:
    """The same LM computing and storing in `policy`'s dtypes (its floating params cast to the storage dtype)."""
    compute, storage = policy_dtypes(policy)
    for field in ("dtype", "param_dtype"):
        if not hasattr(lm.model, field):
            raise ValueError(f"with_precision needs a model with a `{field}` field (GPT2, Gemma, Llama), got {type(lm.model).__name__}")
    model = dataclasses.replace(lm.model, dtype=compute, param_dtype=storage)
    cast = lambda x: x.astype(storage) if jnp.issubdtype(x.dtype, jnp.floating) else x
    adapters, frozen = lora.split(lm.params)  # LoRA adapters stay float32 (see guard_jax.lora)
    params = jax.tree.map(cast, lm.params) if frozen is None else lora.join(adapters, jax.tree.map(cast, frozen))
    return dataclasses.replace(lm, model=model, params=params)


def with_remat(lm: LM, remat: bool = True) -> LM:
    """The same LM with its model's `remat` switch set (GPT2, Gemma, Llama)."""
    if not hasattr(lm.model, "remat"):
        raise ValueError(f"with_remat needs a model with a `remat` field (GPT2, Gemma, Llama), got {type(lm.model).__name__}")
    return dataclasses.replace(lm, model=dataclasses.replace(lm.model, remat=remat))
