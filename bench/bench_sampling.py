"""guard_jax sampling and scoring vs transformers PyTorch on the same GPT-2. One JSON line per config and batch.

    python -m bench.bench_sampling [--quick] [--configs tiny small embedded] [--batches 128 512] [--repeats 3] [--threads 2]
                                   [--host-devices 1]

Both sides get the same weights (tiny and small: a random transformers GPT2LMHeadModel converted with
`gpt2.params_from_hf`; embedded: the shipped base LM), the same batch of [BOS] prompts, the same number of
new tokens (transformers: min_new_tokens = T, so every row generates exactly T tokens), temperature 1
ancestral sampling (`generate(do_sample=True, top_k=0)`) and the same thread count (torch.set_num_threads;
XLA's CPU client uses the process's cores).
Per-token lines also time the sampler with the cache as one buffer (no growing segments), for comparison.
Compile time is reported separately from the run time (median of `--repeats` runs, the two sides taking
turns so that both see the same machine load).

torch keeps its OpenMP default (threads spin briefly, then sleep), its fastest setting on a quiet machine
(measured 2026-11-26 on the 2-core CPU, small config: 1,302 tokens/s on average against 1,076 with
OMP_WAIT_POLICY=PASSIVE and 1,172 with ACTIVE). On a loaded machine spinning threads make `generate` up to
10x slower: set OMP_WAIT_POLICY=PASSIVE there (each line records the policy).

Each sampling line also carries the machine's float32 matmul peak measured in the same run and the
fraction of it guard_jax reaches (`decode_flops`): on a shared, loaded machine both move together; and the
same matmul in torch (`torch_matmul_peak_gflops`: the reference's own BLAS, which on an AMD CPU can run at
half of XLA's rate).

`--host-devices N` splits guard_jax's batch over N CPU host devices (`jax_num_cpu_devices`, set before JAX
starts) with `guard_jax.parallel`'s sharded sampler and scorer; torch keeps `--threads`. XLA runs the ops of
one program one after another and does a batched attention product on one core, so on a multi-core CPU a
split batch runs N programs side by side (the weight matmuls then share the cores). Every line says
`host_devices`; the sampling line also times the sampler on one of the devices in the same turns.

`embedded` is the shipped base LM (guard_jax/assets/base_lm, 4 layers x 128, V = 8,192) on both sides at
batch 128 and 512 with the experiments' 30 new tokens (its EOS can end a guard_jax row early: the work per
step is the same, padded); its lines also give the milliseconds per decode step.
The matmul peak is timed in the same turns as the samplers (a turn of its own), so all three see one load.

Goals (2-core CPU): >= 3x transformers' tokens/s on tiny and small, >= 5x on embedded; per-token time at
T=512 within 1.5x of T=32.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import embedded_models, emit, host_device_mesh, interleaved, load_average, peak_matmul, torch_peak_matmul
from guard_jax.models import gpt2
from guard_jax.parallel import replicate, shard_batch
from guard_jax.sampling import log_prob, sample, sample_from_uniforms, segments, uniforms

CONFIGS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, batch=32, new_tokens=32),
    "small": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, batch=64, new_tokens=128),
    # the shipped base LM (guard_jax/assets/base_lm: 4 L, 128 d, V=8192) at the experiments' 30 new tokens
    "embedded": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=8192, batch=(128, 512), new_tokens=30),
}


def build(n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int = 1024, seed: int = 0):
    """A random transformers GPT2LMHeadModel (no EOS) and the same weights as guard_jax (model, params)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch_model = GPT2LMHeadModel(config).eval()
    model = gpt2.from_hf_config(config.to_dict())
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = gpt2.params_from_hf(model, state.__getitem__, set(state))
    return torch_model, model, params


def decode_flops(model, new_tokens: int) -> float:
    """Matmul FLOPs per generated token: the weights (QKV, projection, MLP, head) plus attention over the
    average number of cached positions (what a decoder that reads only the filled cache would do)."""
    D, F = model.n_embd, model.inner
    weights = 2 * model.n_layer * (4 * D * D + 2 * D * F) + 2 * D * model.vocab_size
    return weights + 4 * model.n_layer * D * (1 + new_tokens) / 2


