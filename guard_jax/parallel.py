"""Data parallelism: the batch split over devices, with the same samples and scores as one device.

Main path: `jax.jit` with `NamedSharding` over a 1-D device mesh (axis "data"); params are replicated,
prompts and outputs are split along the batch. Classic Colab-TPU path: `sample_pmap`. Both draw the
uniforms of the whole batch first (`sampling.uniforms`), so a given key gives the same samples whatever
the number of devices, up to float rounding: a smaller per-device batch can change how the matmul kernels
sum, so logits differ in their last bits, and a draw whose uniform falls that close to a CDF boundary takes
the neighbouring token (the rest of that row then differs; the law is the same). Measured on 2 CPU host
devices, GPT-2 6 L x 384 d, 64 rows x 128 tokens: one row changed at step 50, the other rows' sequence
log-probs agree within 3e-4, and teacher-forced scores agree exactly.
The batch-drawing driver (`sampling.draw_batches`, `draw`, `score`, hence the GUARD sampler) and DPG use
this path for an LM with a mesh: `LM.load(..., mesh=data_mesh())` or `lm.with_mesh(data_mesh())`.
Multi-host: call `jax.distributed.initialize()` first; the mesh then spans every host's devices and each
host feeds its slice of the batch.

On a multi-core CPU, N host devices (`jax.config.update("jax_num_cpu_devices", N)` right after `import jax`,
before any computation) make the sampler faster: XLA runs one program's ops one after another and computes a batched
attention product on one core, while N devices run N programs side by side (`bench/bench_sampling.py
--host-devices 2`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from guard_jax.models.base import ARM, Params
from guard_jax.sampling import Samples, log_prob, sample, sample_from_uniforms, uniforms


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all devices)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def check_divisible(batch_size: int, num_devices: int, what: str = "batch size") -> None:
    """Refuse a batch (named `what` in the error) that the devices do not split evenly."""
    if batch_size % num_devices:
        raise ValueError(f"{what}={batch_size} must be divisible by the number of devices {num_devices}; "
                         f"pad the batch or choose a multiple")


def shard_batch(mesh: Mesh, *arrays):
    """Place arrays with their leading (batch) axis split over the mesh's "data" axis."""
    for x in arrays:
        check_divisible(x.shape[0], mesh.size)
    spec = lambda x: NamedSharding(mesh, P("data", *([None] * (x.ndim - 1))))
    return tuple(jax.device_put(x, spec(x)) for x in arrays)


def split_batch(x: jax.Array, mesh: Mesh | None, axis: int = 0) -> jax.Array:
    """Inside a jitted function: `x` split along `axis` over the mesh's "data" axis (no-op when mesh is None)."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[axis] = "data"
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def replicate(mesh: Mesh, tree):
    """Place a pytree (e.g. params) whole on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def sample_sharded(key, model: ARM, params: Params, prompt_BP, prompt_mask_BP, max_new_tokens: int, mesh: Mesh,
                   temperature: float = 1.0) -> Samples:
    """`sampling.sample` with the batch split over `mesh`; outputs stay sharded along the batch."""
    prompt_BP, prompt_mask_BP = shard_batch(mesh, jnp.asarray(prompt_BP), jnp.asarray(prompt_mask_BP))
    return sample(key, model, replicate(mesh, params), prompt_BP, prompt_mask_BP, max_new_tokens, temperature)


def log_prob_sharded(model: ARM, params: Params, prompt_BP, prompt_mask_BP, tokens_BT, lengths_B, mesh: Mesh):
    """`sampling.log_prob` with the batch split over `mesh` -> (logp_B, logp_BT)."""
    arrays = shard_batch(mesh, *(jnp.asarray(x) for x in (prompt_BP, prompt_mask_BP, tokens_BT, lengths_B)))
    return log_prob(model, replicate(mesh, params), *arrays)


@functools.partial(jax.pmap, axis_name="data", static_broadcasted_argnums=(0, 5), in_axes=(None, None, 0, 0, 0, None))
def _sample_pmapped(model, params, u_DTb, prompt_DbP, mask_DbP, temperature):
    return sample_from_uniforms(u_DTb, model, params, prompt_DbP, mask_DbP, temperature)


def sample_pmap(key, model: ARM, params: Params, prompt_BP, prompt_mask_BP, max_new_tokens: int,
                temperature: float = 1.0) -> Samples:
    """`sampling.sample` through `jax.pmap` over all local devices; returns the whole batch (unsharded)."""
    D, (B, Pl) = jax.local_device_count(), prompt_BP.shape
    check_divisible(B, D)
    u_DTb = uniforms(key, B, max_new_tokens).reshape(max_new_tokens, D, B // D).transpose(1, 0, 2)
    prompt = jnp.asarray(prompt_BP).reshape(D, B // D, Pl)
    mask = jnp.asarray(prompt_mask_BP).reshape(D, B // D, Pl)
    out = _sample_pmapped(model, params, u_DTb, prompt, mask, temperature)
    return Samples(*(x.reshape(B, *x.shape[2:]) for x in out))
