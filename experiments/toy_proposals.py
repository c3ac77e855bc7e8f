"""Every proposal guard_jax has, trained on one toy ARM and measured EXACTLY against the number of samples drawn.

    python -m experiments.toy_proposals --config quick --out results/toy_proposals       # <= 60 s on 2 cores
    python -m experiments.toy_proposals --config full --out results/toy_proposals
    python -m experiments.toy_proposals --config full --out results/toy_proposals --plot-only

The problem is `guard_jax.toy_demo.toy_problem`: a random tabular ARM a over V^T with a rare constraint b
(the bigram (1, 2) occurs and the first token is not 3), and a "CAP" proposal: the exact ARM of the mixture
(1 - m) a + m h, h the gold law of another random ARM (it raises the acceptance rate but distorts g, as a
constraint-aware prompt does). Every trained proposal is a tabular ARM over the same space initialised at a,
trained through `guard_jax.train.loop.run`:

- sft_a / sft_cap: SFT on the b-filtered samples of N draws of a / of the CAP proposal (one run per budget N);
- dpg: on-policy DPG; warm_dpg: SFT on the first budget's filtered a-samples, then DPG;
- l3m: SFT on the first budget's filtered a-samples plus the relaxed log barrier on E_pi[b] >= c;
- aux_q / aux_policy: the value-head proposal q = a · sigmoid(R) and the policy distilled from it (one run);
- rl:beta: REINFORCE with a KL penalty to a (reward b) at each beta;
- sft_masked: SFT on N masked-decoding samples of a (exact reachability masks; constrained decoding);
- asap / sft_asap: N sequential ASAp samples of a (the trie learns as they are drawn, `asap_batch` rows per
  update): `asap` is the law of ASAp's next sample after N (an ARM: the masked a reweighted by the trie's
  θ̃, AR 1), `sft_asap` the SFT of a on those N samples.

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
import functools
import json
import pathlib
import time

import jax
import numpy as np

from guard_jax.decoding import Asap, exact_masked_log_prob, masked_sample, reachability_automaton
from guard_jax.evaluate import LM, draw
from guard_jax.exact import exact_constraint, exact_log_prob, exact_quantities, log_rl_ideal
from guard_jax.io import atomic_write_json, atomic_write_text
from guard_jax.models.toy import TabularARM
from guard_jax.sampling import bos_prompt
from guard_jax.toy_demo import toy_problem
from guard_jax.train.aux import AuxConfig, AuxTrainer
from guard_jax.train.common import adam
from guard_jax.train.dpg import DPG, DPGConfig
from guard_jax.train.l3m import L3M, L3MConfig
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.rl import RL, RLConfig
from guard_jax.train.sft import SFT


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


class Setup:
    """The toy problem with its exact law tables, and trainers built once (one compiled step each)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        problem = toy_problem(cfg.problem_seed, cfg.vocab_size, cfg.max_len, beta=cfg.cap_mix)
        self.model, self.a_params = problem.a.model, problem.a.params
        self.cap, self.constraint = problem.a2, problem.constraint
        if not isinstance(self.model, TabularARM) or problem.a2.model != self.model:
            raise TypeError("toy_proposals expects tabular a and CAP proposal over one space")
        with jax.enable_x64(True):
            self.log_a = exact_log_prob(self.model, self.a_params, cfg.max_len)
            self.b = exact_constraint(problem.space, self.constraint)
        self.z = problem.exact.z
        self.space = problem.space
        self.automaton = reachability_automaton(self.space, self.b)
        self.sft_optimizer = adam(cfg.sft_lr)

    def quantities(self, model, params) -> dict:
        """Exact quantities of the proposal (model, params) against g = a·b / Z."""
        with jax.enable_x64(True):
            return self.quantities_of_law(exact_log_prob(model, params, self.cfg.max_len))

    def quantities_of_law(self, log_a2) -> dict:
        """Exact quantities of a proposal given as its log law over the grid."""
        with jax.enable_x64(True):
            q = exact_quantities(self.log_a, log_a2, self.b)
        return {"ar": q.ar, "ar_gain": q.ar / self.z, "kl_g_a2": q.kl_g_a2, "kl_g_g2": q.kl_g_g2, "kl_g2_g": q.kl_g2_g,
                "tv_g_g2": q.tv_g_g2, "mass_b0": max(1.0 - q.ar, 0.0)}  # >= 0; round-off of AR = 1 can give -1e-16

    def masked_law(self, log_theta_levels=None):
        """Log law over the grid of masked decoding of a (reweighted by ASAp's θ̃ levels when given)."""
        with jax.enable_x64(True):
            return exact_masked_log_prob(self.space, np.asarray(self.log_a, np.float64), self.b, log_theta_levels)

    def filtered_draws(self, key, lm: LM, n: int):
        """n samples of lm, b-filtered -> (tokens_NT, lengths_N) of the kept ones."""
        d = draw(key, lm, n, self.cfg.max_len, batch_size=min(n, self.cfg.per_step), progress=False)
        keep = np.asarray(self.constraint(d.tokens_NT, d.lengths_N), bool)
        return d.tokens_NT[keep], d.lengths_N[keep]

    def sft(self, params, tokens, lengths, seed: int):
        """SFT of `params` on (tokens, lengths) for cfg.sft_epochs epochs (unchanged if there is nothing to learn)."""
        if len(tokens) == 0:
            return params
        trainer = SFT(self.model, tokens, lengths, batch_size=min(self.cfg.sft_batch, len(tokens)), learning_rate=self.cfg.sft_lr,
                      seed=seed, optimizer=self.sft_optimizer)
        state, _ = run(trainer, trainer.init_state(params), LoopConfig(steps=self.cfg.sft_epochs * trainer.steps_per_epoch, progress=False))
        return state.params

    @functools.cached_property
    def dpg(self) -> DPG:
        c = self.cfg
        return DPG(self.model, self.a_params, self.constraint,
                   DPGConfig(n_samples=c.per_step, minibatch=c.per_step, max_new_tokens=c.max_len, learning_rate=c.dpg_lr))

    def rl(self, beta: float) -> RL:
        c = self.cfg
        return RL(self.model, self.a_params, self.constraint, RLConfig(beta=beta, n_samples=c.per_step, max_new_tokens=c.max_len,
                                                                       learning_rate=c.rl_lr))

    @functools.cached_property
    def aux(self) -> AuxTrainer:
        c = self.cfg
        return AuxTrainer(self.model, self.a_params, self.model, self.constraint,
                          AuxConfig(n_samples=c.per_step, max_new_tokens=c.max_len, learning_rate=c.aux_lr))


