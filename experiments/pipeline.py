"""The paper's pipeline for one task, shared by experiments/lexical.py and experiments/sentiment.py.

For each conditioning context: draw N_a samples of a once (`guard_jax.evaluate.draw_gold`: their b-filtered
subset are the gold samples of g, reused by every proposal), build each proposal a' by name
(`guard_jax.proposals.Builder`: checkpoints, metrics.jsonl and a KL / AR curve in its own run folder), then
evaluate it (`evaluate_proposal`): AR_a', AR gain, KL(g||a'), KL(g||g'), KL(g'||g) with CIs, Self-BLEU-2..5
and semantic similarity of the samples of g' at one set size per context, and the positional statistic of
the constraint. Results: results.json (with the resolved config of every proposal and its run folder),
results.md and figures in one folder, written atomically.

Resume: a proposal trains in runs/<context>/<name>/<fingerprint>/, the fingerprint a hash of its resolved
config, of what it starts from and of the experiment's inputs (model, context, constraint, budgets, seed).
A rerun with the same settings resumes there; changed settings train afresh in another folder, so a row is
never the result of settings other than those results.json states.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from guard_jax.config import to_dict
from guard_jax.constraints import Constraint
from guard_jax.evaluate import MonteCarloEvaluator, draw_gold, estimate_dict, evaluate_proposal
from guard_jax.io import atomic_write_json, atomic_write_text
from guard_jax.lm import EMBEDDED, LM
from guard_jax.metrics.diversity import common_set_size, diversity_report
from guard_jax.proposals import Builder, named_key

from experiments.config import ExperimentConfig

XLA_CACHE = pathlib.Path(os.environ.get("GUARD_JAX_XLA_CACHE", pathlib.Path.home() / ".cache" / "guard_jax" / "xla"))
DEFAULT_MODEL = EMBEDDED


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk ($GUARD_JAX_XLA_CACHE) so that reruns skip most compilation."""
    XLA_CACHE.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(XLA_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@dataclasses.dataclass(frozen=True)
class Task:
    """One conditioning context. `context`: text after BOS ("" = unconditional); `cap_prompt`: the
    constraint-aware prompt put before the context; `positions(texts) -> positions_N` in [0, 1] (NaN where
    undefined): where in each decoded continuation the constraint is met (the positional-bias statistic);
    `spec`: the constraint as a spec string when it has one (masking derives its regex from it)."""

    name: str
    context: str
    cap_prompt: str
    constraint: Constraint
    positions: Callable[[list[str]], np.ndarray]
    spec: str | None = None


@dataclasses.dataclass
class Setup:
    """The base model a (an unconditional LM with its tokenizer), the experiment config, where runs are written."""

    a: LM
    config: ExperimentConfig
    run_dir: pathlib.Path
    progress: bool = True

    def key(self, *names: str) -> jax.Array:
        """A key for (seed, names...): the same names give the same key in every run."""
        return named_key(jax.random.PRNGKey(self.config.seed), *names)


def describe_samples(a: LM, task: Task, tokens_NT, lengths_N, n_div: int) -> tuple[dict, list[str]]:
    """Positions and a few example texts of (up to n_div) samples -> (description, their texts)."""
    texts = a.decode(tokens_NT[:n_div], lengths_N[:n_div])
    pos = np.asarray(task.positions(texts), np.float64)
    return {"positions": [float(p) for p in pos[~np.isnan(pos)]], "examples": texts[:5]}, texts


def run_task(setup: Setup, task: Task, proposals: list[str]) -> dict:
    """Everything for one context: gold samples, each proposal built, trained and evaluated, then the
    diversity of every row at one Self-BLEU set size (`common_set_size`)."""
    cfg, ev = setup.config, setup.config.eval
    a = setup.a.with_context(task.context)
    t0 = time.perf_counter()
    gold = draw_gold(setup.key(task.name, "gold"), a, task.constraint, ev.n_a, max_new_tokens=cfg.max_new_tokens,
                     batch_size=cfg.batch_size, progress=setup.progress, desc=f"[{task.name}] sampling a (gold)")
    gold_desc, gold_texts = describe_samples(a, task, gold.tokens_NT, gold.lengths_N, ev.n_diversity)
    result = {"name": task.name, "context": task.context, "cap_prompt": task.cap_prompt, "constraint": task.constraint.name,
              "gold": {"draws": gold.draws, "accepted": gold.accepted, "Z": estimate_dict(gold.z), "KL(g||a)": estimate_dict(gold.kl_g_a),
                       **gold_desc, "seconds": time.perf_counter() - t0},
              "methods": {}}
    rows = {"gold": (result["gold"], gold_texts)}
    evaluator = MonteCarloEvaluator(gold, task.constraint, ev.n_curve, cfg.batch_size, cfg.score_batch_size)
    inputs = {"model": cfg.model, "context": task.context, "constraint": task.constraint.name, "max_new_tokens": cfg.max_new_tokens,
              "batch_size": cfg.batch_size, "score_batch_size": cfg.score_batch_size, "seed": cfg.seed, "n_a": ev.n_a,
              "n_curve": ev.n_curve}
    builder = Builder(a, task.constraint, gold, cfg.train, key=setup.key(task.name), cap=a.with_prefix(task.cap_prompt) if task.cap_prompt else None,
                      run_root=setup.run_dir / task.name, evaluator=evaluator, batch_size=cfg.batch_size, progress=setup.progress,
                      tensorboard=cfg.tensorboard, inputs=inputs, constraint_spec=task.spec)
    for name in tqdm(proposals, desc=f"[{task.name}] proposals", unit="proposal", disable=not setup.progress):
        t1 = time.perf_counter()
        p = builder.get(name)
        t2 = time.perf_counter()
        e = evaluate_proposal(named_key(builder.key_of(name), "eval"), gold, a, p.lm, task.constraint, ev.n_a2, batch_size=cfg.batch_size,
                              score_batch_size=cfg.score_batch_size, progress=setup.progress, desc=f"[{task.name}] sampling a' ({name})")
        builder.finals[name] = e.point(p.train_samples)
        estimates = e.to_dict()
        ar = estimates["AR_a2"]["value"]
        desc, texts = describe_samples(a, task, e.tokens_NT, e.lengths_N, ev.n_diversity)
        result["methods"][name] = {
            "train_samples": p.train_samples, "curve": [q.to_dict() for q in p.curve], "metrics_jsonl": p.metrics_jsonl,
            "config": to_dict(builder.config(name)), "run_dir": str(pathlib.Path(p.metrics_jsonl).parent) if p.metrics_jsonl else None,
            "estimates": estimates, "guard_draws_per_sample": (1.0 / ar) if ar > 0 else None, **desc,
            "train_seconds": builder.seconds.get(name, t2 - t1), "eval_seconds": time.perf_counter() - t2,
        }
        rows[name] = (result["methods"][name], texts)
    set_size = common_set_size([len(t) for _, t in rows.values()], ev.n_diversity, ev.min_diversity_set)
    result["self_bleu_set"] = set_size
    for row, texts in rows.values():
        row["diversity"] = diversity_report(texts, set_size, cfg.semantic)
    return result


def average(contexts: list[dict]) -> dict:
    """Per method, the mean over contexts of each point estimate (None where any context lacks it)."""
    out: dict = {}
    for name in contexts[0]["methods"]:
        row = {}
        for q in ("AR_a2", "AR_gain", "KL(g||a2)", "KL(g||g2)", "KL(g2||g)"):
            vals = [c["methods"][name]["estimates"][q] for c in contexts if name in c["methods"]]
            row[q] = None if any(v is None for v in vals) else float(np.mean([v["value"] for v in vals]))
        out[name] = row
    out["_Z"] = float(np.mean([c["gold"]["Z"]["value"] for c in contexts]))
    return out


def _fmt(e: dict | None, digits: int = 3) -> str:
    if e is None:
        return "n/a"
    return f"{e['value']:.{digits}g} [{e['lo']:.{digits}g}, {e['hi']:.{digits}g}]"


def _div_cells(d: dict) -> list[str]:
    sb = d["diversity"]["self_bleu"] or {}
    sem = d["diversity"]["semantic_similarity"]
    return [f"{d['diversity']['n']:,}"] + [f"{sb[k]:.3f}" if k in sb else "n/a" for k in ("2", "3", "4", "5")] + [f"{sem:.3f}" if sem is not None else "n/a"]


def markdown(results: dict) -> str:
    """The results tables (one per context, and the average over contexts when there are several)."""
    lines = [f"# {results['config']['name']} (seed {results['config'].get('seed', 0)})", "",
             f"model `{results['model']}`, {results['config']['max_new_tokens']} new tokens, "
             f"{results['seconds']:.0f} s on {results['machine']}. 95% CIs in brackets. Diversity of the samples of g (gold) and "
             "of each g' (lower = more diverse; n = samples used): Self-BLEU on disjoint sets of the same size in every row "
             "of a context (it grows with the number of texts), semantic similarity = mean pairwise cosine of all n.", ""]
    for c in results["contexts"]:
        g = c["gold"]
        lines += [f"## context `{c['name']}`: {c['context']!r}" if c["context"] else f"## context `{c['name']}` (unconditional, BOS)", "",
                  f"constraint `{c['constraint']}`; CAP prompt {c['cap_prompt']!r}; Z = AR_a = {_fmt(g['Z'])} "
                  f"({g['accepted']:,} of {g['draws']:,} draws); KL(g||a) = -log Z = {g['KL(g||a)']['value']:.3f}; "
                  f"Self-BLEU on sets of {c.get('self_bleu_set') or 'n/a'} samples", "",
                  "| proposal | train samples | AR_a' | AR gain | KL(g‖a') | KL(g‖g') | KL(g'‖g) | n | SB-2 | SB-3 | SB-4 | SB-5 | sem. sim. |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  "| gold g | – | – | – | – | – | – | " + " | ".join(_div_cells(g)) + " |"]
        for name, m in c["methods"].items():
            e = m["estimates"]
            lines.append(f"| {name} | {m['train_samples']:,} | {_fmt(e['AR_a2'])} | {_fmt(e['AR_gain'])} | {_fmt(e['KL(g||a2)'])} | "
                         f"{_fmt(e['KL(g||g2)'])} | {_fmt(e['KL(g2||g)'])} | " + " | ".join(_div_cells(m)) + " |")
        lines.append("")
    if len(results["contexts"]) > 1:
        avg = results["average"]
        lines += [f"## average over {len(results['contexts'])} contexts (mean Z = {avg['_Z']:.3g})", "",
                  "| proposal | AR_a' | AR gain | KL(g‖a') | KL(g‖g') | KL(g'‖g) |", "|---|---|---|---|---|---|"]
        for name, row in avg.items():
            if name != "_Z":
                lines.append(f"| {name} | " + " | ".join("n/a" if row[q] is None else f"{row[q]:.3g}"
                                                        for q in ("AR_a2", "AR_gain", "KL(g||a2)", "KL(g||g2)", "KL(g2||g)")) + " |")
        lines.append("")
    lines += ["Figures: " + ", ".join(f"`{p}`" for p in results.get("figures", [])), ""]
    return "\n".join(lines)


def results_dir(config: ExperimentConfig, out_root: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(out_root) / f"{config.name}_seed{config.seed}"


def run(setup: Setup, tasks: list[Task], out: pathlib.Path) -> dict:
    """Run every task, write results.json, results.md and the figures to `out`; -> the results dict."""
    from experiments import figures

    t0 = time.perf_counter()
    contexts = [run_task(setup, task, list(setup.config.proposals)) for task in tasks]
    results = {"config": to_dict(setup.config), "model": str(setup.config.model), "contexts": contexts, "average": average(contexts),
               "seconds": time.perf_counter() - t0,
               "machine": f"{jax.devices()[0].platform}, {jax.device_count()} device(s)"}
    atomic_write_json(out / "results.json", results)
    results["figures"] = [str(p.relative_to(out)) for p in figures.make_all(out) if p.suffix == ".png"]
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    return results


def load_model(path: str | pathlib.Path) -> LM:
    """The unconditional LM of a local GPT-2/Gemma Hugging Face folder, with a clear error if missing."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no Hugging Face model folder there (config.json + model.safetensors). "
                                f"The embedded model is {DEFAULT_MODEL}; train one with `python -m experiments.pretrain_base`.")
    a = LM.load(path)
    if a.tokenizer is None:
        raise FileNotFoundError(f"--model {path} has no tokenizer files (tokenizer.json); text constraints need one")
    return a
