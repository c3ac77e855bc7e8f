"""DPG update throughput (sampling + scoring + gradient) on GPT-2 configs, vs a PyTorch reference of the same
step measured in the same run. One JSON line per config.

    python -m bench.bench_dpg [--quick] [--configs tiny,small] [--repeats 3] [--threads 2] [--host-devices 1]

The reference is a plain PyTorch implementation of the same on-policy DPG update on the same weights:
Hugging Face `generate(do_sample=True, top_k=0)` from BOS, the frozen base scores the samples, the policy's
log-probs with gradients, the running importance-sampling Z-hat, the loss -mean[(P/(Z q) - pi/q) log pi],
Adam. Goal (issue 5): >= 3x the reference on a 2-core CPU; training MFU against the measured matmul peak.

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

from bench.common import emit, host_device_mesh, matmul_peak_flops, timed
from guard_jax import constraints as C
from guard_jax.lm import LM
from guard_jax.models import hf
from guard_jax.train.dpg import DPG, DPGConfig
from guard_jax.train.loop import step_key

CONFIGS = {
    # name: (n_layer, n_embd, n_head, vocab, batch, new tokens)
    "tiny": (2, 64, 2, 1000, 32, 32),
    "small": (6, 384, 6, 8192, 64, 128),
}
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (match the cores JAX uses)")
    p.add_argument("--quick", action="store_true", help="tiny config only, one repeat")
    p.add_argument("--host-devices", type=int, default=1,
                   help="split guard_jax's minibatch over this many CPU host devices (as bench_sampling --host-devices)")
    args = p.parse_args()
    mesh = host_device_mesh(p, args.host_devices)
    names = ["tiny"] if args.quick else args.configs.split(",")
    unknown = set(names) - set(CONFIGS)
    if unknown:
        p.error(f"unknown --configs {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    peak = matmul_peak_flops()
    for name in names:
        emit(bench(name, 1 if args.quick else args.repeats, args.threads, peak, mesh))


if __name__ == "__main__":
    main()
