"""A memory plan with no accelerator: per-device bytes of the compiled DPG update, SFT step and sampler.

Each case is compiled ahead of time from abstract arguments (`jax.ShapeDtypeStruct` with shardings: no
weights, no execution): `jax.jit(f, donate_argnums=...).lower(*abstract).compile().memory_analysis()`, and one
JSON line says the per-device argument, output, temporary and alias bytes and total = arguments + outputs +
temporaries - aliased (the train state is donated, so the new state reuses the old one's buffers).

Shapes: gemma-2b, llama-3.2-1b, qwen2.5-0.5b (their released config.json values), mixed precision
"bf16_compute" (bf16 compute, fp32 master weights and Adam) with remat for training, "bf16" for sampling;
meshes 1x8 (FSDP: params and Adam sharded 8 ways, batch split 8 ways) on 8 forced host devices, and one
device. The paper's DPG minibatch 500 x 30 tokens is not divisible by 8 devices: on 8 it runs as 504.

Compiling full-depth programs on a small CPU host is slow, so `--layers L1,L2` compiles each case at two
reduced depths and extrapolates every byte count linearly to the full depth (per-layer weights, Adam
state and saved activations are linear in depth); the JSON says `"extrapolated_from_layers"`. It compiles with
XLA:CPU's memory-minimising scheduler (`CPU_SCHEDULER_FLAG`; the default one starts independent work early and
holds every layer's buffers at once). CPU's buffer assignment and fusion differ from TPU/GPU (f32 copies of bf16
matmul operands, all-reduced gradients): temporaries are an estimate. `--quick`: tiny shapes, for the
test suite.

DPG cases draw the paper's 10,000 samples per update: at the paper's minibatch (500, run as 504 x 20 on 8
devices) and at smaller minibatches that divide 10,000 and the 8 devices (80 x 125, 40 x 250: the same update,
`DPGConfig.minibatch` accumulates the gradients). Every row says its `tuning`: "full" (full fine-tuning) or
"lora" (rank `--lora-rank` adapters, guard_jax.lora, alpha = 2 rank, on every attention and MLP projection: Adam
state and gradients for the adapters only, a's params held once as the policy's frozen weights, stored in
`--lora-policy`: bf16 by default, fp32 adapters). `--tuning` picks them (default both; --quick: full). After the
rows, one `scale_goal` line per goal of the plan says met / not met (null when this run has no row for it).

    python -m bench.bench_scale                    # every case, 8 host devices and 1, depth from 1 and 2 layers
    python -m bench.bench_scale --only gemma-2b --devices 8 --cases dpg_update
    python -m bench.bench_scale --tuning lora --lora-rank 8 --lora-policy bf16_compute   # LoRA, fp32 frozen weights
    python -m bench.bench_scale --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

from bench.common import emit

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from guard_jax.models.decoder import RoPE  # noqa: E402
from guard_jax.models.gemma import Gemma  # noqa: E402
from guard_jax.models.llama import Llama  # noqa: E402
from guard_jax.parallel import batch_sharding, make_mesh, param_shardings  # noqa: E402
from guard_jax.precision import policy_dtypes  # noqa: E402
from guard_jax.sampling import sample_from_uniforms  # noqa: E402
from guard_jax.train import dpg, sft  # noqa: E402
from guard_jax.models.lora import LoraSpec, float32_adapters  # noqa: E402
from guard_jax.train.common import adam, init_opt_state, trainable  # noqa: E402
from guard_jax.train.loop import TrainState  # noqa: E402

GiB = 2**30
SHAPES = {
    "gemma-2b": Gemma(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=256, version=1),
    "llama-3.2-1b": Llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                          rope_parameters=RoPE(theta=500000.0, type="llama3", factor=32.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192),
                          bos_id=128000, eos_id=128001),
    "qwen2.5-0.5b": Llama(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, head_dim=64, family="qwen2", qkv_bias=True,
                          tie_word_embeddings=True, bos_id=151643, eos_id=151643),
}
QUICK = {"tiny-gemma": Gemma(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=16, version=1)}
PROMPT = 8  # prompt tokens (BOS + a short context)
# XLA:CPU's default scheduler favours concurrency: it starts independent work early (every layer's weight all-gather
# and bf16 cast at the top of the step, the blocks' recomputations before the backward pass reaches them), which
# holds every layer's buffers at once. The plan compiles with its memory-minimising scheduler, as a TPU/GPU
# compiler schedules under a memory limit (set through XLA_FLAGS before JAX starts: a compile option is ignored).
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _batch(mesh, shape, dtype, axis=0):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), axis))


def _replicated(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _state(model, mesh, optimizer, extra):
    """The abstract train state (LoRA: fp32 adapters and Adam over them only, as `guard_jax.lora` and
    `train.common.init_opt_state`) and its params."""
    params = jax.eval_shape(lambda k: float32_adapters(model.init(k)), jax.random.PRNGKey(0))
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(lambda p: init_opt_state(optimizer, p), params), extra)
    return _abstract(state, param_shardings(mesh, state)), params


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def compile_dpg(model, mesh, minibatch: int, n_minibatches: int, T: int):
    """The DPG update (`dpg._update`: the policy's gradient pass over M minibatches of B samples of T tokens, given
    log q and log P = log a + log b; a is scored before it, on the accepted rows only), state donated."""
    opt = adam(1.41e-5)
    f32 = jnp.float32
    extra = {"log_z_sum": jax.ShapeDtypeStruct((), f32), "n_seen": jax.ShapeDtypeStruct((), f32)}
    state, _ = _state(model, mesh, opt, extra)
    M, B = n_minibatches, minibatch
    args = (state, _replicated(mesh, (1, PROMPT), jnp.int32), _replicated(mesh, (1, PROMPT), jnp.int32),
            _batch(mesh, (M, B, T), jnp.int32, 1), _batch(mesh, (M, B), jnp.int32, 1), _batch(mesh, (M, B), f32, 1),
            _batch(mesh, (M, B), f32, 1), _batch(mesh, (M, B), jnp.bool_, 1))
    fn = jax.jit(dpg._update.__wrapped__, static_argnames=("model", "optimizer", "mesh"), donate_argnums=0)
    return fn.lower(*args, model=model, optimizer=opt, mesh=mesh).compile()


def compile_sft(model, mesh, batch: int, T: int):
    """The SFT step (`sft._update`) on a batch of B rows of T tokens, state donated."""
    opt = adam(5e-6)
    state, _ = _state(model, mesh, opt, {})
    args = (state, _batch(mesh, (batch, PROMPT), jnp.int32), _batch(mesh, (batch, PROMPT), jnp.int32),
            _batch(mesh, (batch, T), jnp.int32), _batch(mesh, (batch,), jnp.int32))
    fn = jax.jit(sft._update.__wrapped__, static_argnames=("model", "optimizer", "mesh"), donate_argnums=0)
    return fn.lower(*args, model=model, optimizer=opt, mesh=mesh).compile()


def compile_sampler(model, mesh, batch: int, T: int):
    """The sampler (`sampling.sample_from_uniforms`: prefill + T decode steps with the KV cache)."""
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    params = _abstract(params, param_shardings(mesh, params))
    args = (_batch(mesh, (T, batch), jnp.float32, 1), params, _batch(mesh, (batch, PROMPT), jnp.int32),
            _batch(mesh, (batch, PROMPT), jnp.int32))
    fn = jax.jit(lambda u, p, t, m: sample_from_uniforms(u, model, p, t, m))
    return fn.lower(*args).compile()


N_SAMPLES = 10_000  # DPG samples per update (the paper)
# (goal, model, case, tuning, devices, batch or None for the best row, limit GiB): the plan's goals
GOALS = (
    ("gemma-2b DPG, full fine-tuning, <= 16 GiB/device on 8 devices", "gemma-2b", "dpg_update", "full", 8, None, 16.0),
    ("gemma-2b DPG, LoRA, <= 8 GiB/device on 8 devices", "gemma-2b", "dpg_update", "lora", 8, None, 8.0),
    ("gemma-2b sampling at batch 500 on one 16 GiB device", "gemma-2b", "sampler", "full", 1, 500, 16.0),
)


def dpg_minibatches(devices: int) -> tuple[int, ...]:
    """The DPG minibatches of the plan: the paper's 500 (504 on 8 devices: divisible by them) and two that divide
    both N_SAMPLES and the device count (the same update by gradient accumulation)."""
    return (504 if devices == 8 else 500, 80, 40)


def cases(quick: bool, lora_policy: str = "bf16"):
    """(name, case, tuning, policy, remat, devices, batch): the plan's cases."""
    if quick:  # one of each program, each on the device count of its goal
        name, mb = "tiny-gemma", 8
        return QUICK, [(name, "dpg_update", "full", "bf16_compute", True, 8, mb), (name, "sft_step", "full", "bf16_compute", True, 8, mb),
                       (name, "sampler", "full", "bf16", False, 1, mb)]
    out = []
    for name in SHAPES:
        for devices in (8, 1):
            for batch in dpg_minibatches(devices):
                out.append((name, "dpg_update", "full", "bf16_compute", True, devices, batch))
            if name == "gemma-2b":
                out.append((name, "dpg_update", "full", "bf16_compute", False, devices, dpg_minibatches(devices)[0]))
            out.append((name, "sft_step", "full", "bf16_compute", True, devices, 64))
            out.append((name, "sampler", "full", "bf16", False, devices, dpg_minibatches(devices)[0]))  # 504 on 8
            for batch in dpg_minibatches(devices):
                out.append((name, "dpg_update", "lora", lora_policy, True, devices, batch))
            out.append((name, "sft_step", "lora", lora_policy, True, devices, 64))
    return SHAPES, out


