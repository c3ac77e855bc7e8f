"""Gemma decoding throughput and memory-bandwidth roofline, random weights. One JSON line.

    python -m bench.bench_gemma --gemma-2b-shape [--quick] [--batch 1] [--new-tokens 8] [--prompt-len 16]

Without --gemma-2b-shape a small Gemma of the same proportions runs (a smoke test of the script).
With it: random bfloat16 weights of gemma-2b's shape (18 layers, hidden 2048, 8 heads, 1 kv head, head_dim 256,
intermediate 16384, vocab 256000; about 2.5e9 parameters, 5 GB), made tensor by tensor directly in bfloat16
on the device (no float32 copy; see `hashed_uniform`). Reported: peak host memory (ru_maxrss), compile times, tokens/s of
`guard_jax.sampling.sample` end to end (prefill + decoding), the time of one jitted decode step, and the
roofline fraction = (bytes read per decoded token / decode-step time) / measured bandwidth, where the bytes
are all weights (the tied head reads the whole embedding) plus the KV cache, and the bandwidth is that of
a large array copy (read + write) on the same device, measured in the same run.
"""

import argparse
import functools
import math
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import emit, timed
from guard_jax.models.gemma import Gemma
from guard_jax.sampling import sample

GEMMA_2B = dict(
    vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
    num_attention_heads=8, num_key_value_heads=1, head_dim=256,
)
SMALL = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=1, head_dim=32,
)


def peak_host_gib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def copy_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes/s of an XLA elementwise pass over an nbytes float32 array, updated in place (donated) so that no
    fresh memory is touched; counts the read and the write."""
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = step(jnp.zeros((nbytes // 4,), jnp.float32)).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = step(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    del x
    return 2 * nbytes / float(np.median(times))


def progress(stage: str) -> None:
    print(f"[bench_gemma] {stage}: peak host {peak_host_gib():.2f} GiB", file=sys.stderr, flush=True)


@functools.partial(jax.jit, static_argnums=(1, 2))
def hashed_uniform(seed, shape: tuple[int, ...], dtype) -> jax.Array:
    """Pseudo-random weights, uniform with std 0.02, from a murmur3 hash of each element's index (and `seed`).

    One fused elementwise pass that writes the bfloat16 tensor directly: no float32 copy and no random-bit
    buffers (jax.random.normal of gemma-2b's embedding peaks at ~9 GiB on the host). Fine for timing, not statistics.
    """
    h = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + seed * jnp.uint32(0x9E3779B9)
    for mult, shift in ((0x9E3779B1, 16), (0x85EBCA6B, 13), (0xC2B2AE35, 16)):
        h = h * jnp.uint32(mult)
        h = h ^ (h >> shift)
    u = (h >> 8).astype(jnp.float32) * 2.0**-24
    return ((2.0 * u - 1.0) * (0.02 * math.sqrt(3.0))).astype(dtype)


def random_params(model: Gemma) -> dict:
    """Random parameters of `model`'s shapes, made tensor by tensor on the device in `param_dtype`
    (norm weights zero, as `model.init`)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree.flatten(shapes)
    made = []
    for i, leaf in enumerate(leaves):
        made.append(
            jnp.zeros(leaf.shape, leaf.dtype) if leaf.ndim == 1 else hashed_uniform(jnp.uint32(i), leaf.shape, leaf.dtype)
        )
    return jax.tree.unflatten(treedef, made)


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bench(shape: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    bandwidth = copy_bandwidth()
    model = Gemma(**shape, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    t0 = time.perf_counter()
    params = random_params(model)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    param_bytes = tree_bytes(params)
    progress(f"init {init_s:.1f} s")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}

    rng = np.random.default_rng(0)
    prompt_BP = jnp.asarray(rng.integers(3, model.vocab_size, (batch, prompt_len)), jnp.int32)
    mask_BP = jnp.ones_like(prompt_BP)
    key = jax.random.PRNGKey(1)
    run_sample = lambda: jax.block_until_ready(sample(key, model, params, prompt_BP, mask_BP, new_tokens))
    t0 = time.perf_counter()
    run_sample()
    sample_compile_s = time.perf_counter() - t0
    progress(f"sample compiled and run {sample_compile_s:.1f} s")
    sample_s = timed(run_sample, repeats)

    # One decode step alone (cache donated, so it is updated in place), for the roofline.
    max_len = prompt_len + new_tokens
    cache = model.init_cache(batch, max_len)
    _, cache = jax.jit(model.prefill)(params, prompt_BP, mask_BP, cache)
    step = jax.jit(model.decode, donate_argnums=2)
    token_B = prompt_BP[:, -1]
    t0 = time.perf_counter()
    logits_BV, cache = step(params, token_B, cache)
    logits_BV.block_until_ready()
    decode_compile_s = time.perf_counter() - t0
    cache_bytes = tree_bytes(cache)
    times = []
    for _ in range(max(1, new_tokens - 1)):  # stay within the cache's max_len
        t0 = time.perf_counter()
        logits_BV, cache = step(params, token_B, cache)
        logits_BV.block_until_ready()
        times.append(time.perf_counter() - t0)
    decode_s = float(np.median(times))
    bytes_per_token = param_bytes + cache_bytes
    return {
        "bench": "gemma_decode", "shape": "gemma-2b" if shape == GEMMA_2B else "small", **shape,
        "dtype": "bfloat16", "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "param_GiB": round(param_bytes / 2**30, 3), "init_s": round(init_s, 2),
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "sample_compile_plus_first_run_s": round(sample_compile_s, 2), "sample_s": round(sample_s, 3),
        "sample_tokens_per_s": round(batch * new_tokens / sample_s, 3),
        "decode_compile_plus_first_run_s": round(decode_compile_s, 2), "decode_step_s": round(decode_s, 4),
        "decode_tokens_per_s": round(batch / decode_s, 3),
        "bytes_per_decode_step_GiB": round(bytes_per_token / 2**30, 3),
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "achieved_GBps": round(bytes_per_token / decode_s / 1e9, 2),
        "roofline_fraction": round(bytes_per_token / decode_s / bandwidth, 3),
        # the same fraction from whole `sample` calls (prefill included, so a lower bound); inside its scan XLA
        # may hoist per-call work (e.g. CPU's bfloat16 -> float32 weight conversions) that a lone step repeats
        "sample_roofline_fraction": round(bytes_per_token * new_tokens / sample_s / bandwidth, 3),
        "peak_host_GiB": round(peak_host_gib(), 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemma-2b-shape", action="store_true", help="gemma-2b's shape (else a small Gemma)")
    parser.add_argument("--quick", action="store_true", help="short run: prompt 8, 4 new tokens, 1 repeat")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = 8, 4, 1
    shape = GEMMA_2B if args.gemma_2b_shape else SMALL
    emit(bench(shape, args.batch, args.prompt_len, args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
