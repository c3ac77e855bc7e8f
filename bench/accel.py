"""The accelerator report: on whatever accelerator JAX sees, the default tests and the benchmarks, one JSON file.

    bash scripts/dev.sh accel [--out accel_report.json]

On a GPU/TPU it (1) runs the default test suite (pass/fail recorded), (2) samples at gemma-2b shape in bf16 at
batch 1 and 64 (tokens/s and the fraction of the memory-bandwidth roofline: each decode step reads every
weight once), (3) runs DPG steps at gemma-2b shape (bf16 compute, fp32 master weights and Adam, remat) and
reports samples/s and MFU (model FLOPs: 2 N per sampled or a-scored token, 6 N per policy token trained,
over the chip's bf16 peak), and (4) the device's peak memory against the plan (the compiled program's
memory analysis, as bench/bench_scale.py computes it). Random weights: the cost does not depend on them.
On CPU it writes {"accelerator": null, "status": "no accelerator"} and exits 0 (`--run-on-cpu --shape tiny`
runs the accelerator path on CPU at a tiny shape, to check the script itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import timed

# peak HBM bandwidth (bytes/s) and dense bf16 FLOP/s per chip, by jax device_kind substring (vendor datasheets)
PEAKS = {
    "H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12), "L4": (3.0e11, 121e12),
    "TPU v4": (1.2e12, 275e12), "TPU v5 lite": (8.19e11, 197e12), "TPU v5e": (8.19e11, 197e12),
    "TPU v5p": (2.76e12, 459e12), "TPU v6": (1.64e12, 918e12),
}


def peaks(device_kind: str):
    """(bytes/s, FLOP/s) of the chip named `device_kind`, (None, None) when not in PEAKS."""
    for name, value in PEAKS.items():
        if name.lower() in device_kind.lower():
            return value
    return None, None


def _model(shape: str):
    from bench.bench_scale import QUICK, SHAPES

    return (QUICK["tiny-gemma"] if shape == "tiny" else SHAPES[shape])


def _timed(fn, repeats=2):
    """Median wall time of `fn()` after one call that compiles it."""
    fn()
    return timed(fn, repeats)


def sampling_report(model, new_tokens: int, batches, bw):
    from guard_jax.sampling import bos_prompt, sample

    model = dataclasses.replace(model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    out = []
    for B in batches:
        prompt, mask = bos_prompt(model, B)
        t = _timed(lambda: jax.block_until_ready(sample(jax.random.PRNGKey(1), model, params, prompt, mask, new_tokens)))
        row = {"batch": B, "new_tokens": new_tokens, "seconds": t, "tokens_per_s": B * new_tokens / t,
               "weight_bytes": int(param_bytes)}
        row["roofline_fraction"] = None if bw is None else (param_bytes * new_tokens / t) / bw
        out.append(row)
    return out


def dpg_report(model, minibatch: int, n_samples: int, new_tokens: int, flops_peak):
    from bench.bench_scale import compile_dpg
    from guard_jax import constraints as C
    from guard_jax.lm import LM
    from guard_jax.parallel import make_mesh
    from guard_jax.train.dpg import DPG, DPGConfig
    from guard_jax.train.loop import step_key

    model = dataclasses.replace(model, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    n = sum(x.size for x in jax.tree.leaves(params))
    b = C.predicate(lambda t, l: np.ones(len(t), bool), "always")
    trainer = DPG(LM.of(model, params), b, DPGConfig(n_samples=n_samples, minibatch=minibatch, max_new_tokens=new_tokens))
    state = trainer.init_state(params)
    state, _ = trainer.step(state, step_key(0, 0))  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state, _ = trainer.step(state, step_key(0, 1))
    jax.block_until_ready(state)
    t = time.perf_counter() - t0
    tokens = n_samples * new_tokens
    flops = (2 + 2 + 6) * n * tokens  # sample q, score a, forward + backward pi
    stats = jax.devices()[0].memory_stats() or {}
    plan = compile_dpg(model, make_mesh(1, 1), minibatch, n_samples // minibatch, new_tokens).memory_analysis()
    plan_total = plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes - plan.alias_size_in_bytes
    return {"minibatch": minibatch, "n_samples": n_samples, "new_tokens": new_tokens, "params": int(n), "seconds": t,
            "samples_per_s": n_samples / t, "model_flops": float(flops),
            "mfu": None if flops_peak is None else flops / t / flops_peak,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "plan_bytes_dpg_update": int(plan_total)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="accel_report.json")
    parser.add_argument("--shape", default="gemma-2b", help="gemma-2b (default) or tiny")
    parser.add_argument("--run-on-cpu", action="store_true", help="run the accelerator path on CPU (checks the script)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the default test suite first")
    args = parser.parse_args(argv)
    dev = jax.devices()[0]
    report = {"backend": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
              "jax": jax.__version__}
    if jax.default_backend() == "cpu" and not args.run_on_cpu:
        report |= {"accelerator": None, "status": "no accelerator"}
    else:
        report["accelerator"] = dev.device_kind
        bw, flops_peak = peaks(dev.device_kind)
        report |= {"peak_bandwidth_bytes_per_s": bw, "peak_bf16_flops": flops_peak, "shape": args.shape}
        if not args.skip_tests:
            r = subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "-q", "-x"], capture_output=True, text=True)
            report["tests"] = {"returncode": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1]}
        model = _model(args.shape)
        for name, fn in (("sampling", lambda: sampling_report(model, 128, (1, 64), bw)),
                         ("dpg", lambda: dpg_report(model, 64 if args.shape != "tiny" else 8, 128 if args.shape != "tiny" else 16, 30, flops_peak))):
            try:
                report[name] = fn()
            except Exception as e:  # one failed benchmark (e.g. out of memory) must not lose the others' numbers
                report[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        report["status"] = "ok" if all("error" not in str(report.get(k, "")) for k in ("sampling", "dpg")) else "errors"
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
