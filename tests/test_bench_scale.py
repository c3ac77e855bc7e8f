"""The memory plan and the accelerator report run as a user runs them (no numbers asserted beyond their sense)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp

from bench import bench_scale
from guard_jax.models.gemma import Gemma
from guard_jax.parallel import make_mesh
from guard_jax.sampling import sample_from_uniforms
from guard_jax.train import dpg


def test_bench_scale_quick_reports_per_device_bytes():
    out = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--quick"], capture_output=True, text=True,
                         timeout=1200, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["case"], r["devices"]) for r in rows] == [("dpg_update", 8), ("sft_step", 8), ("sampler", 1)]
    for r in rows:
        assert r["total_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"] > 0
    dpg = rows[0]
    # the donated state is aliased: the outputs reuse the arguments' params and Adam buffers
    assert dpg["alias_bytes"] > 0
    # per device on 1x8, the sharded params + Adam moments (fp32: 12 bytes/param) are well under one replica
    assert dpg["argument_bytes"] < 12 * dpg["params"] / 2


def test_accel_on_cpu_reports_no_accelerator(tmp_path):
    """`bash scripts/dev.sh accel` itself (with this test's python: GUARD_JAX_NO_VENV) on a CPU-only JAX: no
    accelerator, exit 0, one JSON report."""
    path = tmp_path / "report.json"
    env = dict(os.environ, GUARD_JAX_NO_VENV="1", JAX_PLATFORMS="cpu", PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "scripts/dev.sh", "accel", "--out", str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(path.read_text())
    assert report["accelerator"] is None and report["status"] == "no accelerator"


def test_goals_are_judged_on_the_best_matching_row():
    """The plan's goal lines: the smallest total among the rows of the goal's model/case/tuning/devices
    (and batch, where the goal fixes it), met against its limit; None without a row."""
    GiB = bench_scale.GiB
    row = lambda case, devices, batch, gib, remat=True, tuning="full": {
        "model": "gemma-2b", "case": case, "tuning": tuning, "devices": devices, "batch": batch, "remat": remat,
        "total_bytes": int(gib * GiB), "total_gib": gib}
    rows = [row("dpg_update", 8, 504, 45.0), row("dpg_update", 8, 80, 15.7), row("dpg_update", 1, 40, 3.0),
            row("sampler", 1, 500, 16.3), row("sampler", 1, 250, 10.0)]
    full, lora, sampler = bench_scale.goal_lines(rows)
    assert (full["met"], full["best_batch"], full["best_gib"]) == (True, 80, 15.7)
    assert lora["met"] is None and lora["rows"] == []
    assert (sampler["met"], sampler["best_batch"]) == (False, 500)  # the goal fixes batch 500


def _big_head_gemma():
    """One layer, a head much larger than everything else (V 32,000 x D 128): the weights dominate any copy of them."""
    return Gemma(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, version=1)


def test_loops_hold_no_copy_of_the_weights(monkeypatch):
    """The sampler's decode loop and DPG's minibatch loop tie the params to each iteration (`per_iteration`), so XLA
    does not hoist the weights' casts out of the loop and hold them through it: the compiled sampler's temporaries
    stay under half the size of the bf16 weights' float32 copy (which XLA:CPU, with no bfloat16 matmul, would keep),
    and DPG's update (bf16 compute, fp32 weights) needs at least a bf16 copy of the weights less than with the tie
    removed."""
    bf16 = dataclasses.replace(_big_head_gemma(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.eval_shape(bf16.init, jax.random.PRNGKey(0))
    f32_copy = sum(4 * x.size for x in jax.tree.leaves(params))
    B, P, T = 2, 4, 6
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    sampler = jax.jit(lambda u, p, t, m: sample_from_uniforms(u, bf16, p, t, m)).lower(
        jax.ShapeDtypeStruct((T, B), jnp.float32), params, i32(B, P), i32(B, P)).compile()
    assert sampler.memory_analysis().temp_size_in_bytes < f32_copy / 2
    mixed = dataclasses.replace(_big_head_gemma(), dtype=jnp.bfloat16)  # fp32 weights cast to bf16 in each minibatch
    temps = lambda: bench_scale.compile_dpg(mixed, make_mesh(1, 1), 2, 4, T).memory_analysis().temp_size_in_bytes
    tied = temps()
    monkeypatch.setattr(dpg, "per_iteration", lambda params, xs: (params, xs))
    assert tied + f32_copy / 2 < temps()