def _online(setup: Setup, trainer, state, offset: int, seed: int, evaluate) -> list[dict]:
    """Run `trainer` from `state` and evaluate at every budget >= offset; samples = offset + what it logged."""
    rows, drawn = [], offset
    for budget in setup.cfg.budgets:
        if budget < offset:
            continue
        steps = (budget - offset) // setup.cfg.per_step
        history = []
        if steps > int(state.step):
            state, history = run(trainer, state, LoopConfig(steps=steps, seed=seed, progress=False))
        drawn += int(sum(h["samples"] for h in history))
        rows += [{"curve": name, "samples": drawn, "step": int(state.step), **q} for name, q in evaluate(state).items()]
    return rows


def run_method(setup: Setup, method: str, seed: int) -> list[dict]:
    """Train `method` with `seed` and return its exact quantities at each budget (rows of one or more curves)."""
    cfg, key = setup.cfg, jax.random.fold_in(jax.random.PRNGKey(seed), sum(map(ord, method)))
    a_lm, n0 = LM.unconditional(setup.model, setup.a_params), cfg.budgets[0]
    policy = lambda name: (lambda state: {name: setup.quantities(setup.model, state.params)})  # noqa: E731
    if method in ("sft_a", "sft_cap"):
        lm = a_lm if method == "sft_a" else setup.cap
        rows = []
        for budget in cfg.budgets:  # the first `budget` draws of one stream: the data sets are nested
            tokens, lengths = setup.filtered_draws(key, lm, budget)
            params = setup.sft(setup.a_params, tokens, lengths, seed)
            rows.append({"curve": method, "samples": budget, "step": 0, "kept": len(tokens), **setup.quantities(setup.model, params)})
        return rows
    if method == "dpg":
        return _online(setup, setup.dpg, setup.dpg.init_state(setup.a_params), 0, seed, policy("dpg"))
    if method == "warm_dpg":
        params = setup.sft(setup.a_params, *setup.filtered_draws(key, a_lm, n0), seed)
        return _online(setup, setup.dpg, setup.dpg.init_state(params), n0, seed, policy("warm_dpg"))
    if method == "l3m":
        tokens, lengths = setup.filtered_draws(key, a_lm, n0)
        steps = (cfg.budgets[-1] - n0) // cfg.per_step
        trainer = L3M(setup.model, tokens, lengths, setup.constraint,
                      L3MConfig(thresholds=[cfg.l3m_threshold], total_steps=max(steps, 1), n_samples=cfg.per_step,
                                batch_size=min(cfg.sft_batch, len(tokens)), max_new_tokens=cfg.max_len, learning_rate=cfg.l3m_lr), seed=seed)
        return _online(setup, trainer, trainer.init_state(setup.a_params), n0, seed, policy("l3m"))
    if method == "aux":
        head = jax.tree.map(np.zeros_like, setup.a_params)  # R = 0: q = a at the start

        def evaluate(state):
            return {"aux_q": setup.quantities(*setup.aux.proposal(state)), "aux_policy": setup.quantities(setup.model, state.params["policy"])}

        return _online(setup, setup.aux, setup.aux.init_state({"head": head, "policy": setup.a_params}), 0, seed, evaluate)
    if method == "sft_masked":
        prompt, pmask = bos_prompt(setup.model, cfg.budgets[-1])
        s = masked_sample(key, setup.model, setup.a_params, prompt, pmask, setup.automaton, cfg.max_len)
        tokens, lengths = np.asarray(s.tokens_BT), np.asarray(s.lengths_B)
        return [{"curve": method, "samples": n, "step": 0, **setup.quantities(setup.model, setup.sft(setup.a_params, tokens[:n], lengths[:n], seed))}
                for n in cfg.budgets]  # the first n samples of one stream: nested data sets
    if method == "asap":
        asap, rows, parts, drawn = Asap(setup.model, setup.a_params, setup.automaton, cfg.max_len), [], [], 0
        for i, budget in enumerate(cfg.budgets):
            s = asap.sample(jax.random.fold_in(key, i), budget - drawn, batch_size=cfg.asap_batch)
            parts.append((s.tokens_NT, s.lengths_N))
            drawn = budget
            tokens, lengths = (np.concatenate(x) for x in zip(*parts))
            rows.append({"curve": "asap", "samples": budget, "step": 0, **setup.quantities_of_law(setup.masked_law(asap.log_theta_levels(setup.space)))})
            rows.append({"curve": "sft_asap", "samples": budget, "step": 0,
                         **setup.quantities(setup.model, setup.sft(setup.a_params, tokens, lengths, seed))})
        return rows
    if method.startswith("rl:"):
        beta = float(method.split(":", 1)[1])
        trainer = setup.rl(beta)
        return _online(setup, trainer, trainer.init_state(setup.a_params), 0, seed, policy(method))
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS[:-1])} or rl:BETA (e.g. rl:0.5)")


