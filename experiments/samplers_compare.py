"""GUARD, QRS, IMH, SMC (with and without the token mask) and AWRS at equal model-call budgets on the embedded LM.

    python experiments/samplers_compare.py --config experiments/configs/samplers_main.json --out results/samplers/main

Task: the embedded base LM a (`LM.load("embedded")`), b = the keyword occurs (word boundaries), `max_new_tokens`
new tokens; proposals a′ ∈ {a, CAP}. The token mask (prefix information for SMC with mask and AWRS) is the
keyword's full-match regex compiled to a token automaton over the vocabulary; it over-approximates b (its word
boundary is ASCII, b's is Unicode), and the final check is b itself. Gold: `n_gold` draws of a, filtered by b,
give Ẑ and samples of g.

Every sampler gets `budget` model calls per proposal (see `guard_jax.samplers.result`): GUARD `budget` draws of
a′; QRS `budget` / 2 draws (a′ draws, a scores; `budget` when a′ = a) with β = `beta_over_z` × Ẑ; IMH as many
GUARD-started chains of `steps` rounds as the budget allows at the measured AR_a′; SMC and AWRS `budget` /
(models stepped) particles in one run. Per row: samples, effective samples (accepted samples, or the ESS of
weighted particles), calls per effective sample, log Ẑ where the method gives one, KL(g‖law) where the law has
a closed form (GUARD: g′ by Theorem 2; QRS: min(P, βa′) / (β AR_β)), and for every sampler the bias of a test
function, E_out[log a(y)] − E_g[log a(y)] (weighted for SMC and AWRS), with its standard error. Writes
results.json (rewritten after every row, "complete" once all are done), results.md and samplers_compare.png/.svg
(atomically); `--plot-only` redraws from results.json; `--only cap:awrs ...` runs the named rows alone.

The same samplers' exact laws on the toy problem of `guard_jax.toy_demo` (a′ = a mixture that raises AR but
distorts g) come first: model calls per sample and KL(g‖law) for GUARD, QRS at each β and IMH after k
rounds, so the ordering on the embedded model can be read against an exact one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re

import jax
import numpy as np

from guard_jax import constraints as C
from guard_jax import estimators as E
from guard_jax.decoding import check_feasible, regex_automaton
from guard_jax.exact import exact_constraint, exact_log_prob, exact_quantities
from guard_jax.io import atomic_write_json, atomic_write_text
from guard_jax.lm import LM
from guard_jax.samplers import awrs, imh, imh_exact, qrs, qrs_exact, smc
from guard_jax.samplers.result import SamplerResult, draw_sequences, score_sequences

KINDS = ("guard", "qrs", "imh", "smc", "awrs")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One row family: `kind` in KINDS; `beta_over_z` (QRS: β = this × Ẑ), `steps` (IMH rounds), `mask` (SMC:
    use the token mask), `ess_threshold` (SMC, AWRS)."""

    kind: str
    beta_over_z: float = 1.0
    steps: int = 4
    mask: bool = False
    ess_threshold: float = 0.5

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sampler kind must be one of {KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    name: str
    keyword: str
    cap_prompt: str
    max_new_tokens: int
    n_gold: int
    budget: int
    samplers: dict
    proposals: tuple = ("a", "cap")
    seed: int = 0
    batch_size: int = 512
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> "CompareConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(fields)}")
        samplers = {}
        for name, spec in data.get("samplers", {}).items():
            valid = {f.name for f in dataclasses.fields(SamplerSpec)}
            if set(spec) - valid:
                raise ValueError(f"samplers.{name}: unknown keys {sorted(set(spec) - valid)}; valid keys: {sorted(valid)}")
            samplers[name] = SamplerSpec(**spec)
        for p in data.get("proposals", ("a", "cap")):
            if p not in ("a", "cap"):
                raise ValueError(f"proposals must be 'a' or 'cap', got {p!r}")
        return cls(**{**data, "samplers": samplers, "proposals": tuple(data.get("proposals", ("a", "cap")))})


