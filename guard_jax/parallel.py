"""Device meshes: the batch split over devices, parameters and optimizer state sharded FSDP-style.

A mesh has a "data" axis and optionally a "model" axis (`make_mesh(data, model)`); the 1-D `data_mesh()` is
the case model = 1. Every batch (prompts, samples, activations) is split along its leading axis over ALL the
mesh's devices (axes ("data", "model")), and the parameters, the Adam moments that mirror them and any
other copy of them in a train state are split over the "model" axis by `PARAM_RULES` (FSDP / ZeRO-3: each
device stores 1/model of every matrix; inside jit XLA all-gathers a layer's weights where it uses them and
reduce-scatters their gradients). With model = 1 the parameters are replicated: plain data parallelism.

The rules are written once for every family: a parameter's path (dict keys joined by "/") names its
logical axes (`PARAM_RULES`, e.g. `q_proj/kernel` = ("embed", "heads")), and `MESH_RULES` maps one logical
axis of each matrix ("vocab", "heads", "mlp") to "model". A dimension the model axis does not divide is not
split; a floating-point matrix no rule names (toy ARMs), or whose named axis is not divisible, is split
along its largest divisible dimension; vectors, scalars and integer arrays are replicated.

Same samples as one device: the sampler draws the uniforms of the whole batch first (`sampling.uniforms`),
so a given key gives the same samples whatever the mesh, up to float rounding: a smaller per-device batch
or a sharded matmul can change how the kernels sum, so logits differ in their last bits, and a draw whose
uniform falls that close to a CDF boundary takes the neighbouring token (the rest of that row then differs;
the law is the same). Measured on 2 CPU host devices, GPT-2 6 L x 384 d, 64 rows x 128 tokens: one row
changed at step 50, the other rows' sequence log-probs agree within 3e-4, and teacher-forced scores agree
exactly. Classic Colab-TPU path: `sample_pmap` (replicated params).
The batch-drawing driver (`sampling.draw_batches`, `draw`, `score`, hence the GUARD sampler) and every trainer
use this path for an LM with a mesh: `LM.load(..., mesh=make_mesh(2, 4))` or `lm.with_mesh(data_mesh())`.
Multi-host: call `jax.distributed.initialize()` first; the mesh then spans every host's devices and each
host feeds its slice of the batch.

On a multi-core CPU, N host devices (`jax.config.update("jax_num_cpu_devices", N)` right after `import jax`,
before any computation) make the sampler faster: XLA runs one program's ops one after another and computes a batched
attention product on one core, while N devices run N programs side by side (`bench/bench_sampling.py
--host-devices 2`).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from guard_jax.models.base import ARM, Params
from guard_jax.sampling import Samples, log_prob, sample, sample_from_uniforms, uniforms

# path suffix (regex over dict keys joined by "/") -> logical axes of the array, per family
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # models.decoder (Gemma 1-3, Llama, Mistral, Qwen2/3): HF names, kernels [in, out], head [V, D]
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"lm_head", ("vocab", "embed")),
    (r"(q_proj|k_proj|v_proj)/kernel", ("embed", "heads")),
    (r"o_proj/kernel", ("heads", "embed")),
    (r"(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r"down_proj/kernel", ("mlp", "embed")),
    # models.gpt2
    (r"wte/embedding", ("vocab", "embed")),
    (r"wpe/embedding", (None, "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"c_attn/kernel", ("embed", "heads")),
    (r"h_\d+/c_proj/kernel", ("heads", "embed")),
    (r"c_fc/kernel", ("embed", "mlp")),
    (r"mlp_c_proj/kernel", ("mlp", "embed")),
)
# logical axis -> mesh axis (the FSDP choice: one axis of each matrix over "model", the rest whole)
MESH_RULES: dict[str, str | None] = {"vocab": "model", "heads": "model", "mlp": "model", "embed": None}
_COMPILED_RULES = tuple((re.compile(r"(^|/)" + pattern + r"$"), axes) for pattern, axes in PARAM_RULES)


def make_mesh(data: int, model: int = 1, devices=None) -> Mesh:
    """A 2-D mesh of data x model devices with axes ("data", "model") over the first data * model of
    `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(f"make_mesh(data={data}, model={model}) needs data, model >= 1 and data * model <= "
                         f"{len(devices)} devices; choose a factorisation of the device count")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all devices): params replicated."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def model_axis_size(mesh: Mesh | None) -> int:
    """The size of the mesh's "model" axis (1 for None or a 1-D data mesh)."""
    return 1 if mesh is None or "model" not in mesh.axis_names else int(mesh.shape["model"])


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over: all of them (data parallel over "data", FSDP over "model")."""
    return tuple(mesh.axis_names)


def _path_name(path) -> str:
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_spec(name: str, shape: tuple[int, ...], dtype, model_size: int) -> P:
    """The PartitionSpec of one array named `name` (dict keys joined by "/") of `shape` under the rules,
    for a "model" axis of `model_size` devices."""
    if model_size == 1 or len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
        return P()
    for pattern, axes in _COMPILED_RULES:
        if pattern.search(name) and len(axes) == len(shape):
            spec = [MESH_RULES.get(a) if a is not None and n % model_size == 0 else None for a, n in zip(axes, shape)]
            if any(spec):
                return P(*spec)
            break
    divisible = [i for i, n in enumerate(shape) if n % model_size == 0]
    if not divisible:
        return P()
    i = max(divisible, key=lambda i: shape[i])
    return P(*(["model" if j == i else None for j in range(len(shape))]))


def tree_specs(mesh: Mesh | None, tree):
    """PartitionSpecs for every leaf of `tree` (params, an optax state, a TrainState): the rules by each leaf's
    dict-key path, so Adam's moments mirror their parameters."""
    m = model_axis_size(mesh)
    return jax.tree_util.tree_map_with_path(lambda p, x: param_spec(_path_name(p), tuple(np.shape(x)), jnp.result_type(x), m), tree)


def param_shardings(mesh: Mesh, tree):
    """NamedShardings of every leaf of `tree` under the rules (see `tree_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(mesh, tree))


