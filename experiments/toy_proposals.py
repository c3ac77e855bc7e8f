"""Every proposal guard_jax has, trained on one toy ARM and measured EXACTLY against the number of samples drawn.

    python -m experiments.toy_proposals --config quick --out results/toy_proposals       # 3 min on 2 loaded cores
    python -m experiments.toy_proposals --config full --out results/toy_proposals
    python -m experiments.toy_proposals --config full --out results/toy_proposals --plot-only

The problem is `guard_jax.toy_demo.toy_problem`: a random tabular ARM a over V^T with a rare constraint b
(the bigram (1, 2) occurs and the first token is not 3), and a "CAP" proposal: the exact ARM of the mixture
(1 - m) a + m h, h the gold law of another random ARM (it raises the acceptance rate but distorts g, as a
constraint-aware prompt does). Every trained proposal is a tabular ARM over the same space initialised at a,
built by the same recipes as the language-model experiments (`guard_jax.proposals`), with the exact evaluator
(`guard_jax.evaluate.ExactEvaluator`) for their curves:

- sft_a / sft_cap: `sft` on the b-filtered samples of N draws of a / of the CAP proposal (one run per budget N);
- dpg: on-policy `dpg`; warm_dpg: `warm_start_dpg` from `sft` on the first budget's filtered a-samples;
- l3m: `l3m` on the first budget's filtered a-samples, the relaxed log barrier on E_pi[b] >= c;
- aux_q / aux_policy: `aux`'s value-head proposal q = a · sigmoid(R) and the policy distilled from it (one run);
- rl:beta: `rl`, REINFORCE with a KL penalty to a (reward b) at each beta;
- sft_masked: `sft_masked` on N masked-decoding samples of a (exact reachability masks; constrained decoding);
- asap / sft_asap: `sft_asap` on N sequential ASAp samples of a (the trie learns as they are drawn,
  `asap_batch` rows per update; one run per budget): `asap` is the law of ASAp's next sample after N (an ARM:
  the masked a reweighted by the trie's θ̃, AR 1), `sft_asap` the SFT of a on those N samples.

The untrained references are a, CAP and the masked law of a (AR 1, the distortion of constrained decoding).

At each budget (cumulative samples drawn for training: data draws plus on-policy draws, as each trainer
logs them) the exact AR_{a'}, AR gain AR_{a'}/AR_a, KL(g||a'), KL(g||g'), KL(g'||g) and TV(g, g') are recorded.
Results: OUT/CONFIG/config.json, OUT/CONFIG/seed=S/{curves.jsonl, result.json} (atomic; a seed whose result.json
exists is not rerun), OUT/CONFIG/{summary.json, table.md} and OUT/CONFIG/figures/{sample_efficiency, pareto,
rl_vs_guard}.{png,svg}. With --method M, one (method, seed) cell is run and --out is its result.json (the
interface of experiments/sweep.py; see experiments/configs/toy_proposals_sweep.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import numpy as np

from guard_jax import proposals as P
from guard_jax.decoding import exact_masked_log_prob, reachability_automaton
from guard_jax.evaluate import CurvePoint, ExactEvaluator, draw_gold
from guard_jax.exact import exact_quantities, log_rl_ideal
from guard_jax.io import atomic_write_json, atomic_write_text
from guard_jax.toy_demo import toy_problem


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: the toy problem, the budgets (samples drawn for training) and each trainer's settings."""

    name: str
    vocab_size: int
    max_len: int
    budgets: tuple[int, ...]  # cumulative samples drawn at which every method is evaluated
    seeds: tuple[int, ...]
    per_step: int  # samples drawn per update of the on-line trainers (DPG, L3M, aux, RL) and draw batch
    problem_seed: int = 0
    cap_mix: float = 0.5  # m of the CAP proposal (1 - m) a + m h
    sft_epochs: int = 4
    sft_batch: int = 64
    sft_lr: float = 0.05
    dpg_lr: float = 0.05
    warm_swap_every: int = 1  # warm-start DPG's proposal check, as in the experiments' configs
    l3m_lr: float = 0.05
    l3m_threshold: float = 0.9
    aux_lr: float = 0.1
    rl_lr: float = 0.05
    rl_betas: tuple[float, ...] = (0.1, 1.0)
    asap_batch: int = 64  # ASAp rows per trie update


