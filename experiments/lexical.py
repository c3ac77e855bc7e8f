"""The paper's lexical experiment: unconditional generation (BOS) of `max_new_tokens` tokens that must contain a
keyword with word boundaries (the paper: `\\bamazing\\b`, 30 tokens, AR_a about 0.0023 on Gemma-2B).

    python -m experiments.lexical --quick                                     # CI settings, about 3 minutes
    python -m experiments.lexical --config experiments/configs/lexical_main.json   # README's main job
    python -m experiments.lexical --config experiments/configs/lexical_full.json --model PATH --seed 1
    python -m experiments.lexical --find-keyword auto                         # words whose AR is near the target
    python -m experiments.lexical --find-keyword amazing,wonderful --find-draws 50000

Writes results/<config name>_seed<k>/: results.json (with the resolved config: every proposal's settings, the
library's defaults filled in), results.md (the tables), figures/*.png|svg, and the training runs under
runs/<context>/<proposal>/<fingerprint>/ (config.json: what it was trained with). A rerun with the same settings
resumes its runs; changed settings train afresh in another folder (see experiments/pipeline.py). A misspelled
key in the config or in a --set, or a --set that no proposal of the run reads, is an error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
from collections import Counter

import numpy as np

from experiments import pipeline
from experiments.config import LexicalConfig, load
from guard_jax import constraints as C
from guard_jax.estimators import wilson
from guard_jax.io import atomic_write_json
from guard_jax.constraints import keyword_pattern
from guard_jax.metrics.position import first_positions
from guard_jax.sampling import draw

CONFIGS = pathlib.Path(__file__).parent / "configs"
WORD = re.compile(r"\b[a-z]{4,}\b")


def tasks(setup: pipeline.Setup) -> list[pipeline.Task]:
    """One unconditional task: the constraint (default `keyword:{keyword}`), the CAP prompt with the keyword
    filled in; positions of the keyword (or of `position_regex` when the constraint is another regex)."""
    cfg = setup.config
    constraint = C.from_spec(cfg.spec(), setup.a.tokenizer)
    pattern = re.compile(cfg.position_regex) if cfg.position_regex else keyword_pattern(cfg.keyword)
    return [pipeline.Task("bos", "", cfg.cap_text(), constraint, lambda texts: first_positions(texts, pattern, "relative"), cfg.spec())]


def find_keyword(setup: pipeline.Setup, candidates: list[str] | None, draws: int, target: float, top: int = 15) -> list[dict]:
    """AR of `b = keyword:w` under a for each candidate word w, from one shared set of `draws` samples, with
    Wilson CIs; `candidates=None`: every lowercase word (4+ letters) seen in the samples, the `top` closest to
    `target` (on a log scale) first. -> rows {word, accepted, draws, ar, lo, hi}."""
    d = draw(setup.key("find-keyword"), setup.a, draws, max_new_tokens=setup.config.max_new_tokens, batch_size=setup.config.batch_size,
             progress=setup.progress, desc="sampling a (find keyword)")
    texts = setup.a.decode(d.tokens_NT, d.lengths_N)
    if candidates is None:
        counts = Counter(w for t in texts for w in set(WORD.findall(t)))
        candidates = sorted(counts, key=lambda w: abs(np.log(counts[w] / draws) - np.log(target)))[: top * 3]
    rows = []
    for w in candidates:
        pat = keyword_pattern(w)
        k = sum(pat.search(t) is not None for t in texts)
        e = wilson(k, draws)
        rows.append({"word": w, "accepted": k, "draws": draws, "ar": e.value, "lo": e.lo, "hi": e.hi})
    rows.sort(key=lambda r: abs(np.log(max(r["ar"], 1e-12)) - np.log(target)))
    return rows[:top] if top else rows


def build_setup(args, default_config: str, config_cls=LexicalConfig) -> pipeline.Setup:
    """The config (file, --seed / --model, then each --set, parsed strictly) and the base model."""
    pipeline.enable_compilation_cache()
    config_path = args.config or str(CONFIGS / (f"{default_config}_quick.json" if args.quick else f"{default_config}_full.json"))
    config = load(config_cls, config_path, args.set, {"seed": args.seed, "model": args.model})
    config = dataclasses.replace(config, model=config.model or str(pipeline.DEFAULT_MODEL))
    out = pipeline.results_dir(config, args.out)
    return pipeline.Setup(pipeline.load_model(config.model), config, out / "runs", progress=not args.quiet)


def check_settings(argv: list[str], default_config: str = "lexical", config_cls=LexicalConfig) -> list[str]:
    """What this command would refuse in its config and `--set` settings (a misspelled key, a `--set` that no
    proposal of the run reads), without running anything: the messages, [] when the config is sound.
    `experiments/sweep.py` checks every cell with it before running any."""
    args, _ = parser(__doc__).parse_known_args(argv)
    config_path = args.config or str(CONFIGS / (f"{default_config}_quick.json" if args.quick else f"{default_config}_full.json"))
    try:
        load(config_cls, config_path, args.set, {"seed": args.seed, "model": args.model})
    except ValueError as e:
        return [str(e)]
    return []


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="JSON config (default: configs/<task>_full.json, or _quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the CI settings (configs/<task>_quick.json)")
    p.add_argument("--model", default=None, help="a local GPT-2/Gemma Hugging Face folder (default: the embedded base LM)")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--out", default="results", help="results root; the run goes to OUT/<config name>_seed<k>/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, dotted into nested ones, VALUE as JSON if it parses "
                        "(e.g. --set train.dpg.learning_rate=3e-4 --set 'proposals=[\"dpg\"]'); repeatable; "
                        "an unknown key is an error")
    p.add_argument("--result", default=None, metavar="FILE",
                   help="also write the per-proposal averages (the sweep's result file) to FILE, atomically")
    return p


def print_summary(results: dict, out: pathlib.Path) -> None:
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}\n         {out / 'results.md'}")
    for f in results["figures"]:
        print(f"plot:    {out / f}")


def run_and_report(setup: pipeline.Setup, task_list, out: pathlib.Path, args) -> dict:
    """Run the experiment, print its tables and plot paths, and with --result FILE write the config, the
    per-proposal averages over contexts and the results folder to FILE (a sweep cell's result)."""
    results = pipeline.run(setup, task_list, out)
    print_summary(results, out)
    if args.result:
        atomic_write_json(args.result, {"config": results["config"], "average": results["average"], "results": str(out)})
    return results


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--find-keyword", default=None, metavar="WORDS|auto",
                   help="estimate AR_a (with CIs) of comma-separated candidate keywords, or of every sampled word with 'auto'")
    p.add_argument("--find-draws", type=int, default=20_000, help="samples of a drawn by --find-keyword")
    p.add_argument("--target-ar", type=float, default=0.0023, help="the AR --find-keyword aims at (the paper's 0.0023)")
    args = p.parse_args(argv)
    setup = build_setup(args, "lexical")
    out = pipeline.results_dir(setup.config, args.out)
    if args.find_keyword:
        words = None if args.find_keyword == "auto" else [w.strip() for w in args.find_keyword.split(",") if w.strip()]
        rows = find_keyword(setup, words, args.find_draws, args.target_ar)
        print(f"AR_a of keyword:WORD, {setup.config.max_new_tokens} new tokens, {args.find_draws:,} draws of {setup.config.model} "
              f"(target {args.target_ar}):")
        for r in rows:
            print(f"  {r['word']:>16s}  {r['ar']:.5f}  95% CI [{r['lo']:.5f}, {r['hi']:.5f}]  ({r['accepted']} / {r['draws']:,})")
        path = atomic_write_json(out / "find_keyword.json", {"model": setup.config.model, "target": args.target_ar, "rows": rows})
        print(f"written to {path}")
        return {"find_keyword": rows}
    return run_and_report(setup, tasks(setup), out, args)


if __name__ == "__main__":
    main()
