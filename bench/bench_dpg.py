"""DPG update throughput (sampling + scoring + gradient) on GPT-2 configs, vs a PyTorch reference of the same
step measured in the same run. One JSON line per config (and batch size).

    python -m bench.bench_dpg [--quick] [--configs tiny,small,embedded] [--batches 128,512] [--repeats 3] [--threads 2]
                              [--host-devices 1]

The reference is a plain PyTorch implementation of the same on-policy DPG update on the same weights:
Hugging Face `generate(do_sample=True, top_k=0)` from BOS, the frozen base scores the samples, the policy's
log-probs with gradients, the running importance-sampling Z-hat, the loss -mean[(P/(Z q) - pi/q) log pi],
Adam. Goal: >= 3x the reference on a 2-core CPU; training MFU against the measured matmul peak.

`embedded` is the shipped base LM (guard_jax/assets/base_lm: 4 layers x 128, V = 8,192) at batch 128 and 512,
30 new tokens, the experiments' setting. Its lines time each part of the step on both sides in the same turns:
sampling, scoring under the frozen a, the policy's forward + backward, the optimizer, and the whole step
(guard_jax: `DPG.step`, which runs the parts in jitted calls with the host constraint between them and
scores a only on the samples with b = 1, about half of them under this bench's constraint; the "score" part
times every row),
plus a float32 matmul as a turn of its own, so the MFU of each part divides by a peak measured under the
same load, and the same matmul in torch (`torch_peak_gflops`: how fast the reference's own BLAS runs here; on
an AMD CPU torch's MKL can reach half of XLA's rate, which flatters every ratio). FLOPs count 2 per matmul
weight per token forward (sampling, scoring) and 6 forward + backward (`bench.common.matmul_params`: the
layers' kernels and the V x D head; attention left out). Goals on embedded: the step >= 3x torch's, the
forward + backward no slower than torch's, the step's MFU >= 25%.

torch keeps its OpenMP default (threads spin briefly, then sleep), its fastest setting on a quiet machine
(measured 2026-11-26 on the 2-core CPU: a tiny DPG step 0.10 s, against 0.20 s with OMP_WAIT_POLICY=PASSIVE;
small 14.3 against 15.6 s). On a loaded machine spinning threads slow torch several-fold: set
OMP_WAIT_POLICY=PASSIVE there (each line records the policy).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time

import jax
import numpy as np

from bench.common import (embedded_models, emit, host_device_mesh, interleaved, load_average, matmul_params, matmul_peak_flops,
                          peak_matmul, timed, torch_peak_matmul)
from guard_jax import constraints as C
from guard_jax.lm import LM
from guard_jax.models import hf
from guard_jax.train.common import minibatched_log_prob, sample_many
from guard_jax.train.dpg import DPG, DPGConfig, dpg_gradient
from guard_jax.train.loop import step_key

CONFIGS = {
    # name: (n_layer, n_embd, n_head, vocab, batch, new tokens)
    "tiny": (2, 64, 2, 1000, 32, 32),
    "small": (6, 384, 6, 8192, 64, 128),
}
EMBEDDED_BATCHES, EMBEDDED_NEW_TOKENS = (128, 512), 30
LR = 1e-4


def _constraint(vocab: int) -> C.Constraint:
    """b = 'some token among the first 2% of the vocabulary appears': satisfied by about half the samples."""
    k = max(1, vocab // 50)
    return C.predicate(lambda t, n: np.any((t < k) & (np.arange(t.shape[1])[None] < n[:, None]), axis=1), f"any token < {k}")


def _torch_model(name: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    L, D, H, V, B, T = CONFIGS[name]
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=L, n_embd=D, n_head=H, vocab_size=V, n_positions=max(T + 2, 64), bos_token_id=0, eos_token_id=None,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def torch_dpg_step(policy, base, optimizer, state: dict, B: int, T: int, constraint) -> None:
    """One on-policy DPG update in PyTorch (the reference)."""
    import torch

    bos = torch.zeros((B, 1), dtype=torch.long)
    with torch.no_grad():
        out = policy.generate(bos, attention_mask=torch.ones_like(bos), do_sample=True, top_k=0, max_new_tokens=T, min_new_tokens=T,
                              pad_token_id=0, eos_token_id=None)
        ids = out  # [B, 1 + T]
        log_a = torch.log_softmax(base(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0].sum(1)
    logpi = torch.log_softmax(policy(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0].sum(1)
    logq = logpi.detach()
    tokens = ids[:, 1:].numpy()
    b = torch.as_tensor(np.asarray(constraint(tokens, np.full(B, T, np.int32))))
    logP = torch.where(b, log_a, torch.tensor(-math.inf))
    state["log_z_sum"] = float(torch.logaddexp(torch.tensor(state["log_z_sum"]), torch.logsumexp(logP - logq, 0)))
    state["n_seen"] += B
    log_z = state["log_z_sum"] - math.log(state["n_seen"])
    w = torch.exp(logP - log_z - logq)
    loss = -torch.mean((w - torch.exp(logpi.detach() - logq)) * logpi)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def bench(name: str, repeats: int, threads: int, peak: float, mesh=None) -> dict:
    """One config's record; `mesh` (or None: one device) is where guard_jax's minibatch is split."""
    import torch

    torch.set_num_threads(threads)
    L, D, H, V, B, T = CONFIGS[name]
    base_torch = _torch_model(name)
    constraint = _constraint(V)
    with tempfile.TemporaryDirectory() as tmp:
        base_torch.save_pretrained(tmp)
        model, params, _ = hf.load(tmp, tokenizer=False)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    trainer = DPG(LM.of(model, params, mesh=mesh), constraint, DPGConfig(n_samples=B, minibatch=B, max_new_tokens=T, learning_rate=LR))
    state = trainer.init_state(params)
    t0 = time.perf_counter()
    state, _ = trainer.step(state, step_key(0, 0))
    jax.block_until_ready(state.params)
    first = time.perf_counter() - t0
    box = {"state": state, "step": 1}

    def ours():
        box["state"], _ = trainer.step(box["state"], step_key(0, box["step"]))
        box["step"] += 1
        jax.block_until_ready(box["state"].params)

    ours_s = timed(ours, repeats)

    policy = copy.deepcopy(base_torch).train()
    for mod in (policy, base_torch):
        mod.config.use_cache = True
    opt = torch.optim.Adam(policy.parameters(), lr=LR)
    tstate = {"log_z_sum": -math.inf, "n_seen": 0}
    torch_dpg_step(policy, base_torch, opt, tstate, B, T, constraint)  # warm-up
    ref_s = timed(lambda: torch_dpg_step(policy, base_torch, opt, tstate, B, T, constraint), repeats)

    tokens = B * T
    # sampling (forward with the KV cache) + base scoring (forward) + policy forward/backward: 2 + 2 + 6 FLOPs
    # per parameter per token (attention FLOPs are small at these lengths and are left out)
    flops = 10 * n_params * tokens
    return {
        "bench": "dpg_step", "config": name, "n_layer": L, "n_embd": D, "vocab": V, "batch": B, "new_tokens": T,
        "params": int(n_params), "guard_jax_s": round(ours_s, 4), "torch_s": round(ref_s, 4),
        "samples_per_s": round(B / ours_s, 1), "torch_samples_per_s": round(B / ref_s, 1),
        "speedup_vs_torch": round(ref_s / ours_s, 2), "goal_speedup": 3.0,
        "mfu": round(flops / ours_s / peak, 4), "torch_mfu": round(flops / ref_s / peak, 4), "peak_gflops": round(peak / 1e9, 1),
        "compile_plus_first_step_s": round(first, 2), "threads": threads, "host_devices": 1 if mesh is None else mesh.size,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def torch_parts(policy, base, optimizer, state: dict, B: int, T: int, constraint) -> dict:
    """The reference step's parts as no-argument functions on one shared batch: sample, score under a,
    policy forward + backward, optimizer, and the whole step (`torch_dpg_step`)."""
    import torch

    bos = torch.zeros((B, 1), dtype=torch.long)
    gen = dict(attention_mask=torch.ones_like(bos), do_sample=True, top_k=0, max_new_tokens=T, min_new_tokens=T,
               pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ids = policy.generate(bos, **gen)
    logp = lambda model: torch.log_softmax(model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0].sum(1)

    def sample():
        with torch.no_grad():
            policy.generate(bos, **gen)

    def score():
        with torch.no_grad():
            logp(base)

    def forward_backward():
        optimizer.zero_grad()
        logpi = logp(policy)
        logq = logpi.detach()
        loss = -torch.mean((torch.exp(logq - logq) - torch.exp(logpi.detach() - logq)) * logpi)
        loss.backward()

    return {"sample": sample, "score": score, "forward_backward": forward_backward, "optimizer": optimizer.step,
            "step": lambda: torch_dpg_step(policy, base, optimizer, state, B, T, constraint)}


def jax_parts(trainer: DPG, lm, B: int, T: int) -> dict:
    """guard_jax's parts on one shared batch, each a jitted call that blocks: the trainer's sampler, the
    minibatched scorer under a, the trainer's on-policy gradient pass (`dpg_gradient`), the optimizer update;
    and `trainer.step`."""
    import jax.numpy as jnp
    import optax

    model, params = lm.model, lm.params
    prompt_1P, mask_1P = lm.prompt_arrays(1)
    key = jax.random.PRNGKey(1)
    tokens_NT, lengths_N, logq_N = sample_many(key, model, params, prompt_1P, mask_1P, 1, B, T)
    score = jax.jit(minibatched_log_prob, static_argnums=0)
    grad = jax.jit(dpg_gradient, static_argnames=("model", "mesh", "on_policy"))
    batch = (tokens_NT[None], lengths_N[None], logq_N[None], logq_N[None], jnp.zeros((1,), jnp.float32))
    opt_state = trainer.optimizer.init(params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = trainer.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads = grad(params, model, prompt_1P, mask_1P, *batch, on_policy=True)[0]
    box = {"state": trainer.init_state(params), "step": 0}

    def step():
        box["state"], _ = trainer.step(box["state"], step_key(0, box["step"]))
        box["step"] += 1
        jax.block_until_ready(box["state"].params)

    return {
        "sample": lambda: jax.block_until_ready(sample_many(key, model, params, prompt_1P, mask_1P, 1, B, T)),
        "score": lambda: jax.block_until_ready(score(model, params, prompt_1P, mask_1P, tokens_NT[None], lengths_N[None])),
        "forward_backward": lambda: jax.block_until_ready(grad(params, model, prompt_1P, mask_1P, *batch, on_policy=True)),
        "optimizer": lambda: jax.block_until_ready(update(params, opt_state, grads)),
        "step": step,
    }


def bench_embedded(B: int, repeats: int, threads: int) -> dict:
    """Per-part timings of one on-policy DPG step on the shipped base LM, guard_jax and torch in the same turns."""
    import torch

    torch.set_num_threads(threads)
    T = EMBEDDED_NEW_TOKENS
    base_torch, lm = embedded_models()
    constraint = _constraint(lm.model.vocab_size)
    trainer = DPG(lm, constraint, DPGConfig(n_samples=B, minibatch=B, max_new_tokens=T, learning_rate=LR))
    policy = copy.deepcopy(base_torch).train()
    opt = torch.optim.Adam(policy.parameters(), lr=LR)
    torch_fns = torch_parts(policy, base_torch, opt, {"log_z_sum": -math.inf, "n_seen": 0}, B, T, constraint)
    jax_fns = jax_parts(trainer, lm, B, T)
    peak_run, peak_flops = peak_matmul()
    torch_peak_run, torch_peak_flops = torch_peak_matmul()
    fns = {"peak": peak_run, "torch_peak": torch_peak_run, **{f"jax_{k}": f for k, f in jax_fns.items()},
           **{f"torch_{k}": f for k, f in torch_fns.items()}}
    load_before = load_average()
    r = interleaved(fns, repeats)
    med = r["median"]
    peak = peak_flops / med["peak"]
    n = matmul_params(lm.model) * B * T
    flops = {"sample": 2 * n, "score": 2 * n, "forward_backward": 6 * n, "optimizer": 0, "step": 10 * n}
    parts = {}
    for k in jax_fns:
        j, t = med[f"jax_{k}"], med[f"torch_{k}"]
        parts[k] = {"jax_ms": round(1e3 * j, 1), "torch_ms": round(1e3 * t, 1), "speedup_vs_torch": round(t / j, 2)}
        if flops[k]:
            parts[k] |= {"jax_mfu": round(flops[k] / j / peak, 3), "torch_mfu": round(flops[k] / t / peak, 3)}
    return {
        "bench": "dpg_step_parts", "config": "embedded", "batch": B, "new_tokens": T, "matmul_params": matmul_params(lm.model),
        "parts": parts, "speedup_vs_torch": parts["step"]["speedup_vs_torch"], "goal_speedup": 3.0,
        "mfu": parts["step"]["jax_mfu"], "goal_mfu": 0.25, "samples_per_s": round(B / med["jax_step"], 1),
        "torch_samples_per_s": round(B / med["torch_step"], 1), "peak_gflops": round(peak / 1e9, 1),
        "torch_peak_gflops": round(torch_peak_flops / med["torch_peak"] / 1e9, 1),
        "jax_compile_plus_first_step_s": round(r["first"]["jax_step"], 2), "repeats": repeats, "threads": threads,
        "load_average_1min": [load_before, load_average()], "cpu_cores_used": r["cores"], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small,embedded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (match the cores JAX uses)")
    p.add_argument("--batches", default=",".join(map(str, EMBEDDED_BATCHES)), help="batch sizes of the embedded config")
    p.add_argument("--quick", action="store_true", help="tiny config only, one repeat")
    p.add_argument("--host-devices", type=int, default=1,
                   help="split guard_jax's minibatch over this many CPU host devices (as bench_sampling --host-devices)")
    args = p.parse_args()
    mesh = host_device_mesh(p, args.host_devices)
    names = ["tiny"] if args.quick else args.configs.split(",")
    unknown = set(names) - set(CONFIGS) - {"embedded"}
    if unknown:
        p.error(f"unknown --configs {sorted(unknown)}; choose from {sorted(CONFIGS) + ['embedded']}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        p.error(f"--batches must be positive integers separated by commas, got {args.batches!r}")
    if "embedded" in names and mesh is not None:
        p.error("--configs embedded times one device; leave out --host-devices")
    peak = matmul_peak_flops()
    for name in names:
        if name == "embedded":
            for B in batches:
                emit(bench_embedded(B, args.repeats, args.threads))
        else:
            emit(bench(name, 1 if args.quick else args.repeats, args.threads, peak, mesh))


if __name__ == "__main__":
    main()
