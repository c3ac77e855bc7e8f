"""Masked decoding and ASAp: cost relative to plain sampling. One JSON line per config.

    python -m bench.bench_decoding [--repeats 3]

- `masked_vs_plain`: per-token time of `masked_sample` / `sample` (same model, batch, length; goal <= 1.3x);
- `mask_only`: time per token of the mask alone (allowed_BV + state update, jitted scan), no model;
- `asap`: ASAp samples/s (host trie, jitted model calls), one sample per trie update and rounds of 32.

Configs: a toy tabular ARM (V=8, T=6) with exact reachability masks for "contains (1, 2)"; random-weight
GPT-2s, tiny (2 layers, 64 dims, V=1000, batch 32, 32 tokens) and small (6 layers, 384 dims, V=8192, batch
64, 128 tokens), with a regex mask over a random vocabulary of letter/digit strings.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import emit, timed
from guard_jax import constraints as C
from guard_jax.decoding import Asap, masked_sample, reachability_automaton, regex_automaton
from guard_jax.exact import SequenceSpace, exact_constraint
from guard_jax.models.gpt2 import GPT2
from guard_jax.models.toy import TabularARM
from guard_jax.sampling import bos_prompt, sample

REGEX = r"([a-z]+ )+[0-9]+"


def toy_config():
    model = TabularARM(8, 6, eos_id=0)
    space = SequenceSpace.of(model, 6)
    return "tabular V=8 T=6", model, model.init(jax.random.PRNGKey(0), scale=1.5), reachability_automaton(space, exact_constraint(space, C.contains_ngram([1, 2]))), 6


def gpt2_config(name, n_layer, n_embd, n_head, V, T):
    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    strings = {i: "".join(rng.choice(list(letters + "0123456789 "), size=rng.integers(1, 5))) for i in range(1, V)}
    model = GPT2(vocab_size=V, n_positions=T + 1, n_embd=n_embd, n_layer=n_layer, n_head=n_head, bos_id=0, eos_id=0)
    return (f"{name} GPT-2 {n_layer}x{n_embd} V={V}", model, model.init(jax.random.PRNGKey(0)),
            regex_automaton(REGEX, strings, eos_id=0, vocab_size=V), T)


tiny_config = functools.partial(gpt2_config, "tiny", 2, 64, 2, 1000, 32)
small_config = functools.partial(gpt2_config, "small", 6, 384, 6, 8192, 128)


def bench_masked(name, model, params, mask, T, B, repeats):
    prompt, pmask = bos_prompt(model, B)
    key = jax.random.PRNGKey(1)
    plain = lambda: sample(key, model, params, prompt, pmask, T).tokens_BT.block_until_ready()
    masked = lambda: masked_sample(key, model, params, prompt, pmask, mask, T).tokens_BT.block_until_ready()
    plain(), masked()
    pairs = [(timed(plain, 1), timed(masked, 1)) for _ in range(repeats)]  # interleaved: a shared machine drifts
    t_plain, t_masked = (float(np.median(x)) for x in zip(*pairs))
    emit({"bench": "masked_vs_plain", "config": name, "B": B, "T": T, "states": mask.num_states,
          "plain_ms_per_token": round(1e3 * t_plain / T, 4), "masked_ms_per_token": round(1e3 * t_masked / T, 4),
          "ratio": round(t_masked / t_plain, 3), "goal_ratio": 1.3})


@functools.partial(jax.jit, static_argnames=("B", "T"))
def _mask_scan(mask, B, T):
    """T steps of allowed_BV + advance on the first allowed token (no model, no sampling)."""

    def step(state_B, t):
        allowed_BV = mask.allowed(state_B, T - t - 1)
        return mask.advance(state_B, jnp.argmax(allowed_BV, axis=1)), allowed_BV.sum()

    return jax.lax.scan(step, mask.init_state(B), jnp.arange(T))[1]


def bench_mask_only(name, mask, T, B, repeats):
    run = lambda: _mask_scan(mask, B, T).block_until_ready()
    run()
    t = timed(run, repeats)
    emit({"bench": "mask_only", "config": name, "B": B, "T": T, "V": mask.vocab_size, "states": mask.num_states,
          "ms_per_token": round(1e3 * t / T, 4)})


def bench_asap(name, model, params, mask, T, num_samples, batch_size):
    asap = Asap(model, params, mask, T)
    asap.sample(jax.random.PRNGKey(0), batch_size, batch_size=batch_size)  # compile
    t0 = time.perf_counter()
    s = asap.sample(jax.random.PRNGKey(1), num_samples, batch_size=batch_size)
    dt = time.perf_counter() - t0
    emit({"bench": "asap", "config": name, "T": T, "batch_size": batch_size, "samples": num_samples,
          "samples_per_s": round(num_samples / dt, 1), "trie_nodes": len(asap.nodes), "all_accepted": bool(s.accepted_N.all()),
          "root_theta": float(np.exp(asap.root_log_theta))})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="toy and tiny configs only")
    args = parser.parse_args(argv)
    configs = [(toy_config, 256, 256), (tiny_config, 32, 64)] + ([] if args.quick else [(small_config, 64, 64)])
    for make, B, asap_n in configs:
        name, model, params, mask, T = make()
        bench_masked(name, model, params, mask, T, B, args.repeats)
        bench_mask_only(name, mask, T, B, args.repeats)
        for batch in (1, 32):
            bench_asap(name, model, params, mask, T, asap_n, batch)


if __name__ == "__main__":
    main()
