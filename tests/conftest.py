"""Shared test set-up: a persistent XLA compilation cache, a fixed hypothesis profile, x64 helpers."""

import gc
import os
import pathlib

import jax
import pytest
from hypothesis import HealthCheck, settings

_CACHE = pathlib.Path(os.environ.get("GUARD_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "guard_jax" / "xla"))
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=40, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats (for comparisons with exact values)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's in-memory caches of compiled programs after each test module. Every XLA:CPU executable keeps
    memory maps of its code, and one xdist worker compiling the suite's programs for 13 minutes passed Linux's
    default limit of 65,530 maps per process (`vm.max_map_count`): XLA then crashed in a compile or a cache
    write (seen twice, in the same late test). The disk cache keeps recompiling cheap."""
    yield
    jax.clear_caches()
    gc.collect()