def _prompt(batch: int):
    prompt_B1 = jnp.zeros((batch, 1), jnp.int32)  # BOS = 0
    return prompt_B1, jnp.ones_like(prompt_B1)


def place(mesh, params, *batch_arrays):
    """On one device (mesh None) as they are; else params replicated and the arrays split along the batch."""
    if mesh is None:
        return (params, *batch_arrays)
    return (replicate(mesh, params), *shard_batch(mesh, *batch_arrays))


def jax_sampler(model, params, batch: int, new_tokens: int, mesh=None):
    params, prompt, mask = place(mesh, params, *_prompt(batch))
    return lambda: sample(jax.random.PRNGKey(0), model, params, prompt, mask, new_tokens).tokens_BT.block_until_ready()


_one_buffer = jax.jit(sample_from_uniforms, static_argnames=("model", "temperature", "segment_ends"))


def jax_one_buffer_sampler(model, params, batch: int, new_tokens: int, mesh=None):
    """The same sampler with the cache as one buffer of prompt + new_tokens slots (no growing segments)."""
    params, prompt, mask = place(mesh, params, *_prompt(batch))
    u_TB = uniforms(jax.random.PRNGKey(0), batch, new_tokens)
    if mesh is not None:
        u_TB = jax.device_put(u_TB, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))
    return lambda: _one_buffer(u_TB, model, params, prompt, mask, segment_ends=(new_tokens,)).tokens_BT.block_until_ready()


def torch_sampler(torch_model, batch: int, new_tokens: int):
    """transformers `generate(do_sample=True, top_k=0)` of exactly `new_tokens` tokens per row."""
    import torch

    ids = torch.zeros((batch, 1), dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    def run():
        with torch.no_grad():
            out = torch_model.generate(ids, **kw)
        assert out.shape == (batch, 1 + new_tokens), out.shape

    return run


def scorers(torch_model, model, params, batch: int, length: int, mesh=None):
    """Teacher-forced sequence log-probs: guard_jax `log_prob` and a torch forward pass -> (jax_fn, torch_fn)."""
    import torch

    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (batch, length), 0, model.vocab_size)
    ids = torch.tensor(np.concatenate([np.zeros((batch, 1), np.int64), np.asarray(tokens_BT)], 1))
    params, prompt, mask, tokens_BT, lengths_B = place(mesh, params, *_prompt(batch), tokens_BT,
                                                        jnp.full((batch,), length, jnp.int32))

    def jax_fn():
        return np.asarray(log_prob(model, params, prompt, mask, tokens_BT, lengths_B)[0])

    def torch_fn():
        with torch.no_grad():
            logits = torch_model(ids[:, :-1]).logits
            return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0].sum(-1).numpy()

    return jax_fn, torch_fn


def _models(name: str):
    """(torch model, guard_jax model, params): the shipped base LM for "embedded", else random weights."""
    if name == "embedded":
        torch_model, lm = embedded_models()
        return torch_model, lm.model, lm.params
    c = CONFIGS[name]
    return build(c["n_layer"], c["n_embd"], c["n_head"], c["vocab_size"])


def bench_config(name: str, repeats: int, per_token_lengths=(32, 128, 512), mesh=None, batches=None) -> list[dict]:
    """The records of one config, one set per batch size (`batches`, default the config's); `mesh` (or None: one
    device) is where guard_jax's batch is split."""
    c = CONFIGS[name]
    torch_model, model, params = _models(name)
    T = c["new_tokens"]
    records = []
    for B in batches or (c["batch"] if isinstance(c["batch"], tuple) else (c["batch"],)):
        records += _bench_batch(name, torch_model, model, params, B, T, repeats, per_token_lengths, mesh)
    return records


