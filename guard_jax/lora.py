"""LoRA on an `LM`: low-rank adapters trained instead of the weights, merged back for export.

    a = LM.load(path, mesh=make_mesh(1, 8))                       # any family: GPT-2, Gemma 1-3, Llama, Mistral, Qwen
    pi0 = lora.with_lora(with_precision(a, "bf16_compute"), rank=8, key=jax.random.PRNGKey(0))
    trainer = DPG(pi0, b, DPGConfig(...))                         # SFT, DPG (on/off-policy), L3M, RL: adapters only
    state, _ = loop.run(trainer, trainer.init_state(pi0.params), LoopConfig(steps=...))
    pi = pi0.with_params(state.params)                            # a LoRA LM: sample, score, evaluate as any LM
    lora.export("out/pi", pi)                                     # W + (alpha / r) A B in a Hugging Face folder

The adapters come from qwix (`qwix.LoraProvider`, see guard_jax/models/lora.py): the LM's model gets
`lora=LoraSpec(rank, alpha, targets)`, its params get `kernel_lora_a` [in, r] (he-uniform) and `kernel_lora_b`
[r, out] (zeros) beside each targeted kernel, so the adapted LM starts equal to the base (a zero delta: the same
log-probs up to float rounding, as XLA fuses the adapted program differently). The trainers see the adapters in
the params and differentiate, update and keep Adam moments for the adapters only
(`train.common.trainable_value_and_grad`, `init_opt_state`, `apply_updates`); the base weights are an argument of
each compiled step, never one of its outputs (`train.common.jit_step`), so the trainer's state holds the LM's own
frozen buffers, not a second copy.

The adapters are float32 whatever the policy: `with_precision(lm, "bf16")` stores the frozen weights in bfloat16
(nothing is lost: they never change) next to float32 adapters and float32 Adam moments, the LoRA training
policy; "bf16_compute" keeps float32 weights. `with_remat` keeps the adapters; on a mesh the adapters are sharded
by guard_jax.parallel's rules like any parameter (their large dimension over "model").
"""

from __future__ import annotations

import dataclasses
import os

import jax

from guard_jax.lm import LM
from guard_jax.models import lora as lora_lib
from guard_jax.models.lora import DEFAULT_TARGETS, LoraSpec
from guard_jax.parallel import shard_params

__all__ = ["DEFAULT_TARGETS", "LoraSpec", "with_lora", "merge", "export", "num_adapter_params"]


def with_lora(lm: LM, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS, *, key: jax.Array) -> LM:
    """The LM with rank-`rank` adapters on the projections named in `targets` (default: every attention and MLP
    projection), scaled by alpha / rank (alpha default: rank, a scale of 1); A drawn from `key`, B = 0.

    Only the adapters are created (the base initialisation the model's `init` also traces is dead code that
    XLA drops); they are placed on `lm.mesh` by the sharding rules."""
    spec = LoraSpec(rank, float(rank) if alpha is None else alpha, targets)
    if not hasattr(lm.model, "lora"):
        raise ValueError(f"with_lora needs a model with a `lora` field (GPT2, Gemma, Llama), got {type(lm.model).__name__}")
    if lm.model.lora is not None:
        raise ValueError("this LM already has LoRA adapters; merge them first (guard_jax.lora.merge) to add new ones")
    model = dataclasses.replace(lm.model, lora=spec)
    adapters = jax.jit(lambda k: lora_lib.adapters_of(lora_lib.float32_adapters(model.init(k))))(key)
    if not adapters:
        names = sorted({getattr(k, "key", "") for path, _ in jax.tree_util.tree_leaves_with_path(lm.params) for k in path[-2:-1]})
        raise ValueError(f"lora targets {spec.targets} name no projection of this {type(lm.model).__name__}; "
                         f"its modules include {', '.join(n for n in names if n)[:300]}")
    params = lora_lib.join(shard_params(lm.mesh, adapters), lm.params)
    return dataclasses.replace(lm, model=model, params=params)


def merge(lm: LM) -> LM:
    """The plain LM whose kernels are W + (alpha / rank) A B (the same log-probs as `lm` up to float rounding)."""
    spec = getattr(lm.model, "lora", None)
    if spec is None:
        raise ValueError("merge needs an LM with LoRA adapters (guard_jax.lora.with_lora)")
    return dataclasses.replace(lm, model=dataclasses.replace(lm.model, lora=None), params=lora_lib.merge_params(spec, lm.params))


def export(path: str | os.PathLike, lm: LM, max_shard_bytes: int = 4 << 30):
    """Merge the adapters and write a Hugging Face folder (config.json, safetensors, tokenizer) -> its path."""
    from guard_jax.models import hf

    plain = merge(lm)
    return hf.export(path, plain.model, plain.params, plain.tokenizer, max_shard_bytes=max_shard_bytes)


def num_adapter_params(params) -> int:
    """The number of adapter parameters in `params` (0 without adapters)."""
    return sum(int(x.size) for x in jax.tree.leaves(lora_lib.adapters_of(params)))
