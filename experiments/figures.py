"""Every figure of the lexical and sentiment experiments, regenerated from their saved results.json (no retraining).

    python -m experiments.figures results/lexical_quick_seed0                     # that run's figures
    python -m experiments.figures results/lexical_full_seed{0,1,2} --out results/lexical_full_seeds

Per context: positional bias (g vs each g', the paper's appendix histogram), sample efficiency (KL(g||a')
against the samples drawn for training, one curve per proposal; the paper's Figures 3 and 5) and the Pareto
plot (AR_a' against KL(g||g') for every proposal and training budget; Figure 4). With several results
folders (seeds of one config), curves show the mean over seeds with a band from the lowest to the highest
seed; with one, the band is the 95% CI of each estimate. Each proposal keeps one colour and marker in every
figure (distinct for up to 20 proposals), legends sit outside the axes. PNG and SVG, written atomically.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from guard_jax.metrics.position import plot_positions
from guard_jax.plots import Style, legend_outside, new_figure, save_figure, series_styles

GOLD = Style("#000000", "*")  # g (and a, its unconstrained base) in every figure


def load(folder: str | pathlib.Path) -> dict:
    path = pathlib.Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a results folder written by experiments/lexical.py or sentiment.py")
    return json.loads(path.read_text())


def _points(method: dict) -> list[dict]:
    """The method's curve, ending with its final evaluation (the point at its full training budget)."""
    final = {"samples": method["train_samples"], "KL(g||a2)": method["estimates"]["KL(g||a2)"],
             "AR_a2": method["estimates"]["AR_a2"], "KL(g||g2)": method["estimates"]["KL(g||g2)"], "final": True}
    return [p for p in method["curve"] if p["samples"] < final["samples"]] + [final]


def _series(runs: list[dict], ctx: int, name: str, quantity: str):
    """x (samples), mean, lo, hi over seeds (or the CI with one seed), at the points every seed has."""
    per_seed = [[p for p in _points(r["contexts"][ctx]["methods"][name]) if p[quantity] is not None] for r in runs]
    xs = sorted(set.intersection(*(set(p["samples"] for p in pts) for pts in per_seed)))
    if not xs:
        return None
    vals = np.asarray([[next(p[quantity] for p in pts if p["samples"] == x)["value"] for x in xs] for pts in per_seed])
    if len(runs) == 1:
        pts = per_seed[0]
        lo = [next(p[quantity] for p in pts if p["samples"] == x)["lo"] for x in xs]
        hi = [next(p[quantity] for p in pts if p["samples"] == x)["hi"] for x in xs]
        return np.asarray(xs), vals[0], np.asarray(lo), np.asarray(hi)
    return np.asarray(xs), vals.mean(0), vals.min(0), vals.max(0)


def _methods(runs: list[dict], ctx: int) -> list[str]:
    """The proposals every run has, in the config's order (results.json stores them sorted by name)."""
    have = runs[0]["contexts"][ctx]["methods"]
    order = [m for m in runs[0]["config"].get("proposals", []) if m in have] + sorted(set(have) - set(runs[0]["config"].get("proposals", [])))
    return [m for m in order if all(m in r["contexts"][ctx]["methods"] for r in runs)]


def styles(runs: list[dict], ctx: int) -> dict[str, Style]:
    """One colour and marker per proposal of the context, the same in each of its figures."""
    return series_styles(_methods(runs, ctx))


