"""The paper's pipeline for one task, shared by experiments/lexical.py and experiments/sentiment.py.

For each conditioning context: draw N_a samples of a (their b-filtered subset are the gold samples of g,
drawn once and reused by every proposal), build each proposal a' by name from `proposals.PROPOSALS`
(training with the shared loop, checkpoints and metrics.jsonl in the run folder, and a KL / AR curve
against the samples drawn), then evaluate it: AR_a', AR gain, KL(g||a'), KL(g||g'), KL(g'||g) with CIs,
Self-BLEU-2..5 and semantic similarity of samples of g' (the b-filtered draws of a': exactly the samples
the GUARD sampler returns from those draws), and the positional statistic of the constraint.
Results: results.json, results.md and figures in one folder, written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
import zlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from guard_jax import estimators as E
from guard_jax.constraints import Constraint, decode_texts
from guard_jax.evaluate import LM, draw, score
from guard_jax.io import atomic_write_json, atomic_write_text
from guard_jax.metrics.diversity import self_bleu_sets

ROOT = pathlib.Path(__file__).resolve().parent.parent
XLA_CACHE = pathlib.Path(os.environ.get("GUARD_JAX_XLA_CACHE", pathlib.Path.home() / ".cache" / "guard_jax" / "xla"))


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk ($GUARD_JAX_XLA_CACHE) so that reruns skip most compilation."""
    XLA_CACHE.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(XLA_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
DEFAULT_MODEL = ROOT / "guard_jax" / "assets" / "base_lm"


@dataclasses.dataclass(frozen=True)
class Task:
    """One conditioning context. `context`: text after BOS ("" = unconditional); `cap_prompt`: the
    constraint-aware prompt put before the context; `positions(texts) -> positions_N` in [0, 1] (NaN where
    undefined): where in each decoded continuation the constraint is met (the positional-bias statistic)."""

    name: str
    context: str
    cap_prompt: str
    constraint: Constraint
    positions: Callable[[list[str]], np.ndarray]


@dataclasses.dataclass
class Setup:
    """The base model a (model, params, tokenizer), the experiment config, and where runs are written."""

    model: object
    params: object
    tokenizer: object
    config: dict
    run_dir: pathlib.Path
    progress: bool = True

    @property
    def max_new_tokens(self) -> int:
        return int(self.config["max_new_tokens"])

    @property
    def batch_size(self) -> int:
        return int(self.config.get("batch_size", 512))

    @property
    def score_batch_size(self) -> int:
        """Teacher-forced scoring batch (gold sets are small: a smaller padded batch wastes less)."""
        return int(self.config.get("score_batch_size", 128))

    def ids(self, text: str) -> list[int]:
        """BOS followed by the tokens of `text`."""
        return [self.model.bos_id] + (self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])

    def lm(self, params, text: str) -> LM:
        prompt = jnp.asarray([self.ids(text)], jnp.int32)
        return LM(self.model, params, prompt, jnp.ones_like(prompt))

    def key(self, *names: str) -> jax.Array:
        """A key for (seed, names...): the same names give the same key in every run."""
        key = jax.random.PRNGKey(int(self.config.get("seed", 0)))
        for name in names:
            key = jax.random.fold_in(key, zlib.crc32(name.encode()))
        return key


class Gold(NamedTuple):
    """Samples of g: the b-filtered draws of a (tokens_NT, lengths_N, logp_a_N), with the draw counts."""

    tokens_NT: np.ndarray
    lengths_N: np.ndarray
    logp_a_N: np.ndarray
    accepted: int
    draws: int

    @property
    def z(self) -> E.Estimate:
        return E.estimate_ar(self.accepted, self.draws)


def draw_gold(setup: Setup, task: Task, n: int) -> Gold:
    """n draws of a (conditioned on the task's context), kept where b holds."""
    if n <= 0:
        raise ValueError(f"eval.n_a must be > 0, got {n}")
    d = draw(setup.key(task.name, "gold"), setup.lm(setup.params, task.context), n, setup.max_new_tokens, setup.batch_size,
             setup.progress, f"[{task.name}] sampling a (gold)")
    b = np.asarray(task.constraint(d.tokens_NT, d.lengths_N))
    if b.sum() < 2:
        raise ValueError(f"only {int(b.sum())} of {n:,} samples of a satisfied {task.constraint.name} in context {task.name!r}: "
                         f"raise eval.n_a (AR_a is about {b.mean():.2g}) or pick a more frequent constraint")
    return Gold(d.tokens_NT[b], d.lengths_N[b], d.logp_N[b], int(b.sum()), n)


def _est(e: E.Estimate | None) -> dict | None:
    return None if e is None else {"value": e.value, "lo": e.lo, "hi": e.hi, "level": e.level, "n": e.n}


def kl_g_a2(gold: Gold, logp_a2_G: np.ndarray) -> E.Estimate:
    """KL(g||a') from the gold samples scored by a'."""
    return E.estimate_kl_g_a2(gold.logp_a_N, logp_a2_G, gold.accepted, gold.draws)


