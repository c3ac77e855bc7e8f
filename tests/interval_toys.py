"""A family of hard toys for the small-sample intervals of KL(g||a'), KL(g||g') and KL(g'||g), and their coverage.

Each toy is a random tabular ARM a and a peaky random ARM a' far from it (`TabularARM`, EOS 0) with a rare
constraint b: Z = 0.0014-0.0058, KL(g||a') = 21-45 nats. A Monte-Carlo run draws N_a = k / Z samples of a
and N_a' = k / AR_a' samples of a' (about k accepted samples of each, k = 16-80); the accepted count is
Binomial(N, Z) and the accepted samples are i.i.d. g, which is the law of b-filtered draws (drawn that way
here, from the exact g and g', so that 400 seeds take seconds). `coverage` counts how often each 95%
interval of `guard_jax.estimators` holds the exact value (by enumeration), and on which side it misses.

    python -m tests.interval_toys --seeds 400     # the coverage table of docs/estimators.md
"""

from __future__ import annotations

import argparse
import functools

import jax
import numpy as np

from guard_jax import constraints as C
from guard_jax import estimators as E
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_quantities
from guard_jax.models.toy import TabularARM

# name: (V, T, b, (key, scale) of a, (key, scale) of a')
TOYS = {
    "V6T6": (6, 6, C.contains_ngram([1, 2]) & ~C.token_at(0, 3), (3, 2.15), (100, 6.0)),
    "V5T7": (5, 7, C.contains_ngram([1, 2, 3]), (2, 2.5), (100, 5.0)),
    "V8T5": (8, 5, C.contains_ngram([1, 2]), (0, 3.0), (101, 3.0)),
    "V4T8": (4, 8, C.contains_ngram([1, 2, 1]), (0, 3.0), (100, 5.0)),
    "V10T4": (10, 4, C.contains_ngram([3, 4]), (2, 3.0), (100, 5.0)),
    "V7T5": (7, 5, C.contains_ngram([2, 3]) & ~C.contains_token(4), (0, 3.0), (101, 3.0)),
}
QUANTITIES = ("kl_g_a2", "kl_g_g2", "kl_g2_g")


@functools.cache
def toy(name: str):
    """(log a [S], log a' [S], b [S], exact quantities) over the S sequences of the toy `name`."""
    V, T, spec, (key_a, scale_a), (key_a2, scale_a2) = TOYS[name]
    model = TabularARM(V, T, eos_id=0)
    b = exact_constraint(SequenceSpace.of(model, T), spec)
    with jax.enable_x64(True):
        log_a = exact_log_prob(model, model.init(jax.random.PRNGKey(key_a), scale=scale_a), T)
        log_a2 = exact_log_prob(model, model.init(jax.random.PRNGKey(key_a2), scale=scale_a2), T)
    return log_a, log_a2, b, exact_quantities(log_a, log_a2, b)


def one_run(name: str, accepted: int, seed: int) -> dict[str, E.Estimate] | None:
    """The three KL estimates of one Monte-Carlo run with about `accepted` samples of g and of g' (None when
    fewer than 2 of either were accepted: the estimators need 2)."""
    log_a, log_a2, b, q = toy(name)
    n_a, n_a2 = int(accepted / q.z), int(accepted / q.ar)
    rng = np.random.default_rng(seed)
    idx_S = np.flatnonzero(b)
    k_a, k_a2 = int(rng.binomial(n_a, q.z)), int(rng.binomial(n_a2, q.ar))
    if k_a < 2 or k_a2 < 2:
        return None
    g = idx_S[rng.choice(idx_S.size, k_a, p=_normalised(log_a[idx_S]))]
    g2 = idx_S[rng.choice(idx_S.size, k_a2, p=_normalised(log_a2[idx_S]))]
    return {"kl_g_a2": E.estimate_kl_g_a2(log_a[g], log_a2[g], k_a, n_a),
            "kl_g_g2": E.estimate_kl_g_g2(log_a[g], log_a2[g], k_a, n_a, k_a2, n_a2),
            "kl_g2_g": E.estimate_kl_g2_g(log_a2[g2], log_a[g2], k_a2, n_a2, k_a, n_a)}


def _normalised(log_p):
    p = np.exp(log_p - log_p.max())
    return p / p.sum()


def coverage(name: str, accepted: int, seeds: int) -> dict[str, dict]:
    """Per quantity over seeds 0..seeds-1: coverage, misses with the exact value below / above the interval
    (a run without 2 accepted samples counts as a miss below), mean width, and for KL(g'||g) how many
    intervals carried the `kl_g2_g` flag (`E.UNSEEN_G_REGION`)."""
    q = toy(name)[3]
    exact = {"kl_g_a2": q.kl_g_a2, "kl_g_g2": q.kl_g_g2, "kl_g2_g": q.kl_g2_g}
    out = {k: {"hits": 0, "exact_below": 0, "exact_above": 0, "widths": [], "flagged": 0} for k in QUANTITIES}
    for seed in range(seeds):
        run = one_run(name, accepted, seed)
        for k, r in out.items():
            if run is None:
                r["exact_below"] += 1
                continue
            est = run[k]
            r["widths"].append(est.hi - est.lo)
            r["flagged"] += bool(est.note)
            r["hits" if est.contains(exact[k]) else ("exact_below" if exact[k] < est.lo else "exact_above")] += 1
    return {k: {"coverage": r["hits"] / seeds, "exact_below": r["exact_below"], "exact_above": r["exact_above"],
                "mean_width": float(np.mean(r["widths"])) if r["widths"] else float("nan"), "flagged": r["flagged"]}
            for k, r in out.items()}


def table(seeds: int, accepted=(16, 40, 80)) -> str:
    """The markdown coverage table over every toy and accepted count."""
    return markdown({(name, k): coverage(name, k, seeds) for name in TOYS for k in accepted})


def markdown(results: dict[tuple[str, int], dict]) -> str:
    """{(toy, accepted): `coverage` output} -> one markdown row per toy and accepted count."""
    lines = ["| toy | Z | AR_a' | KL(g‖a') | KL(g‖g') | KL(g'‖g) | k | KL(g‖a') cover (width) | KL(g‖g') cover (width) "
             "| KL(g'‖g) cover (width) [flagged] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, k), c in results.items():
        q = toy(name)[3]
        cells = [f"{c[x]['coverage']:.3f} ({c[x]['mean_width']:.1f})" for x in QUANTITIES]
        cells[2] += f" [{c['kl_g2_g']['flagged']}]"
        lines.append(f"| {name} | {q.z:.4f} | {q.ar:.4f} | {q.kl_g_a2:.1f} | {q.kl_g_g2:.1f} | {q.kl_g2_g:.1f} | {k} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=400)
    print(table(parser.parse_args().seeds))
