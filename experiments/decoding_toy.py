"""Masked, ASAp and CAP-filtered samples as SFT data for a GUARD warm start, exactly on a toy ARM.

    python experiments/decoding_toy.py --out results/decoding_toy/toy

The toy problem is `guard_jax.toy_demo.toy_problem`: a random tabular ARM a, b = "the bigram (1, 2) occurs
and the first token is not 3", and as CAP stand-in the prompted model a_cap = (1 - beta) a + beta h (h is the
gold law of another ARM: a prompt that raises the mass on b without moving toward g). Four data sources,
N samples each, all satisfying b:

- `a filtered` (GUARD with a' = a): exact samples of g, the reference;
- `CAP filtered` (GUARD with a' = a_cap): samples of g_cap ∝ a_cap b;
- `masked`: exact reachability masks on a;
- `ASAp`: N sequential ASAp samples on a (the trie learns while the data are drawn).

For each source two warm starts a' are evaluated exactly on the grid:
- the population limit: a tabular ARM's SFT optimum on infinitely many samples is the data law itself
  (for ASAp, the average of the laws its N samples were drawn from); its AR is 1 and KL(g||g') is the
  distortion the data carry;
- SFT of a tabular ARM started at a on the N samples (guard_jax.train.sft), with its AR gain AR_a'/Z,
  KL(g||g') and KL(g||a'), plus the share of distinct sequences among the N samples (diversity).

Writes results.json and results.md atomically.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

from guard_jax.decoding import Asap, exact_masked_log_prob, masked_sample, reachability_automaton
from guard_jax.exact import exact_constraint, exact_log_prob, exact_quantities, log_gold
from guard_jax.io import atomic_write_json, atomic_write_text
from guard_jax.rejection import guard_sample
from guard_jax.sampling import bos_prompt
from guard_jax.toy_demo import toy_problem
from guard_jax.train.sft import SFT, SFTConfig
from guard_jax.train.loop import step_key

SOURCES = ("a filtered", "CAP filtered", "masked", "ASAp")


def draw(source: str, key, problem, log_a, b, n: int, asap_batch: int):
    """-> (tokens_NT, lengths_N, log of the data law over the grid)."""
    a, a_cap, space = problem.a, problem.a2, problem.space
    T = space.max_len
    if source in ("a filtered", "CAP filtered"):
        lm = a if source == "a filtered" else a_cap
        r = guard_sample(key, lm, problem.constraint, n, max_new_tokens=T, batch_size=max(256, n), progress=False)
        with jax.enable_x64(True):
            log_law = log_gold(np.asarray(exact_log_prob(lm.model, lm.params, T), np.float64), b)
        return r.tokens_NT[:n], r.lengths_N[:n], log_law
    mask = reachability_automaton(space, b)
    if source == "masked":
        prompt, pmask = bos_prompt(a.model, n)
        s = masked_sample(key, a.model, a.params, prompt, pmask, mask, T)
        return np.asarray(s.tokens_BT), np.asarray(s.lengths_B), exact_masked_log_prob(space, log_a, b)
    asap = Asap(a.model, a.params, mask, T)
    tokens, lengths, laws = [], [], []
    for r, start in enumerate(range(0, n, asap_batch)):
        rows = min(asap_batch, n - start)
        laws.append((rows, exact_masked_log_prob(space, log_a, b, asap.log_theta_levels(space))))
        s = asap.sample(jax.random.fold_in(key, r), rows, batch_size=rows)
        tokens.append(s.tokens_NT), lengths.append(s.lengths_N)
    log_law = np.logaddexp.reduce([np.log(rows / n) + law for rows, law in laws], axis=0)
    return np.concatenate(tokens), np.concatenate(lengths), log_law


def sft(problem, tokens_NT, lengths_N, steps: int, learning_rate: float, seed: int):
    """SFT of a tabular ARM started at a on the samples -> its params."""
    trainer = SFT(problem.a, tokens_NT, lengths_N, SFTConfig(batch_size=min(64, len(tokens_NT)), learning_rate=learning_rate, seed=seed))
    state = trainer.init_state(problem.a.params)
    for k in range(steps):
        state, _ = trainer.step(state, step_key(seed, k))
    return state.params


def compute(seed: int, n: int, steps: int, learning_rate: float, vocab_size: int, max_len: int, beta: float, asap_batch: int) -> dict:
    problem = toy_problem(seed=seed, vocab_size=vocab_size, max_len=max_len, beta=beta)
    space, T = problem.space, max_len
    with jax.enable_x64(True):
        log_a = np.asarray(exact_log_prob(problem.a.model, problem.a.params, T), np.float64)
        b = exact_constraint(space, problem.constraint)
        base = exact_quantities(log_a, log_a, b)
    rows = []
    for i, source in enumerate(SOURCES):
        tokens, lengths, log_law = draw(source, jax.random.PRNGKey(1000 * seed + i), problem, log_a, b, n, asap_batch)
        assert b[space.index(tokens)].all(), f"{source} returned a sample with b = 0"
        with jax.enable_x64(True):
            pop = exact_quantities(log_a, log_law, b)
        params = sft(problem, tokens, lengths, steps, learning_rate, seed)
        with jax.enable_x64(True):
            log_a2 = np.asarray(exact_log_prob(problem.a.model, params, T), np.float64)
            q = exact_quantities(log_a, log_a2, b)
        rows.append({
            "source": source,
            "population_KL(g||data)": pop.kl_g_a2,
            "sft_AR": q.ar,
            "sft_AR_gain": q.ar / base.z,
            "sft_KL(g||g')": q.kl_g_g2,
            "sft_KL(g||a')": q.kl_g_a2,
            "distinct_share": len({tuple(r[:k]) for r, k in zip(tokens.tolist(), lengths.tolist())}) / n,
        })
    config = {"seed": seed, "n": n, "steps": steps, "learning_rate": learning_rate, "vocab_size": vocab_size, "max_len": max_len,
              "beta": beta, "asap_batch": asap_batch}
    return {"config": config, "Z": base.z, "KL(g||a)": base.kl_g_a, "rows": rows}


def table(res: dict) -> str:
    c = res["config"]
    head = (f"Toy ARM V={c['vocab_size']}, T={c['max_len']}, seed {c['seed']}: Z = {res['Z']:.4f}, KL(g||a) = {res['KL(g||a)']:.4f}. "
            f"N = {c['n']} samples per source; SFT from a, {c['steps']} steps, lr {c['learning_rate']}. Exact values.\n\n")
    lines = ["| data | KL(g‖data law) | SFT AR_a' | AR gain | SFT KL(g‖g') | SFT KL(g‖a') | distinct |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        kl_gg2, kl_ga2 = r["sft_KL(g||g')"], r["sft_KL(g||a')"]
        lines.append(f"| {r['source']} | {r['population_KL(g||data)']:.4f} | {r['sft_AR']:.4f} | {r['sft_AR_gain']:.2f}× | "
                     f"{kl_gg2:.4f} | {kl_ga2:.4f} | {r['distinct_share']:.2f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/decoding_toy/toy"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=400, help="samples per data source")
    parser.add_argument("--steps", type=int, default=300, help="SFT steps")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--vocab-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5, help="CAP stand-in: a_cap = (1 - beta) a + beta h")
    parser.add_argument("--asap-batch", type=int, default=8, help="ASAp rows per trie update")
    args = parser.parse_args(argv)
    res = compute(args.seed, args.n, args.steps, args.learning_rate, args.vocab_size, args.max_len, args.beta, args.asap_batch)
    atomic_write_json(args.out / "results.json", res)
    atomic_write_text(args.out / "results.md", table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