def curve_point(setup: Setup, task: Task, gold: Gold, a2: LM, n_draws: int, key: jax.Array) -> dict:
    """KL(g||a'), AR_a' (n_draws draws) and KL(g||g') = KL(g||a') + log AR_a' of one proposal, with CIs."""
    kl = kl_g_a2(gold, score(a2, gold.tokens_NT, gold.lengths_N, setup.score_batch_size))
    d = draw(key, a2, n_draws, setup.max_new_tokens, setup.batch_size, False)
    k = int(np.asarray(task.constraint(d.tokens_NT, d.lengths_N)).sum())
    ar = E.estimate_ar(k, n_draws)
    point = {"KL(g||a2)": _est(kl), "AR_a2": _est(ar), "KL(g||g2)": None}
    if k > 0:
        var = ((kl.hi - kl.value) / 1.959963984540054) ** 2 + E.log_proportion_var(k, n_draws)
        point["KL(g||g2)"] = _est(E.normal_interval(kl.value + math.log(k / n_draws), var, 0.95, kl.n))
    return point


def evaluate(setup: Setup, task: Task, gold: Gold, a2: LM, n_a2: int, name: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """The paper's estimates for one proposal, reusing the gold draws of a.

    -> (estimates as dicts, or None where too few samples of g' were found; tokens_NT and lengths_N of
    the samples of g', i.e. the b-filtered draws of a').
    """
    d = draw(setup.key(task.name, name, "eval"), a2, n_a2, setup.max_new_tokens, setup.batch_size, setup.progress,
             f"[{task.name}] sampling a' ({name})")
    b = np.asarray(task.constraint(d.tokens_NT, d.lengths_N))
    k = int(b.sum())
    a = setup.lm(setup.params, task.context)
    logp_a2_G = score(a2, gold.tokens_NT, gold.lengths_N, setup.score_batch_size)
    z, ar = gold.z, E.estimate_ar(k, n_a2)
    out = {"Z": _est(z), "AR_a2": _est(ar), "KL(g||a2)": _est(kl_g_a2(gold, logp_a2_G)),
           "AR_gain": None, "KL(g||g2)": None, "KL(g2||g)": None}
    if k >= 1:
        var = E.log_proportion_var(gold.accepted, gold.draws) + E.log_proportion_var(k, n_a2)
        log_gain = E.normal_interval(math.log(ar.value / z.value), var, 0.95, gold.draws + n_a2)
        out["AR_gain"] = _est(E.Estimate(*(math.exp(x) for x in log_gain[:3]), 0.95, gold.draws + n_a2))
        out["KL(g||g2)"] = _est(E.estimate_kl_g_g2(gold.logp_a_N, logp_a2_G, gold.accepted, gold.draws, k, n_a2))
    if k >= 2:
        logp_a_G2 = score(a, d.tokens_NT[b], d.lengths_N[b], setup.score_batch_size)
        out["KL(g2||g)"] = _est(E.estimate_kl_g2_g(d.logp_N[b], logp_a_G2, k, n_a2, gold.accepted, gold.draws))
    return out, d.tokens_NT[b], d.lengths_N[b]


def common_set_size(counts: list[int], n_div: int, min_set: int) -> int | None:
    """The Self-BLEU set size shared by every row of one context: the fewest samples a row has (at most n_div),
    among the rows with at least min_set samples; None when no row has that many."""
    sizes = [min(n, n_div) for n in counts if n >= max(min_set, 2)]
    return min(sizes) if sizes else None


def diversity(texts: list[str], semantic: bool, set_size: int | None) -> dict:
    """Self-BLEU-2..5 on disjoint sets of `set_size` texts (`self_bleu_sets`: comparable across rows with
    different numbers of samples) and, when the optional extra is installed and `semantic`, semantic
    similarity (mean pairwise cosine of all the texts, whose expectation does not depend on their number)."""
    out: dict = {"n": len(texts), "self_bleu": None, "self_bleu_set": None, "self_bleu_note": None,
                 "semantic_similarity": None, "semantic_note": None}
    if len(texts) < 2:
        out["self_bleu_note"] = out["semantic_note"] = "fewer than 2 samples"
        return out
    if set_size is not None and len(texts) >= set_size:
        out["self_bleu"] = {str(k): v for k, v in self_bleu_sets(texts, set_size).items()}
        out["self_bleu_set"] = set_size
    else:
        out["self_bleu_note"] = f"{len(texts)} samples, fewer than eval.min_diversity_set"
    if not semantic:
        out["semantic_note"] = "disabled in the config"
        return out
    try:
        from guard_jax.metrics.semantic import semantic_similarity

        out["semantic_similarity"] = semantic_similarity(texts)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        out["semantic_note"] = f"not computed: {e}"
    return out


def describe_samples(setup: Setup, task: Task, tokens_NT, lengths_N, n_div: int) -> tuple[dict, list[str]]:
    """Positions and a few example texts of (up to n_div) samples -> (description, their texts)."""
    texts = decode_texts(setup.tokenizer, tokens_NT[:n_div], lengths_N[:n_div])
    pos = np.asarray(task.positions(texts), np.float64)
    return {"positions": [float(p) for p in pos[~np.isnan(pos)]], "examples": texts[:5]}, texts


def run_task(setup: Setup, task: Task, proposals: list[str]) -> dict:
    """Everything for one context: gold samples, each proposal built, trained and evaluated, then the
    diversity of every row at one Self-BLEU set size (`common_set_size`)."""
    from experiments.proposals import Builder

    ev = setup.config["eval"]
    t0 = time.perf_counter()
    gold = draw_gold(setup, task, int(ev["n_a"]))
    n_div = int(ev.get("n_diversity", 1000))
    gold_desc, gold_texts = describe_samples(setup, task, gold.tokens_NT, gold.lengths_N, n_div)
    result = {"name": task.name, "context": task.context, "cap_prompt": task.cap_prompt, "constraint": task.constraint.name,
              "gold": {"draws": gold.draws, "accepted": gold.accepted, "Z": _est(gold.z),
                       "KL(g||a)": _est(E.Estimate(-math.log(gold.z.value), -math.log(gold.z.hi), -math.log(max(gold.z.lo, 1e-300)), 0.95, gold.draws)),
                       **gold_desc, "seconds": time.perf_counter() - t0},
              "methods": {}}
    rows = {"gold": (result["gold"], gold_texts)}
    builder = Builder(setup, task, gold)
    for name in tqdm(proposals, desc=f"[{task.name}] proposals", unit="proposal", disable=not setup.progress):
        t1 = time.perf_counter()
        p = builder.get(name)
        t2 = time.perf_counter()
        estimates, g2_tokens, g2_lengths = evaluate(setup, task, gold, p.lm, int(ev["n_a2"]), name)
        ar = estimates["AR_a2"]["value"]
        builder.finals[name] = {"samples": p.train_samples, "step": -1, **{q: estimates[q] for q in ("KL(g||a2)", "AR_a2", "KL(g||g2)")}}
        desc, texts = describe_samples(setup, task, g2_tokens, g2_lengths, n_div)
        result["methods"][name] = {
            "train_samples": p.train_samples, "curve": p.curve, "metrics_jsonl": p.metrics_jsonl,
            "estimates": estimates, "guard_draws_per_sample": (1.0 / ar) if ar > 0 else None, **desc,
            "train_seconds": builder.seconds.get(name, t2 - t1), "eval_seconds": time.perf_counter() - t2,
        }
        rows[name] = (result["methods"][name], texts)
    set_size = common_set_size([len(t) for _, t in rows.values()], n_div, int(ev.get("min_diversity_set", 20)))
    result["self_bleu_set"] = set_size
    for row, texts in rows.values():
        row["diversity"] = diversity(texts, bool(setup.config.get("semantic", True)), set_size)
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


def results_dir(config: dict, out_root: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(out_root) / f"{config['name']}_seed{int(config.get('seed', 0))}"


def run(setup: Setup, tasks: list[Task], out: pathlib.Path, model_path: str) -> dict:
    """Run every task, write results.json, results.md and the figures to `out`; -> the results dict."""
    from experiments import figures

    t0 = time.perf_counter()
    proposals = list(setup.config["proposals"])
    contexts = [run_task(setup, task, proposals) for task in tasks]
    results = {"config": setup.config, "model": str(model_path), "contexts": contexts, "average": average(contexts),
               "seconds": time.perf_counter() - t0,
               "machine": f"{jax.devices()[0].platform}, {jax.device_count()} device(s)"}
    atomic_write_json(out / "results.json", results)
    results["figures"] = [str(p.relative_to(out)) for p in figures.make_all(out) if p.suffix == ".png"]
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    return results


def load_config(path: str | pathlib.Path, overrides: dict | None = None) -> dict:
    """A JSON config, with command-line overrides (None values are ignored)."""
    config = json.loads(pathlib.Path(path).read_text())
    for k, v in (overrides or {}).items():
        if v is not None:
            config[k] = v
    for field in ("name", "max_new_tokens", "proposals", "eval"):
        if field not in config:
            raise ValueError(f"config {path} has no {field!r} field (see experiments/configs/lexical_quick.json)")
    return config


def apply_settings(config: dict, settings: list[str]) -> dict:
    """Apply `KEY=VALUE` overrides in place: KEY is dotted into nested dicts (missing levels are created), VALUE
    is parsed as JSON when it parses (numbers, lists, true/false) and kept as a string otherwise."""
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.dpg.learning_rate=3e-4")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {name!r} is not a nested section of the config")
        node[leaf] = value
    return config


def load_model(path: str | pathlib.Path):
    """(model, params, tokenizer) of a local GPT-2/Gemma Hugging Face folder, with a clear error if missing."""
    from guard_jax.models import hf

    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no Hugging Face model folder there (config.json + model.safetensors). "
                                f"The embedded model is {DEFAULT_MODEL}; train one with `python -m experiments.pretrain_base`.")
    model, params, tokenizer = hf.load(path)
    if tokenizer is None:
        raise FileNotFoundError(f"--model {path} has no tokenizer files (tokenizer.json); text constraints need one")
    return model, params, tokenizer
