"""Pieces the trainers share: Adam, minibatched sampling, teacher-forced log-probs, host-side constraints,
placement on a mesh.

Prompts come from `guard_jax.lm.LM.prompt_arrays` (one row, left-padded to a common length). On a mesh (the
LM's `mesh`), every trainer places its state with `guard_jax.parallel.shard_params` (params, Adam moments and
frozen params sharded by the rules), splits each batch over the devices inside its jitted update
(`split_batch`) and constrains the updated params and optimizer state to the same shardings (`apply_updates`).
With LoRA adapters in the params (guard_jax.lora), gradients, updates and optimizer state cover the adapters only
(`trainable_value_and_grad`, `init_opt_state`, `apply_updates`); the base weights pass through unchanged, as the
very same buffers (`jit_step`). Loops over minibatches or batches tie the params to each iteration
(`sampling.per_iteration`), so a sharded model's gathered weights are not hoisted out of the loop and held whole.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guard_jax.models import lora
from guard_jax.models.base import ARM
from guard_jax.parallel import check_divisible, constrain_params, split_batch
from guard_jax.sampling import log_prob, per_iteration, sample


def adam(learning_rate: float, warmup_steps: int = 0, clip_norm: float | None = None) -> optax.GradientTransformation:
    """Adam with an optional linear warm-up and gradient clipping; refuses a non-positive learning rate."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps > 0 else learning_rate
    parts = ([optax.clip_by_global_norm(clip_norm)] if clip_norm else []) + [optax.adam(schedule)]
    return optax.chain(*parts)


@functools.partial(jax.jit, static_argnames=("model", "num_batches", "batch_size", "max_new_tokens", "mesh"))
def sample_many(key, model: ARM, params, prompt_1P, mask_1P, num_batches: int, batch_size: int, max_new_tokens: int, mesh=None):
    """num_batches * batch_size samples, one batch at a time (memory bounded by the batch); with a `mesh`,
    each batch is split over its "data" axis (the same samples as one device, up to float rounding).

    -> (tokens_NT, lengths_N, logp_N), N = num_batches * batch_size.
    """
    # without a mesh the one prompt row is shared by the batch (its prefill runs once); on a mesh it is repeated
    # and split with the batch, so the whole forward pass is
    prompt_BP, mask_BP = (prompt_1P, mask_1P) if mesh is None else repeat_prompt(prompt_1P, mask_1P, batch_size, mesh)

    def one(_, k):
        p, k = per_iteration(params, k)
        s = sample(k, model, p, prompt_BP, mask_BP, max_new_tokens, batch_size=batch_size)
        return None, (s.tokens_BT, s.lengths_B, s.logp_B)

    _, (tok, length, logp) = jax.lax.scan(one, None, jax.random.split(key, num_batches))
    return tok.reshape(-1, max_new_tokens), length.reshape(-1), logp.reshape(-1)


def trainable(params):
    """The part of `params` a trainer updates: the LoRA adapters when it holds some (guard_jax.lora), else all."""
    return lora.split(params)[0]


def init_opt_state(optimizer: optax.GradientTransformation, params):
    """The optimizer state of the trainable part of `params` (LoRA: Adam moments of the adapters only)."""
    return optimizer.init(trainable(params))


def trainable_value_and_grad(fn, params, *args, has_aux: bool = False):
    """`jax.value_and_grad(fn)(params, *args)` with respect to the trainable part of `params` only (the frozen base
    of a LoRA model gets no gradient, so none is computed or stored) -> (value, grads shaped like `trainable`)."""
    train, frozen = lora.split(params)
    return jax.value_and_grad(lambda t, *a: fn(lora.join(t, frozen), *a), has_aux=has_aux)(train, *args)


def a_params(kept, params):
    """The base a's full params from what a trainer keeps of them (`trainable(base.params)`: all of them; for a LoRA
    LM its initial adapters only) and the policy's params (LoRA: a's adapters joined with the policy's frozen
    weights, so the weights are held once)."""
    return lora.join(kept, lora.split(params)[1])


def check_frozen_base(base_params, params, what: str = "params") -> None:
    """Refuse LoRA `params` whose frozen weights are not the base's (they would stand in for a's)."""
    if not lora.has_adapters(params):
        return
    mine, theirs = jax.tree.leaves(lora.split(params)[1]), jax.tree.leaves(lora.split(base_params)[1])
    same = len(mine) == len(theirs) and all(x is y or (x.shape == y.shape and bool(jnp.array_equal(x, y))) for x, y in zip(mine, theirs))
    if not same:
        raise ValueError(f"{what} are LoRA params whose frozen weights differ from the base LM's; train adapters "
                         f"of the base itself (guard_jax.lora.with_lora(base, ...)) or merge them first")