def goal_lines(rows: list[dict]) -> list[dict]:
    """One record per goal: the smallest total of the rows that match it (any minibatch unless the goal fixes
    the batch), met or not (None when no row matches)."""
    out = []
    for goal, model, case, tuning, devices, batch, limit in GOALS:
        match = [r for r in rows if (r["model"], r["case"], r["tuning"], r["devices"]) == (model, case, tuning, devices)
                 and (batch is None or r["batch"] == batch)]
        best = min(match, key=lambda r: r["total_bytes"], default=None)
        out.append({"bench": "scale_goal", "goal": goal, "limit_gib": limit,
                    "met": None if best is None else bool(best["total_bytes"] <= limit * GiB),
                    "best_gib": None if best is None else best["total_gib"], "best_batch": None if best is None else best["batch"],
                    "best_remat": None if best is None else best["remat"],
                    "rows": [(r["batch"], r["remat"], r["total_gib"]) for r in match]})
    return out


def run_case(model, case: str, tuning: str, devices: int, batch: int, T: int, n_minibatches: int):
    if tuning not in ("full", "lora"):
        raise ValueError(f"tuning {tuning!r} is not built into this plan; it knows 'full' and 'lora'")
    mesh = make_mesh(1, devices)
    if case == "dpg_update":
        return _memory(compile_dpg(model, mesh, batch, n_minibatches, T))
    if case == "sft_step":
        return _memory(compile_sft(model, mesh, batch, T))
    return _memory(compile_sampler(model, mesh, batch, T))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--layers", default="1,2", help="two reduced depths to extrapolate from, or 'full'")
    parser.add_argument("--only", default="", help="comma-separated model names to run (default all)")
    parser.add_argument("--cases", default="", help="comma-separated cases (dpg_update, sft_step, sampler; default all)")
    parser.add_argument("--devices", default="", help="comma-separated device counts (8, 1; default both)")
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--minibatches", type=int, default=0,
                        help="minibatches per DPG update (default: N_SAMPLES / minibatch, rounded up)")
    parser.add_argument("--tuning", default="", help="comma-separated tunings (full, lora; default both, --quick: full)")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA rows' adapters")
    parser.add_argument("--lora-policy", default="bf16", help="precision policy of the LoRA rows (bf16: frozen weights in bf16)")
    args = parser.parse_args(argv)
    if CPU_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_SCHEDULER_FLAG}".strip()
    jax.config.update("jax_num_cpu_devices", 8)  # before JAX starts (it refuses after)
    if jax.device_count() < 8:
        parser.error(f"bench_scale needs 8 host devices, JAX sees {jax.device_count()} (run it before JAX starts)")
    shapes, todo = cases(args.quick, args.lora_policy)
    todo = [c for c in todo if c[2] in (args.tuning or ("full" if args.quick else "full,lora")).split(",")]
    if args.quick and "lora" in args.tuning.split(","):  # the quick training cases again, with adapters
        todo += [(c[0], c[1], "lora", args.lora_policy, *c[4:]) for c in cases(True)[1] if c[1] != "sampler"]
    if args.only:
        todo = [c for c in todo if c[0] in args.only.split(",")]
    if args.cases:
        todo = [c for c in todo if c[1] in args.cases.split(",")]
    if args.devices:
        todo = [c for c in todo if str(c[5]) in args.devices.split(",")]
    rows = []
    for name, case, tuning, policy, remat, devices, batch in todo:
        compute, storage = policy_dtypes(policy)
        full = shapes[name]
        lora = LoraSpec(args.lora_rank, 2.0 * args.lora_rank) if tuning == "lora" else None
        full = dataclasses.replace(full, dtype=compute, param_dtype=storage, remat=remat, lora=lora)
        L = full.num_hidden_layers
        depths = [L] if args.quick or args.layers == "full" else [int(x) for x in args.layers.split(",")]
        M = args.minibatches or -(-N_SAMPLES // batch)
        mems = []
        for depth in depths:
            model = dataclasses.replace(full, num_hidden_layers=depth, layer_types=None)
            mems.append(run_case(model, case, tuning, devices, batch, args.new_tokens, M))
        if len(depths) == 2:
            (l1, m1), (l2, m2) = zip(depths, mems)
            mem = {k: int(round(m1[k] + (m2[k] - m1[k]) * (L - l1) / (l2 - l1))) for k in m1}
        else:
            mem = mems[0]
        all_params = jax.eval_shape(full.init, jax.random.PRNGKey(0))
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(all_params))
        n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable(all_params)))
        row = {"bench": "scale", "model": name, "case": case, "tuning": tuning, "policy": policy, "remat": remat,
               "devices": devices, "mesh": f"1x{devices}", "batch": batch, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT,
               "minibatches": M if case == "dpg_update" else None, "params": n_params, "trained_params": n_trained,
               "lora_rank": args.lora_rank if tuning == "lora" else None,
               "layers": L, "extrapolated_from_layers": depths if len(depths) == 2 else None,
               **mem, "total_gib": round(mem["total_bytes"] / GiB, 3)}
        emit(row)
        rows.append(row)
    if not args.quick:
        for line in goal_lines(rows):
            emit(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
