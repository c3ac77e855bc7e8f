"""Exact enumeration + log-prob throughput on toy ARMs (sequences/s). One JSON line per config.

    python bench/bench_exact.py [--repeats 3]

Goal: >= 1e6 sequences/s for a tabular ARM with V=8, T=7 on a 2-core CPU.
"""

import argparse
import time

import jax
import numpy as np

from bench.common import emit, timed
from guard_jax.exact import exact_log_prob
from guard_jax.models.toy import TabularARM, TinyTransformerARM


def bench(model, max_len: int, repeats: int) -> dict:
    params = model.init(jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    logp = exact_log_prob(model, params, max_len)  # first call: compile + run
    first = time.perf_counter() - t0
    run = timed(lambda: exact_log_prob(model, params, max_len), repeats)
    total = float(np.exp(logp[np.isfinite(logp)].astype(np.float64)).sum())
    return {
        "bench": "exact_log_prob", "model": type(model).__name__, "V": model.vocab_size, "T": max_len,
        "eos": model.eos_id, "sequences": int(logp.size), "seconds": round(run, 4),
        "sequences_per_s": round(logp.size / run), "compile_plus_first_run_s": round(first, 3),
        "total_probability": round(total, 6), "goal_sequences_per_s": 1e6,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for model, T in ((TabularARM(8, 7), 7), (TabularARM(8, 7, eos_id=0), 7), (TinyTransformerARM(8, 6, eos_id=0), 6)):
        emit(bench(model, T, args.repeats))


if __name__ == "__main__":
    main()