def apply_updates(optimizer: optax.GradientTransformation, params, opt_state, grads, mesh=None):
    """One optimizer update of the trainable part of `params` (grads shaped like it) -> (params, opt_state); the
    frozen part passes through; on a mesh, both constrained to the rules' shardings."""
    train, frozen = lora.split(params)
    updates, opt_state = optimizer.update(grads, opt_state, train)
    params = lora.join(optax.apply_updates(train, updates), frozen)
    return constrain_params(mesh, params), constrain_params(mesh, opt_state)


def jit_step(static_argnames: tuple[str, ...]):
    """Decorator: `jax.jit` (with `static_argnames`) of a trainer's update fn(state, *args, **kwargs) -> (state,
    metrics) that keeps the frozen weights of a LoRA state out of the compiled program's outputs.

    The frozen part of `state.params` (guard_jax.lora; None without adapters) goes in as an argument of its own and
    only the trainable part comes back; the returned state joins it with the very same frozen arrays, so training
    never holds a second copy of the base weights next to the LM's (a jitted function returns new buffers for
    whatever it outputs, even an unchanged input). `fn.__wrapped__` is the plain function (to jit it otherwise,
    e.g. with the state donated); `fn.jitted` the jitted program (its `_cache_size()` counts its compilations)."""

    def decorate(fn):
        def inner(state, frozen, *args, **kwargs):
            state, metrics = fn(state._replace(params=lora.join(state.params, frozen)), *args, **kwargs)
            return state._replace(params=lora.split(state.params)[0]), metrics

        jitted = jax.jit(inner, static_argnames=static_argnames)

        @functools.wraps(fn)
        def call(state, *args, **kwargs):
            train, frozen = lora.split(state.params)
            new, metrics = jitted(state._replace(params=train), frozen, *args, **kwargs)
            return new._replace(params=lora.join(new.params, frozen)), metrics

        call.jitted = jitted
        return call

    return decorate


def check_mesh_batch(mesh, **batch_sizes) -> None:
    """Refuse batch sizes (named in the error) that the mesh's devices do not split evenly (mesh None: any)."""
    if mesh is not None:
        for name, size in batch_sizes.items():
            check_divisible(int(size), mesh.size, name)


def repeat_prompt(prompt_1P, mask_1P, batch_size: int, mesh=None):
    """The one-row prompt repeated for a batch -> (prompt_BP, mask_BP), split over the mesh's devices (so the
    whole forward pass is, not only the continuations)."""
    return (split_batch(jnp.repeat(prompt_1P, batch_size, 0), mesh), split_batch(jnp.repeat(mask_1P, batch_size, 0), mesh))


def minibatched_log_prob(model: ARM, params, prompt_1P, mask_1P, tokens_MBT, lengths_MB, mesh=None):
    """Teacher-forced log-probs of [M, B, T] samples, one minibatch of B at a time -> logp_MB."""
    B = tokens_MBT.shape[1]
    prompt_BP, mask_BP = repeat_prompt(prompt_1P, mask_1P, B, mesh)

    def one(_, xs):
        p, xs = per_iteration(params, xs)
        xs = tuple(split_batch(x, mesh) for x in xs)
        return None, log_prob(model, p, prompt_BP, mask_BP, *xs)[0]

    return jax.lax.scan(one, None, (tokens_MBT, lengths_MB))[1]


def check_split(n_samples: int, minibatch: int) -> int:
    if n_samples <= 0 or minibatch <= 0:
        raise ValueError(f"n_samples and minibatch must be > 0, got {n_samples} and {minibatch}")
    if n_samples % minibatch:
        raise ValueError(f"n_samples ({n_samples}) must be divisible by minibatch ({minibatch}); e.g. n_samples={n_samples - n_samples % minibatch or minibatch}")
    return n_samples // minibatch


def host_constraint(constraint, tokens_NT, lengths_N) -> np.ndarray:
    """b on the host (text constraints decode there), as a bool numpy array."""
    return np.asarray(constraint(np.asarray(tokens_NT), np.asarray(lengths_N)), bool)