def methods_of(cfg: Config) -> list[str]:
    return [m for m in METHODS if m != "rl"] + [f"rl:{beta:g}" for beta in cfg.rl_betas]


def references(setup: Setup) -> dict:
    """Untrained proposals (a, CAP) and the exact ideal law of KL-RL at each beta, as proposals for GUARD."""
    rl = []
    for beta in setup.cfg.rl_betas:
        with jax.enable_x64(True):
            q = exact_quantities(setup.log_a, log_rl_ideal(setup.log_a, setup.b, beta), setup.b)
        rl.append({"beta": beta, "mass_b0": 1 - q.ar, "ar": q.ar, "kl_g_a2": q.kl_g_a2, "kl_g_g2": q.kl_g_g2})
    return {"z": setup.z, "a": setup.quantities(setup.model, setup.a_params), "cap": setup.quantities(setup.cap.model, setup.cap.params),
            "masked": setup.quantities_of_law(setup.masked_law()), "rl_ideal": rl}


def run_seed(setup: Setup, seed: int, folder: pathlib.Path) -> dict:
    """Every method for one seed; curves.jsonl is rewritten (atomically) after each method, result.json at the end."""
    rows, timings = [], {}
    for method in methods_of(setup.cfg):
        t0 = time.perf_counter()
        rows += [{"method": method, "seed": seed, **r} for r in run_method(setup, method, seed)]
        timings[method] = time.perf_counter() - t0
        atomic_write_text(folder / "curves.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    final = {}
    for r in rows:
        final[r["curve"]] = r  # rows are in budget order: the last one of a curve is its final point
    result = {"seed": seed, "config": setup.cfg.name, "final": final, "seconds": timings, "complete": True}
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
        setup = Setup(cfg)
        rows = run_method(setup, args.method, args.seed)
        final = {r["curve"]: r for r in rows}
        main_curve = CURVES.get(args.method, (args.method,))[0]
        atomic_write_json(args.out, {"config": cfg.name, "method": args.method, "seed": args.seed, "final": final[main_curve],
                                     "final_by_curve": final, "curve": rows, "references": references(setup)})
        print(json.dumps(final[main_curve], indent=1))
        return 0
    root = args.out / cfg.name
    if not args.plot_only:
        t0 = time.perf_counter()
        setup = Setup(cfg)
        atomic_write_json(root / "config.json", {"config": dataclasses.asdict(cfg), "references": references(setup),
                                                 "space": f"V={cfg.vocab_size}, T={cfg.max_len}, EOS=0"})
        for seed in cfg.seeds:
            folder = root / f"seed={seed}"
            if (folder / "result.json").exists():
                print(f"seed {seed}: done before, skipped")
                continue
            result = run_seed(setup, seed, folder)
            print(f"seed {seed}: {sum(result['seconds'].values()):.1f} s")
        print(f"trained in {time.perf_counter() - t0:.1f} s")
    summary = summarise(root)
    print(table(summary))
    print("figures:", ", ".join(summary["figures"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