CONFIGS = {
    "quick": Config("quick", vocab_size=5, max_len=5, budgets=(512, 1024, 2048, 4096), seeds=(0, 1, 2), per_step=256,
                    rl_betas=(0.1, 1.0)),
    "full": Config("full", vocab_size=6, max_len=6, budgets=(2048, 4096, 8192, 16384, 32768, 65536), seeds=(0, 1, 2),
                   per_step=512, rl_betas=(0.05, 0.2, 1.0)),
}
METHODS = ("sft_a", "sft_cap", "dpg", "warm_dpg", "l3m", "aux", "sft_masked", "asap", "rl")
CURVES = {"aux": ("aux_q", "aux_policy"), "asap": ("asap", "sft_asap")}  # methods that record more than one curve
QUANTITIES = ("ar", "ar_gain", "kl_g_a2", "kl_g_g2", "kl_g2_g", "tv_g_g2", "mass_b0")


class Toy:
    """The toy problem: a, its CAP proposal, b, the exact evaluator, the reachability automaton of b, and a
    gold set (the recipes' interface; the exact evaluator does not need its samples)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        problem = toy_problem(cfg.problem_seed, cfg.vocab_size, cfg.max_len, beta=cfg.cap_mix)
        self.a, self.cap, self.b, self.space = problem.a, problem.a2, problem.constraint, problem.space
        self.z = problem.exact.z
        self.evaluator = ExactEvaluator(self.a, self.b, cfg.max_len)
        self.automaton = reachability_automaton(self.space, self.evaluator.b)
        self.gold = draw_gold(jax.random.PRNGKey(cfg.problem_seed), self.a, self.b, cfg.budgets[0], max_new_tokens=cfg.max_len,
                              batch_size=cfg.per_step, progress=False)

    def masked_law(self, log_theta_levels=None):
        """Log law over the grid of masked decoding of a (reweighted by ASAp's θ̃ levels when given)."""
        with jax.enable_x64(True):
            return exact_masked_log_prob(self.space, np.asarray(self.evaluator.log_a, np.float64), self.evaluator.b, log_theta_levels)


def _row(curve: str, p: CurvePoint, **more) -> dict:
    return {"curve": curve, "samples": p.samples, "step": p.step, **more, "ar": p.ar.value, "kl_g_a2": p.kl_g_a2.value,
            "kl_g_g2": p.kl_g_g2.value, **p.extra}


def _curve_rows(name: str, curve: list[CurvePoint], final: CurvePoint) -> list[dict]:
    """A recipe's curve and its final point as rows, from the first budget on (a itself is a reference)."""
    return [_row(name, p) for p in curve + [final] if p.samples > 0]


def _online(cfg: Config, offset: int, seed: int) -> dict:
    """Steps and curve steps of an on-line trainer that has drawn `offset` samples before its first update."""
    steps = (cfg.budgets[-1] - offset) // cfg.per_step
    return dict(steps=steps, eval_steps=tuple(sorted({(b - offset) // cfg.per_step for b in cfg.budgets if b > offset})), seed=seed)


def _sft_on(toy: Toy, key, source, n: int, seed: int) -> tuple[CurvePoint, int]:
    """SFT of a on the b-filtered samples of the first n draws of `source` (one stream: nested data sets)."""
    cfg = toy.cfg
    tokens, lengths, kept = P.filtered_draws(key, source, toy.b, n, max_new_tokens=cfg.max_len, batch_size=min(n, cfg.per_step),
                                             progress=False)
    if kept == 0:  # nothing to learn: a unchanged
        return dataclasses.replace(toy.evaluator.start(), samples=n), 0
    config = P.SFTRecipeConfig(epochs=cfg.sft_epochs, batch_size=min(cfg.sft_batch, kept), learning_rate=cfg.sft_lr, seed=seed)
    p = P.sft(toy.a, toy.b, toy.gold, config, key=key, data=(tokens, lengths, n), progress=False)
    return toy.evaluator.point(p.lm, n, 0), kept


def run_method(toy: Toy, method: str, seed: int) -> list[dict]:
    """Train `method` with `seed` through the library's recipes and return its exact quantities at each budget
    (rows of one or more curves)."""
    cfg, ev = toy.cfg, toy.evaluator
    key, n0 = jax.random.fold_in(jax.random.PRNGKey(seed), sum(map(ord, method))), cfg.budgets[0]
    a, b, gold = toy.a, toy.b, toy.gold
    common = dict(key=key, evaluator=ev, progress=False, tensorboard=False)
    dpg_settings = dict(n_samples=cfg.per_step, minibatch=cfg.per_step, learning_rate=cfg.dpg_lr)
    if method in ("sft_a", "sft_cap"):
        source = a if method == "sft_a" else toy.cap
        rows = []
        for budget in cfg.budgets:
            point, kept = _sft_on(toy, key, source, budget, seed)
            rows.append(_row(method, point, kept=kept))
        return rows
    if method == "dpg":
        p = P.dpg(a, b, gold, P.DPGRecipeConfig(**dpg_settings, **_online(cfg, 0, seed)), **common)
        return _curve_rows(method, p.curve, ev.point(p.lm, p.train_samples, -1))
    if method == "warm_dpg":
        tokens, lengths, kept = P.filtered_draws(key, a, b, n0, max_new_tokens=cfg.max_len, batch_size=min(n0, cfg.per_step), progress=False)
        start = P.sft(a, b, gold, P.SFTRecipeConfig(epochs=cfg.sft_epochs, batch_size=min(cfg.sft_batch, kept), learning_rate=cfg.sft_lr,
                                                     seed=seed), key=key, data=(tokens, lengths, n0), progress=False)
        config = P.DPGRecipeConfig(**dpg_settings, swap_every=cfg.warm_swap_every, **_online(cfg, n0, seed))
        p = P.warm_start_dpg(a, b, gold, config, start=start, **common)
        return _curve_rows(method, p.curve, ev.point(p.lm, p.train_samples, -1))
    if method == "l3m":
        tokens, lengths, kept = P.filtered_draws(key, a, b, n0, max_new_tokens=cfg.max_len, batch_size=min(n0, cfg.per_step), progress=False)
        config = P.L3MRecipeConfig(threshold=cfg.l3m_threshold, n_samples=cfg.per_step, batch_size=min(cfg.sft_batch, kept),
                                   learning_rate=cfg.l3m_lr, **_online(cfg, n0, seed))
        p = P.l3m(a, b, gold, config, data=(tokens, lengths, n0), **common)
        return _curve_rows(method, p.curve, ev.point(p.lm, p.train_samples, -1))
    if method == "aux":
        p = P.aux(a, b, gold, P.AuxRecipeConfig(n_samples=cfg.per_step, learning_rate=cfg.aux_lr, **_online(cfg, 0, seed)), **common)
        return (_curve_rows("aux_q", p.extras["q_curve"], ev.point(p.extras["q"], p.train_samples, -1))
                + _curve_rows("aux_policy", p.curve, ev.point(p.lm, p.train_samples, -1)))
    if method == "sft_masked":
        rows = []
        for n in cfg.budgets:  # the first n samples of one stream: nested data sets
            config = P.SFTMaskedConfig(draws=n, epochs=cfg.sft_epochs, batch_size=min(cfg.sft_batch, n), learning_rate=cfg.sft_lr, seed=seed)
            p = P.sft_masked(a, b, gold, config, automaton=toy.automaton, key=key, batch_size=cfg.per_step, progress=False, tensorboard=False)
            rows.append(_row(method, ev.point(p.lm, n, 0)))
        return rows
    if method == "asap":
        rows = []
        for budget in cfg.budgets:
            config = P.SFTAsapConfig(draws=budget, asap_batch=cfg.asap_batch, epochs=cfg.sft_epochs, batch_size=cfg.sft_batch,
                                     learning_rate=cfg.sft_lr, seed=seed)
            p = P.sft_asap(a, b, gold, config, automaton=toy.automaton, key=key, progress=False, tensorboard=False)
            rows.append(_row("asap", ev.point_of_law(toy.masked_law(p.extras["asap"].log_theta_levels(toy.space)), budget, 0)))
            rows.append(_row("sft_asap", ev.point(p.lm, budget, 0)))
        return rows
    if method.startswith("rl:"):
        config = P.RLRecipeConfig(beta=float(method.split(":", 1)[1]), n_samples=cfg.per_step, learning_rate=cfg.rl_lr, **_online(cfg, 0, seed))
        p = P.rl(a, b, gold, config, **common)
        return _curve_rows(method, p.curve, ev.point(p.lm, p.train_samples, -1))
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS[:-1])} or rl:BETA (e.g. rl:0.5)")


def methods_of(cfg: Config) -> list[str]:
    return [m for m in METHODS if m != "rl"] + [f"rl:{beta:g}" for beta in cfg.rl_betas]


def references(toy: Toy) -> dict:
    """Untrained proposals (a, CAP, masked a) and the exact ideal law of KL-RL at each beta, as proposals for GUARD."""
    ev, rl = toy.evaluator, []
    for beta in toy.cfg.rl_betas:
        with jax.enable_x64(True):
            q = exact_quantities(ev.log_a, log_rl_ideal(ev.log_a, ev.b, beta), ev.b)
        rl.append({"beta": beta, "mass_b0": 1 - q.ar, "ar": q.ar, "kl_g_a2": q.kl_g_a2, "kl_g_g2": q.kl_g_g2})
    quantities = lambda p: {k: v for k, v in _row("", p).items() if k in QUANTITIES}  # noqa: E731
    return {"z": toy.z, "a": quantities(ev.start()), "cap": quantities(ev.point(toy.cap, 0, 0)),
            "masked": quantities(ev.point_of_law(toy.masked_law(), 0, 0)), "rl_ideal": rl}


def run_seed(toy: Toy, seed: int, folder: pathlib.Path) -> dict:
    """Every method for one seed; curves.jsonl is rewritten (atomically) after each method, result.json at the end."""
    rows, timings = [], {}
    for method in methods_of(toy.cfg):
        t0 = time.perf_counter()
        rows += [{"method": method, "seed": seed, **r} for r in run_method(toy, method, seed)]
        timings[method] = time.perf_counter() - t0
        atomic_write_text(folder / "curves.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    final = {}
    for r in rows:
        final[r["curve"]] = r  # rows are in budget order: the last one of a curve is its final point
    result = {"seed": seed, "config": toy.cfg.name, "final": final, "seconds": timings, "complete": True}
    atomic_write_json(folder / "result.json", result)
    return result


def load_rows(root: pathlib.Path) -> list[dict]:
    rows = []
    for folder in sorted(root.glob("seed=*")):
        if (folder / "result.json").exists():
            rows += [json.loads(line) for line in (folder / "curves.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise FileNotFoundError(f"no complete seed in {root} (run without --plot-only first)")
    return rows


def aggregate(rows: list[dict]) -> dict[str, list[dict]]:
    """curve -> [{samples, n_seeds, Q_mean, Q_std for each quantity}] in budget order."""
    out: dict[str, list[dict]] = {}
    for curve in dict.fromkeys(r["curve"] for r in rows):
        mine = [r for r in rows if r["curve"] == curve]
        points = []
        for samples in sorted({r["samples"] for r in mine}):
            at = [r for r in mine if r["samples"] == samples]
            point = {"samples": samples, "n_seeds": len(at)}
            for q in QUANTITIES:
                v = np.array([r[q] for r in at], float)
                point |= {f"{q}_mean": float(v.mean()), f"{q}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            points.append(point)
        out[curve] = points
    return out


def table(summary: dict) -> str:
    ref, curves = summary["references"], summary["curves"]
    cols = [("AR_a'", "ar"), ("AR gain", "ar_gain"), ("KL(g||a')", "kl_g_a2"), ("KL(g||g')", "kl_g_g2"), ("KL(g'||g)", "kl_g2_g"),
            ("mass on b=0", "mass_b0")]
    lines = [f"Toy ARM {summary['space']}, Z = AR_a = {ref['z']:.4g}, KL(g||a) = {ref['a']['kl_g_a2']:.3f} nats; "
             f"exact quantities, mean ± std over {summary['n_seeds']} seeds, at the largest budget each method reached.", "",
             "| proposal | samples drawn | " + " | ".join(c for c, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name in ("a", "cap", "masked"):
        lines.append(f"| {name} (untrained) | 0 | " + " | ".join(f"{ref[name][k]:.4g}" for _, k in cols) + " |")
    for curve, points in curves.items():
        p = points[-1]
        lines.append(f"| {curve} | {p['samples']} | " + " | ".join(f"{p[k + '_mean']:.4g} ± {p[k + '_std']:.2g}" for _, k in cols) + " |")
    lines += ["", "KL-regularized RL keeps mass on b = 0; GUARD's target g keeps none (mass 0, KL(g||g') = 0 by construction).", "",
              "| beta | ideal RL law: mass on b=0 | ideal: KL(g||pi_beta) | ideal as GUARD proposal: KL(g||g') | trained RL policy: mass on b=0 |",
              "|---|---|---|---|---|"]
    for r in ref["rl_ideal"]:
        p = curves.get(f"rl:{r['beta']:g}", [{}])[-1]
        trained = f"{p['mass_b0_mean']:.4g} ± {p['mass_b0_std']:.2g}" if p else "n/a"
        kl_g_g2 = max(r["kl_g_g2"], 0.0)  # >= 0; float round-off can print as -1e-19
        lines.append(f"| {r['beta']:g} | {r['mass_b0']:.4g} | {r['kl_g_a2']:.4g} | {kl_g_g2:.2g} | {trained} |")
    lines.append("| GUARD's g | 0 | 0 | 0 | — |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    """Sample-efficiency curves, Pareto front and RL-vs-GUARD, each PNG + SVG."""
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    from guard_jax.plots import save_figure

    ref, curves = summary["references"], summary["curves"]
    colors = dict(zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve, pts in curves.items():
        x = np.array([p["samples"] for p in pts])
        m, s = np.array([p["kl_g_a2_mean"] for p in pts]), np.array([p["kl_g_a2_std"] for p in pts])
        ax.plot(x, m, "o-", color=colors[curve], label=curve, ms=3)
        ax.fill_between(x, m - s, m + s, color=colors[curve], alpha=0.2)
    ax.axhline(ref["a"]["kl_g_a2"], color="k", ls="--", lw=1, label="a (untrained)")
    ax.axhline(ref["cap"]["kl_g_a2"], color="gray", ls=":", lw=1, label="CAP (untrained)")
    ax.axhline(ref["masked"]["kl_g_a2"], color="brown", ls="-.", lw=1, label="masked a (untrained)")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("samples drawn for training"), ax.set_ylabel("exact KL(g || a') [nats]")
    ax.set_title(f"Sample efficiency on a toy ARM ({summary['space']}); bands: ± 1 std over {summary['n_seeds']} seeds", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    paths += save_figure(fig, folder / "sample_efficiency")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [(p["kl_g_g2_mean"], p["ar_mean"], c) for c, pts in curves.items() for p in pts]
    points += [(ref[n]["kl_g_g2"], ref[n]["ar"], n) for n in ("a", "cap", "masked")]
    for curve, pts in curves.items():
        ax.scatter([p["kl_g_g2_mean"] for p in pts], [p["ar_mean"] for p in pts], color=colors[curve], label=curve, s=14)
    ax.scatter([ref["a"]["kl_g_g2"]], [ref["a"]["ar"]], marker="x", color="k", label="a (untrained)")
    ax.scatter([ref["cap"]["kl_g_g2"]], [ref["cap"]["ar"]], marker="+", color="gray", s=60, label="CAP (untrained)")
    ax.scatter([ref["masked"]["kl_g_g2"]], [ref["masked"]["ar"]], marker="D", color="brown", s=20, label="masked a (untrained)")
    front, best = [], -1.0
    for kl, ar, _ in sorted(points, key=lambda t: (t[0], -t[1])):  # lowest distortion first; keep rising AR
        if ar > best:
            front.append((kl, ar))
            best = ar
    ax.plot(*zip(*front), "k-", lw=0.8, alpha=0.6, label="Pareto front")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("exact KL(g || g') [nats] (distortion of GUARD's output)"), ax.set_ylabel("exact AR$_{a'}$ (acceptance rate)")
    ax.set_title("Every proposal and training budget (means over seeds)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    paths += save_figure(fig, folder / "pareto")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    betas = [r["beta"] for r in ref["rl_ideal"]]
    ax.plot(betas, [r["mass_b0"] for r in ref["rl_ideal"]], "o-", label="ideal RL law a·exp(b/β)/Z_β")
    trained = [curves.get(f"rl:{b:g}") for b in betas]
    if all(trained):
        ax.errorbar(betas, [t[-1]["mass_b0_mean"] for t in trained], yerr=[t[-1]["mass_b0_std"] for t in trained], fmt="s--",
                    capsize=3, label="trained RL policy")
    ax.axhline(0, color="k", ls=":", label="GUARD's g")
    ax.set_xscale("log"), ax.set_xlabel("β (KL coefficient)"), ax.set_ylabel("mass on b = 0"), ax.legend(fontsize=8)
    paths += save_figure(fig, folder / "rl_vs_guard")
    return paths


def summarise(root: pathlib.Path) -> dict:
    """summary.json, table.md and the figures, from the saved seeds alone (no training)."""
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"no results in {root} (run without --plot-only first)")
    config = json.loads((root / "config.json").read_text())
    rows = load_rows(root)
    summary = {"config": config["config"], "space": config["space"], "references": config["references"],
               "n_seeds": len({r["seed"] for r in rows}), "curves": aggregate(rows)}
    atomic_write_json(root / "summary.json", summary)
    atomic_write_text(root / "table.md", table(summary))
    summary["figures"] = [str(p) for p in plot(summary, root / "figures")]
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quick")
    parser.add_argument("--quick", action="store_true", help="the same as --config quick")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/toy_proposals"),
                        help="results root (OUT/CONFIG/...); with --method, the cell's result.json")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    parser.add_argument("--plot-only", action="store_true", help="rebuild summary, table and figures from saved results")
    parser.add_argument("--method", help="run one method for one --seed and write --out (sweep cells): "
                                         "sft_a, sft_cap, dpg, warm_dpg, l3m, aux, sft_masked, asap or rl:BETA")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a --method cell")
    args = parser.parse_args(argv)
    cfg = CONFIGS["quick" if args.quick else args.config]
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
    if args.method:
        toy = Toy(cfg)
        rows = run_method(toy, args.method, args.seed)
        final = {r["curve"]: r for r in rows}
        main_curve = CURVES.get(args.method, (args.method,))[0]
        atomic_write_json(args.out, {"config": cfg.name, "method": args.method, "seed": args.seed, "final": final[main_curve],
                                     "final_by_curve": final, "curve": rows, "references": references(toy)})
        print(json.dumps(final[main_curve], indent=1))
        return 0
    root = args.out / cfg.name
    if not args.plot_only:
        t0 = time.perf_counter()
        toy = Toy(cfg)
        atomic_write_json(root / "config.json", {"config": dataclasses.asdict(cfg), "references": references(toy),
                                                 "space": f"V={cfg.vocab_size}, T={cfg.max_len}, EOS=0"})
        for seed in cfg.seeds:
            folder = root / f"seed={seed}"
            if (folder / "result.json").exists():
                print(f"seed {seed}: done before, skipped")
                continue
            result = run_seed(toy, seed, folder)
            print(f"seed {seed}: {sum(result['seconds'].values()):.1f} s")
        print(f"trained in {time.perf_counter() - t0:.1f} s")
    summary = summarise(root)
    print(table(summary))
    print("figures:", ", ".join(summary["figures"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