def keyword_automaton(lm: LM, word: str, max_new_tokens: int):
    """The keyword's full-match regex (ASCII word boundaries) as a token automaton over lm's vocabulary."""
    tok = lm.tokenizer
    special = set(tok.all_special_ids)
    ids = [i for i in range(min(len(tok), lm.model.vocab_size)) if i not in special]
    strings = {i: s for i, s in zip(ids, tok.batch_decode([[i] for i in ids])) if s}
    pattern = rf"([\s\S]*[^A-Za-z0-9_])?{re.escape(word)}([^A-Za-z0-9_][\s\S]*)?"
    mask = regex_automaton(pattern, strings, eos_id=lm.model.eos_id, vocab_size=lm.model.vocab_size)
    check_feasible(mask, max_new_tokens)
    return mask


def weighted_mean(f_N, w_N) -> tuple[float, float]:
    """Self-normalised weighted mean of f and its delta-method standard error -> (mean, se)."""
    w = np.asarray(w_N, np.float64)
    w = w / w.sum()
    m = float(np.sum(w * f_N))
    return m, float(math.sqrt(np.sum(w**2 * (f_N - m) ** 2)))


def run_sampler(key, spec: SamplerSpec, a: LM, a2: LM, b, mask, cfg: CompareConfig, z_hat: float, ar_hat: float) -> SamplerResult:
    T, M = cfg.max_new_tokens, cfg.budget
    models = 1 if a2 is a else 2
    if spec.kind == "guard":
        tokens, lengths, _ = draw_sequences(key, a2, M, T, cfg.batch_size)
        ok = np.asarray(b(tokens, lengths), bool)
        return SamplerResult("guard", tokens[ok], lengths[ok], None, ok[ok], M, M, float(ok.mean()), float(ok.sum()), None, {})
    if spec.kind == "qrs":
        return qrs(key, a, a2, b, 10**9, beta=spec.beta_over_z * z_hat, max_new_tokens=T, batch_size=cfg.batch_size,
                   max_draws=M // models)
    if spec.kind == "imh":
        per_chain = 1 / max(ar_hat, 1e-9) + (models - 1) + models * spec.steps
        chains = max(1, int(M / per_chain))
        return imh(key, a, a2, b, chains, num_steps=spec.steps, max_new_tokens=T, batch_size=cfg.batch_size)
    n = M // models
    if spec.kind == "smc":
        return smc(key, a, a2, b, n, max_new_tokens=T, ess_threshold=spec.ess_threshold, mask=mask if spec.mask else None)
    return awrs(key, a, a2, b, n, mask=mask, max_new_tokens=T, ess_threshold=spec.ess_threshold)


def toy_exact_rows(cfg: CompareConfig) -> list[dict]:
    """GUARD, QRS (each configured β/Z) and IMH (each configured number of rounds) exactly on the toy problem:
    model calls per sample (a′ draws + a scores) and KL(g‖law)."""
    from guard_jax.toy_demo import toy_problem

    problem = toy_problem()
    T = problem.space.max_len
    with jax.enable_x64(True):
        log_a = np.asarray(exact_log_prob(problem.a.model, problem.a.params, T), np.float64)
        log_a2 = np.asarray(exact_log_prob(problem.a2.model, problem.a2.params, T), np.float64)
    b = exact_constraint(problem.space, problem.constraint)
    q = exact_quantities(log_a, log_a2, b)
    rows = [{"sampler": "guard", "calls_per_sample": 1 / q.ar, "KL(g||law)": q.kl_g_g2}]
    for name, spec in cfg.samplers.items():
        if spec.kind == "qrs":
            ex = qrs_exact(log_a, log_a2, b, spec.beta_over_z * q.z)
            rows.append({"sampler": name, "calls_per_sample": 2 / ex.acceptance_rate, "KL(g||law)": ex.kl_g_law})
        if spec.kind == "imh":
            ex = imh_exact(log_a, log_a2, b)
            start = np.exp(log_a2[ex.support_K] - np.logaddexp.reduce(log_a2[ex.support_K]))
            law_K = ex.law_after(start, spec.steps)
            g_K = np.exp(ex.log_g_K)
            with np.errstate(divide="ignore"):
                kl = float(np.sum(g_K * (ex.log_g_K - np.log(law_K))))  # inf if the law misses part of g's support
            rows.append({"sampler": name, "calls_per_sample": 1 / q.ar + 1 + 2 * spec.steps, "KL(g||law)": kl})
    return rows


def compute(cfg: CompareConfig, progress=print, only: set[str] | None = None, save=None) -> dict:
    """Every (proposal, sampler) row, or those named "proposal:sampler" in `only` (the same keys as in a full run);
    `save(partial_results)` is called after the gold draws and after each row."""
    key = jax.random.PRNGKey(cfg.seed)
    toy = toy_exact_rows(cfg)
    a = LM.load("embedded")
    b = C.keyword(a.tokenizer, cfg.keyword)
    lms = {"a": a, "cap": a.with_prefix(cfg.cap_prompt.format(keyword=cfg.keyword))}
    needs_mask = any(s.kind == "awrs" or s.mask for s in cfg.samplers.values())
    mask = keyword_automaton(a, cfg.keyword, cfg.max_new_tokens) if needs_mask else None
    g_tok, g_len, g_logp = draw_sequences(jax.random.fold_in(key, 0), a, cfg.n_gold, cfg.max_new_tokens, cfg.batch_size)
    ok = np.asarray(b(g_tok, g_len), bool)
    k_a = int(ok.sum())
    if k_a < 2:
        raise ValueError(f"only {k_a} of n_gold={cfg.n_gold} draws of a satisfy b: raise n_gold")
    g_tok, g_len, g_logp = g_tok[ok], g_len[ok], g_logp[ok]
    z = E.estimate_ar(k_a, cfg.n_gold)
    gold_mean = float(g_logp.mean())
    gold_se = float(g_logp.std(ddof=1) / math.sqrt(k_a))
    progress(f"gold: {k_a} of {cfg.n_gold} draws satisfy b, Z = {z}")
    rows = []
    res = {"config": dataclasses.asdict(cfg), "gold": {"n_gold": cfg.n_gold, "accepted": k_a, "Z": z._asdict(),
           "log_Z": math.log(z.value), "E_g[log a]": gold_mean, "se": gold_se}, "rows": rows, "toy_exact": toy,
           "complete": False}
    for pi, pname in enumerate(cfg.proposals):
        a2 = lms[pname]
        logp_a2_G = g_logp if a2 is a else score_sequences(a2, g_tok, g_len, cfg.batch_size)
        ar_hat = None
        for si, (sname, spec) in enumerate(cfg.samplers.items()):
            if only is not None and f"{pname}:{sname}" not in only and spec.kind != "guard":
                continue  # GUARD runs anyway: IMH sizes its chains by GUARD's measured AR
            out = run_sampler(jax.random.fold_in(key, 1000 * (pi + 1) + si), spec, a, a2, b, mask, cfg, z.value,
                              ar_hat if ar_hat is not None else z.value)
            if spec.kind == "guard":
                ar_hat = out.acceptance_rate
            rows.append(row(sname, pname, spec, out, a, a2, b, cfg, z, k_a, g_logp, logp_a2_G, gold_mean, gold_se))
            progress(f"{pname:>4} {sname:<10} " + ", ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in ("proposal", "sampler")))
            if save is not None:
                save(res)
    res["complete"] = True
    return res


def row(sname, pname, spec, out: SamplerResult, a, a2, b, cfg, z, k_a, g_logp, logp_a2_G, gold_mean, gold_se) -> dict:
    n = out.num_samples
    r = {"proposal": pname, "sampler": sname, "kind": spec.kind, "samples": n, "effective": round(out.ess, 2),
         "model_calls": out.model_calls, "calls_per_effective": out.calls_per_effective_sample,
         "constraint_calls": out.constraint_calls, "acceptance_rate": out.acceptance_rate,
         "log_Z": out.log_z, "KL(g||law)": None, "KL_se": None, "bias_log_a": None, "bias_se": None}
    if n == 0 or out.ess <= 0:
        return r
    draws = out.info.get("draws", out.model_calls)
    if spec.kind == "guard" and out.num_samples >= 1:
        kl = E.estimate_kl_g_g2(g_logp, logp_a2_G, k_a, cfg.n_gold, out.num_samples, draws)
        r["KL(g||law)"], r["KL_se"] = kl.value, (kl.hi - kl.value) / 1.96
    if spec.kind == "qrs":
        log_beta = math.log(out.info["beta"])
        mean, var, _ = _mean_var(np.maximum(0.0, g_logp - log_beta - logp_a2_G))
        value = mean - math.log(z.value) + log_beta + math.log(out.acceptance_rate)
        var += E.log_proportion_var(k_a, cfg.n_gold) + E.log_proportion_var(n, draws)
        r["KL(g||law)"], r["KL_se"] = value, math.sqrt(var)
    logp_a = score_sequences(a, out.tokens_NT, out.lengths_N, cfg.batch_size)
    keep = out.normalized_weights() > 0
    m, se = weighted_mean(logp_a[keep], out.normalized_weights()[keep])
    r["bias_log_a"], r["bias_se"] = m - gold_mean, math.sqrt(se**2 + gold_se**2)
    return r


def _mean_var(x) -> tuple[float, float, int]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.var(ddof=1) / x.size) if x.size > 1 else 0.0, int(x.size)


def _fmt(x, spec=".3g"):
    return "n/a" if x is None else format(x, spec)


def table(res: dict) -> str:
    g = res["gold"]
    lines = [f"# Samplers at equal model-call budgets: {res['config']['name']}", "",
             f"b = keyword {res['config']['keyword']!r}, {res['config']['max_new_tokens']} new tokens, budget "
             f"{res['config']['budget']} model calls per sampler; gold: {g['accepted']} of {g['n_gold']} draws of a, "
             f"log Ẑ = {g['log_Z']:.3f}, E_g[log a] = {g['E_g[log a]']:.2f} ± {g['se']:.2f}.", "",
             "| a′ | sampler | samples | effective | calls / effective | AR | log Ẑ | KL(g‖law) | E_out[log a] − E_g[log a] |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        kl = "n/a" if r["KL(g||law)"] is None else f"{r['KL(g||law)']:.3f} ± {r['KL_se']:.3f}"
        bias = "n/a" if r["bias_log_a"] is None else f"{r['bias_log_a']:+.2f} ± {r['bias_se']:.2f}"
        lines.append(f"| {r['proposal']} | {r['sampler']} | {r['samples']} | {r['effective']:.1f} | "
                     f"{_fmt(r['calls_per_effective'], '.1f')} | {_fmt(r['acceptance_rate'])} | {_fmt(r['log_Z'], '.3f')} | "
                     f"{kl} | {bias} |")
    lines += ["", "Exact, on the toy problem of `guard_jax.toy_demo` (a′ a mixture toward another ARM's gold law):", "",
              "| sampler | model calls per sample | KL(g‖law) |", "|---|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['calls_per_sample']:.1f} | {r['KL(g||law)']:.4f} |" for r in res.get("toy_exact", [])]
    return "\n".join(lines) + "\n"


def plot(res: dict, stem: pathlib.Path):
    from guard_jax.plots import legend_outside, new_figure, save_figure, series_styles

    rows = [r for r in res["rows"] if r["bias_log_a"] is not None and math.isfinite(r["calls_per_effective"])]
    labels = [f"{r['sampler']} (a′={r['proposal']})" for r in rows]
    styles = series_styles(labels)
    fig, ax = new_figure((6.5, 4.2))
    for r, label in zip(rows, labels):
        ax.errorbar(r["calls_per_effective"], abs(r["bias_log_a"]), yerr=r["bias_se"], fmt=styles[label].marker,
                    color=styles[label].color, capsize=2, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("model calls per effective sample of g")
    ax.set_ylabel("|E_out[log a] − E_g[log a]| (nats)")
    ax.set_title(f"{res['config']['name']}: cost vs distortion at {res['config']['budget']} calls")
    legend_outside(ax, fontsize=7)
    return save_figure(fig, stem)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=pathlib.Path, default=pathlib.Path("experiments/configs/samplers_quick.json"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/samplers/quick"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure and table from results.json")
    parser.add_argument("--only", nargs="+", metavar="PROPOSAL:SAMPLER", help="run only these rows (GUARD's rows always run)")
    args = parser.parse_args(argv)
    if args.plot_only:
        res = json.loads((args.out / "results.json").read_text())
    else:
        cfg = CompareConfig.from_dict(json.loads(args.config.read_text()))
        res = compute(cfg, only=set(args.only) if args.only else None,
                      save=lambda r: atomic_write_json(args.out / "results.json", r))
        atomic_write_json(args.out / "results.json", res)
    atomic_write_text(args.out / "results.md", table(res))
    plot(res, args.out / "samplers_compare")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
