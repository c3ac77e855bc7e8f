"""Shared helpers for the benchmarks: timing, the machine's measured matmul peak, one JSON line out."""

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
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / timed(lambda: f(a).block_until_ready(), repeats)


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
