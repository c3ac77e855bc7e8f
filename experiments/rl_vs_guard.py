"""GUARD's target g vs the ideal distribution of KL-regularized RL, exactly on a toy ARM.

    python experiments/rl_vs_guard.py --out results/rl_vs_guard/toy

For each beta: the RL ideal pi_beta = a exp(b/beta) / Z_beta, its mass on b = 0, KL(g || pi_beta), and the
GUARD sampler with pi_beta as proposal (AR, KL(g||g')); plus a policy trained on the exact RL objective,
to show training reaches pi_beta. Writes results.json, results.md and rl_vs_guard.png/.svg (atomically);
`--plot-only` redraws the figure from results.json without recomputing.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_quantities, grid_log_prob, log_rl_ideal
from guard_jax.io import atomic_write_json, atomic_write_text
from guard_jax.models.toy import TabularARM
from guard_jax.train.rl import exact_objective


def train_exact(model, params, log_a, b, beta, steps):
    """Adam on the exact KL-regularized objective from pi = a; -> log pi over the grid."""
    opt = optax.adam(optax.exponential_decay(0.05, steps, 0.01))

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: exact_objective(grid_log_prob(model, p, model.max_len), jnp.asarray(log_a), jnp.asarray(b, log_a.dtype), beta))(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for _ in range(steps):
        params, s = step(params, s)
    return np.asarray(grid_log_prob(model, params, model.max_len))


def compute(seed: int, betas: list[float], steps: int) -> dict:
    with jax.enable_x64(True):
        model = TabularARM(4, 4, eos_id=0)
        params = model.init(jax.random.PRNGKey(seed))
        b = exact_constraint(SequenceSpace.of(model, 4), C.contains_ngram([1, 2]))
        log_a = exact_log_prob(model, params, 4)
        base = exact_quantities(log_a, log_a, b)
        rows = []
        for beta in betas:
            ideal = log_rl_ideal(log_a, b, beta)
            q = exact_quantities(log_a, ideal, b)
            trained = train_exact(model, params, log_a, b, beta, steps)
            rows.append({
                "beta": beta, "mass_on_b0": 1 - q.ar, "AR": q.ar, "KL(g||pi)": q.kl_g_a2, "KL(g||g')": q.kl_g_g2,
                "TV(trained, ideal)": float(0.5 * np.abs(np.exp(trained) - np.exp(ideal)).sum()),
            })
    return {"space": "V=4, T=4, EOS=0", "constraint": "contains [1, 2]", "Z": base.z, "KL(g||a)": base.kl_g_a, "rows": rows,
            "guard": {"mass_on_b0": 0.0, "KL(g||g')": 0.0}}


def table(res: dict) -> str:
    cols = ["beta", "mass_on_b0", "AR", "KL(g||pi)", "KL(g||g')", "TV(trained, ideal)"]
    lines = [f"Toy ARM ({res['space']}), b = {res['constraint']}, Z = {res['Z']:.4f}. GUARD's g: mass on b = 0 is 0.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |" for r in res["rows"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, stem: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    from guard_jax.plots import save_figure

    betas = [r["beta"] for r in res["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(betas, [r["mass_on_b0"] for r in res["rows"]], "o-", label="RL ideal: mass on b = 0")
    axes[0].axhline(0, color="k", ls="--", label="GUARD's g")
    axes[0].set_xscale("log"), axes[0].set_xlabel("beta"), axes[0].legend()
    axes[1].plot(betas, [r["KL(g||pi)"] for r in res["rows"]], "s-", label="KL(g || pi_beta)")
    axes[1].plot(betas, [-np.log(r["AR"]) for r in res["rows"]], "^--", label="-log AR (cost of GUARD with pi_beta)")
    axes[1].set_xscale("log"), axes[1].set_xlabel("beta"), axes[1].legend()
    save_figure(fig, stem)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/rl_vs_guard/toy"))
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.2, 0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps of the exact RL training per beta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", action="store_true", help="redraw from results.json")
    args = parser.parse_args(argv)
    if args.plot_only:
        res = json.loads((args.out / "results.json").read_text())
    else:
        res = compute(args.seed, args.betas, args.steps)
        atomic_write_json(args.out / "results.json", res)
        atomic_write_text(args.out / "results.md", table(res))
    plot(res, args.out / "rl_vs_guard")
    print(table(res))
    print(f"results: {args.out}/results.json, results.md, rl_vs_guard.png/.svg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