def sample_efficiency(runs: list[dict], ctx: int, stem: pathlib.Path, quantity: str = "KL(g||a2)") -> list[pathlib.Path]:
    """`quantity` against the samples drawn for training, one line (and band) per proposal."""
    fig, ax = new_figure(figsize=(6.5, 4))
    c0 = runs[0]["contexts"][ctx]
    for name, (color, marker) in styles(runs, ctx).items():
        s = _series(runs, ctx, name, quantity)
        if s is None:
            continue
        x, mid, lo, hi = s
        x = np.maximum(x, 1)  # CAP and the base point (0 samples) sit at the left edge of the log axis
        ax.plot(x, mid, "-", marker=marker, color=color, label=name, markersize=5)
        ax.fill_between(x, lo, hi, color=color, alpha=0.12)
    if quantity == "KL(g||a2)":
        ax.axhline(c0["gold"]["KL(g||a)"]["value"], color="k", ls="--", lw=1, label="KL(g||a) = -log Z")
        ax.set_ylabel("KL(g‖a')")
    else:
        ax.axhline(c0["gold"]["Z"]["value"], color="k", ls="--", lw=1, label="AR_a = Z")
        ax.set_ylabel("AR_a'")
        ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("samples drawn for training (1 = none)")
    seeds = f", {len(runs)} seeds" if len(runs) > 1 else ""
    ax.set_title(f"sample efficiency — {runs[0]['config']['name']} [{c0['name']}]{seeds}")
    legend_outside(ax)
    return save_figure(fig, stem)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (kl, ar) not dominated by another (lower-or-equal KL and higher-or-equal AR, one strictly)."""
    out = []
    for i, (k, a) in enumerate(points):
        if not any((k2 <= k and a2 >= a) and (k2 < k or a2 > a) for j, (k2, a2) in enumerate(points) if j != i):
            out.append(i)
    return out


def pareto(runs: list[dict], ctx: int, stem: pathlib.Path) -> list[pathlib.Path]:
    """AR_a' (log) against KL(g||g') for every proposal and training budget (first seed), with the Pareto front."""
    r = runs[0]
    c = r["contexts"][ctx]
    fig, ax = new_figure(figsize=(6.5, 4))
    allpts = []
    for name, (color, marker) in styles(runs, ctx).items():
        m = c["methods"][name]
        pts = [p for p in _points(m) if p["KL(g||g2)"] is not None and p["AR_a2"]["value"] > 0]
        if not pts:
            continue
        kl = [p["KL(g||g2)"]["value"] for p in pts]
        ar = [p["AR_a2"]["value"] for p in pts]
        sizes = [20 + 60 * (i + 1) / len(pts) for i in range(len(pts))]  # marker size grows with the budget
        ax.plot(kl, ar, "-", color=color, alpha=0.4)
        ax.scatter(kl, ar, s=sizes, label=name, color=color, marker=marker)
        allpts += list(zip(kl, ar))
    ax.scatter([0.0], [c["gold"]["Z"]["value"]], marker=GOLD.marker, s=120, color=GOLD.color, label="a (AR = Z)")
    allpts.append((0.0, c["gold"]["Z"]["value"]))
    front = sorted(allpts[i] for i in pareto_front(allpts))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, ls=":", label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel("KL(g‖g')  (distortion of GUARD's output)")
    ax.set_ylabel("AR_a'  (acceptance rate)")
    ax.set_title(f"AR vs distortion — {r['config']['name']} [{c['name']}] (bigger marker = more training)")
    legend_outside(ax)
    return save_figure(fig, stem)


def positions(run: dict, ctx: int, stem: pathlib.Path) -> list[pathlib.Path]:
    """The positional-bias histogram: g and each g' (relative position in the continuation, 10% bins)."""
    c = run["contexts"][ctx]
    series = {"g (gold)": np.asarray(c["gold"]["positions"])}
    looks = {"g (gold)": GOLD}
    for name, style in styles([run], ctx).items():
        if c["methods"][name]["positions"]:
            series[f"g' {name}"] = np.asarray(c["methods"][name]["positions"])
            looks[f"g' {name}"] = style
    what = run["config"].get("position_label", "relative position of the constraint in the continuation")
    return plot_positions(series, stem, xlabel=what, title=f"positional bias — {run['config']['name']} [{c['name']}]", styles=looks)


def make_all(*folders: str | pathlib.Path, out: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Every figure for the results in `folders` (seeds of one config), into `out` (default: the first folder)."""
    if not folders:
        raise ValueError("pass at least one results folder")
    runs = [load(f) for f in folders]
    names = {r["config"]["name"] for r in runs}
    if len(names) > 1:
        raise ValueError(f"results folders come from different configs {sorted(names)}: pass the seeds of one config")
    out = pathlib.Path(out or folders[0]) / "figures"
    paths = []
    for i, c in enumerate(runs[0]["contexts"]):
        tag = c["name"]
        paths += positions(runs[0], i, out / f"positional_bias_{tag}")
        paths += sample_efficiency(runs, i, out / f"sample_efficiency_{tag}")
        paths += sample_efficiency(runs, i, out / f"ar_vs_samples_{tag}", quantity="AR_a2")
        paths += pareto(runs, i, out / f"pareto_{tag}")
    return paths


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="results folders (results/<config>_seed<k>)")
    p.add_argument("--out", default=None, help="where to write figures/ (default: the first folder)")
    args = p.parse_args(argv)
    paths = make_all(*args.folders, out=args.out)
    for path in paths:
        if path.suffix == ".png":
            print(path)
    return paths


if __name__ == "__main__":
    main()