def shard_params(mesh: Mesh | None, tree):
    """Place `tree` (params or a whole train state) on `mesh` under the rules (no-op for mesh None)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, param_shardings(mesh, tree))


def constrain_params(mesh: Mesh | None, tree):
    """Inside a jitted function: `tree` (params, optimizer state) constrained to the rules' shardings."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, param_shardings(mesh, tree))


def check_divisible(batch_size: int, num_devices: int, what: str = "batch size") -> None:
    """Refuse a batch (named `what` in the error) that the devices do not split evenly."""
    if batch_size % num_devices:
        raise ValueError(f"{what}={batch_size} must be divisible by the number of devices {num_devices}; "
                         f"pad the batch or choose a multiple")


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """The sharding of an `ndim`-D array whose `axis` is a batch axis split over every device of the mesh."""
    spec = [None] * ndim
    spec[axis] = batch_axes(mesh)
    return NamedSharding(mesh, P(*spec))


def shard_batch(mesh: Mesh, *arrays):
    """Place arrays with their leading (batch) axis split over every device of the mesh."""
    for x in arrays:
        check_divisible(x.shape[0], mesh.size)
    return tuple(jax.device_put(x, batch_sharding(mesh, x.ndim)) for x in arrays)


def split_batch(x: jax.Array, mesh: Mesh | None, axis: int = 0) -> jax.Array:
    """Inside a jitted function: `x` split along `axis` over every device of the mesh (no-op when mesh is None)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim, axis))


def replicate(mesh: Mesh, tree):
    """Place a pytree whole on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def sample_sharded(key, model: ARM, params: Params, prompt_BP, prompt_mask_BP, max_new_tokens: int, mesh: Mesh,
                   temperature: float = 1.0) -> Samples:
    """`sampling.sample` with the batch split over `mesh` and params sharded by the rules; outputs stay
    sharded along the batch."""
    prompt_BP, prompt_mask_BP = shard_batch(mesh, jnp.asarray(prompt_BP), jnp.asarray(prompt_mask_BP))
    return sample(key, model, shard_params(mesh, params), prompt_BP, prompt_mask_BP, max_new_tokens, temperature)


def log_prob_sharded(model: ARM, params: Params, prompt_BP, prompt_mask_BP, tokens_BT, lengths_B, mesh: Mesh):
    """`sampling.log_prob` with the batch split over `mesh` and params sharded by the rules -> (logp_B, logp_BT)."""
    arrays = shard_batch(mesh, *(jnp.asarray(x) for x in (prompt_BP, prompt_mask_BP, tokens_BT, lengths_B)))
    return log_prob(model, shard_params(mesh, params), *arrays)


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
