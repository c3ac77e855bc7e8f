"""Shared helpers for the benchmarks: timing in turns, the machine's measured matmul peak, the embedded model on both
sides, one JSON line out."""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def machine() -> str:
    dev = jax.devices()[0]
    return f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {dev.platform} ({dev.device_kind})"


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of `fn()` over `repeats` calls (fn must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an XLA float32 n x n matmul on the default device, measured now (the MFU denominator)."""
    run, flops = peak_matmul(n)
    run()
    return flops / timed(run, repeats)


def peak_matmul(n: int = 2048):
    """(run, flops): one XLA float32 n x n matmul on the default device, to time among other turns (the MFU
    denominator measured under the same load as what it divides)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return (lambda: f(a).block_until_ready()), 2.0 * n**3


def torch_peak_matmul(n: int = 2048):
    """(run, flops): the same float32 n x n matmul in torch (its own BLAS, at torch's thread count), to time among the
    other turns: how fast the reference's matmuls can run on this machine, next to XLA's `peak_matmul`."""
    import torch

    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    return (lambda: a @ a), 2.0 * n**3


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each no-argument function, run in turns (A, B, A, B, ...) so that all see the same
    machine load; each is called once first (compilation, warm-up), which is timed separately.
    -> {"median": {name: s}, "first": {name: s}, "cores": CPU seconds of this process per wall second over the
    timed turns}. "cores" says how quiet the run was: near the core count when the machine was this process's,
    lower when other processes took cores (the load average does not show it: it counts waiting processes, and
    under Linux's autogroup scheduling a niced process of another session still takes an equal share)."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    cores = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    return {"median": {name: float(np.median(t)) for name, t in times.items()}, "first": first, "cores": round(cores, 2)}


def embedded_models():
    """The shipped base LM on both sides: (transformers GPT2LMHeadModel in eval mode, without dropout as
    guard_jax's GPT-2, so a train-mode copy computes the same function; guard_jax LM)."""
    from transformers import GPT2LMHeadModel

    from guard_jax.lm import EMBEDDED, LM

    torch_model = GPT2LMHeadModel.from_pretrained(EMBEDDED, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return torch_model.eval(), LM.load("embedded")


def matmul_params(model) -> int:
    """Weights a GPT-2 token passes through as matmuls: every layer's kernels and the V x D head (position
    embeddings, LayerNorms and biases left out). 2 FLOPs each per token forward, 4 more backward."""
    D, F = model.n_embd, model.inner
    return model.n_layer * (4 * D * D + 2 * D * F) + model.vocab_size * D


def load_average() -> float:
    """The 1-minute load average (every record carries it: on a shared machine ratios, not times, compare)."""
    return round(os.getloadavg()[0], 2)


def host_device_mesh(parser, host_devices: int):
    """`--host-devices N`: N CPU host devices for JAX (it must not have started yet) and their 1-D data mesh;
    None for N = 1. Bad values end the run through `parser.error`."""
    if host_devices < 1:
        parser.error(f"--host-devices must be >= 1, got {host_devices}")
    if host_devices == 1:
        return None
    from guard_jax.parallel import data_mesh

    jax.config.update("jax_num_cpu_devices", host_devices)  # before JAX starts (it refuses after)
    if jax.default_backend() != "cpu":
        parser.error(f"--host-devices is for CPU hosts; JAX's default backend here is {jax.default_backend()}")
    return data_mesh()


def emit(record: dict) -> None:
    """Print one JSON line (the benchmarks' only output on stdout)."""
    print(json.dumps({**record, "machine": machine()}), flush=True)