def _bench_batch(name, torch_model, model, params, B: int, T: int, repeats: int, per_token_lengths, mesh) -> list[dict]:
    c = CONFIGS[name]
    common = {"config": name, **{k: c[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size")}, "batch": B,
              "host_devices": 1 if mesh is None else mesh.size}
    peak_run, peak_flops = peak_matmul()
    torch_peak_run, torch_peak_flops = torch_peak_matmul()
    fns = {"jax": jax_sampler(model, params, B, T, mesh), "torch": torch_sampler(torch_model, B, T), "peak": peak_run,
           "torch_peak": torch_peak_run}
    if mesh is not None:  # the same sampler on one of the devices, timed in the same turns
        fns["jax_one_device"] = jax_sampler(model, jax.device_put(params, mesh.devices.flat[0]), B, T)
    r = interleaved(fns, repeats)
    jax_s, torch_s = r["median"]["jax"], r["median"]["torch"]
    peak = peak_flops / r["median"]["peak"]
    records = [{
        "bench": "sampling", **common, "new_tokens": T,
        "jax_tokens_per_s": round(B * T / jax_s), "torch_tokens_per_s": round(B * T / torch_s),
        "jax_ms_per_step": round(1e3 * jax_s / T, 3), "torch_ms_per_step": round(1e3 * torch_s / T, 3),
        "ratio": round(torch_s / jax_s, 2), "jax_compile_s": round(max(r["first"]["jax"] - jax_s, 0.0), 3),
        "goal_ratio": 5.0 if name == "embedded" else 3.0,
        "jax_fraction_of_matmul_peak": round(B * T * decode_flops(model, T) / jax_s / peak, 3),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "torch_matmul_peak_gflops": round(torch_peak_flops / r["median"]["torch_peak"] / 1e9, 1), "cpu_cores_used": r["cores"],
    }]
    if mesh is not None:
        one_s = r["median"]["jax_one_device"]
        records[0].update(jax_one_device_tokens_per_s=round(B * T / one_s), one_device_ratio=round(torch_s / one_s, 2),
                          host_devices_speedup=round(one_s / jax_s, 2))
    if name == "tiny":
        first_ms = None
        for L in per_token_lengths:
            r = interleaved({"jax": jax_sampler(model, params, B, L, mesh), "torch": torch_sampler(torch_model, B, L),
                             "one_buffer": jax_one_buffer_sampler(model, params, B, L, mesh)}, repeats)
            jax_ms, torch_ms = 1e3 * r["median"]["jax"] / L, 1e3 * r["median"]["torch"] / L
            first_ms = first_ms or jax_ms
            records.append({"bench": "per_token", **common, "new_tokens": L, "jax_ms_per_step": round(jax_ms, 4),
                            "torch_ms_per_step": round(torch_ms, 4), "ratio": round(torch_ms / jax_ms, 2),
                            "cache_segments": len(segments(L)), "jax_one_buffer_ms_per_step": round(1e3 * r["median"]["one_buffer"] / L, 4),
                            "jax_compile_s": round(max(r["first"]["jax"] - r["median"]["jax"], 0.0), 3),
                            "jax_vs_first_T": round(jax_ms / first_ms, 2), "goal_vs_first_T": 1.5})
    jax_fn, torch_fn = scorers(torch_model, model, params, B, T, mesh)
    diff = float(np.abs(jax_fn() - torch_fn()).max())
    r = interleaved({"jax": jax_fn, "torch": torch_fn}, repeats)
    records.append({"bench": "scoring", **common, "length": T,
                    "jax_sequences_per_s": round(B / r["median"]["jax"], 1), "torch_sequences_per_s": round(B / r["median"]["torch"], 1),
                    "ratio": round(r["median"]["torch"] / r["median"]["jax"], 2), "max_abs_logp_diff_vs_torch": diff})
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config only, one repeat, T in (32, 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (match the CPU cores XLA uses)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes of the embedded config (default 128 512)")
    parser.add_argument("--host-devices", type=int, default=1,
                        help="split guard_jax's batch over this many CPU host devices (see the docstring)")
    args = parser.parse_args()
    if args.batches is not None and min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    mesh = host_device_mesh(parser, args.host_devices)
    import torch

    torch.set_num_threads(args.threads)
    configs, repeats, lengths = args.configs, args.repeats, (32, 128, 512)
    if args.quick:
        configs, repeats, lengths = ["tiny"], 1, (32, 128)
    for name in configs:
        for record in bench_config(name, repeats, lengths, mesh, args.batches if name == "embedded" else None):
            emit({**record, "torch_threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                  "load_average_1min": load_average()})


if __name__ == "__main__":
    main()
