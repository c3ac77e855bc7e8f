"""Regenerate the results tables of docs/results/*.md from the experiments' results.json files.

    python docs/make_docs.py                       # every marked table whose run exists under results/
    python docs/make_docs.py --results DIR --check # exit 1 if a page would change (nothing written)

A table in a page sits between two markers,

    <!-- table: lexical_main_seed0 0 -->            (the run folder under --results, then a context index
    | proposal | train samples | ... |             or "average" for the mean over a run's contexts)
    <!-- /table -->

and is rewritten from `<results>/<run>/results.json` when that file exists (runs that are absent are
listed and their tables left as they are). Only the tables are rewritten: reread the prose around a
table after regenerating it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
MARKER = re.compile(r"^<!-- table: (?P<run>\S+) (?P<which>\d+|average) -->\n(?P<body>.*?)^<!-- /table -->$", re.M | re.S)
QUANTITIES = ("AR_a2", "AR_gain", "KL(g||a2)", "KL(g||g2)", "KL(g2||g)")
HEADER = ("| proposal | train samples | AR_a' | AR gain | KL(g‖a') | KL(g‖g') | KL(g'‖g) | n | SB-2 | SB-3 | SB-4 | SB-5 | sem. sim. |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
AVERAGE_HEADER = "| proposal | AR_a' | AR gain | KL(g‖a') | KL(g‖g') | KL(g'‖g) |\n|---|---|---|---|---|---|"


def _estimate(e: dict | None, digits: int = 3) -> str:
    """value [lo, hi] with 3 significant digits; n/a for a missing estimate."""
    return "n/a" if e is None else f"{e['value']:.{digits}g} [{e['lo']:.{digits}g}, {e['hi']:.{digits}g}]"


def _diversity(d: dict) -> list[str]:
    """n, Self-BLEU-2..5 and semantic similarity of one row's samples."""
    sb = d["diversity"]["self_bleu"] or {}
    sem = d["diversity"]["semantic_similarity"]
    return [f"{d['diversity']['n']:,}"] + [f"{sb[k]:.3f}" if k in sb else "n/a" for k in ("2", "3", "4", "5")] + \
        [f"{sem:.3f}" if sem is not None else "n/a"]


def _ordered(names, config: dict) -> list[str]:
    """The proposals in the config's order (results.json stores them sorted by name), then any others."""
    listed = [n for n in config.get("proposals", []) if n in names]
    return listed + sorted(set(names) - set(listed))


def context_table(context: dict, config: dict) -> str:
    """The table of one context of a results.json: gold g, then one row per proposal in the config's order."""
    lines = [HEADER, "| gold g | – | – | – | – | – | – | " + " | ".join(_diversity(context["gold"])) + " |"]
    for name in _ordered(context["methods"], config):
        m = context["methods"][name]
        cells = [_estimate(m["estimates"][q]) for q in QUANTITIES]
        lines.append(f"| {name} | {m['train_samples']:,} | " + " | ".join(cells + _diversity(m)) + " |")
    return "\n".join(lines)


def average_table(results: dict) -> str:
    """The mean of each estimate over a run's contexts (results.json's "average")."""
    lines = [AVERAGE_HEADER]
    for name in _ordered([n for n in results["average"] if n != "_Z"], results.get("config", {})):
        row = results["average"][name]
        lines.append(f"| {name} | " + " | ".join("n/a" if row[q] is None else f"{row[q]:.3g}" for q in QUANTITIES) + " |")
    return "\n".join(lines)


def table(results: dict, which: str) -> str:
    """The table a marker names: a context index or "average"."""
    if which == "average":
        return average_table(results)
    contexts = results["contexts"]
    if int(which) >= len(contexts):
        raise ValueError(f"the marker asks for context {which} but the run has {len(contexts)}: fix the marker")
    return context_table(contexts[int(which)], results.get("config", {}))


def regenerate(text: str, results_root: pathlib.Path) -> tuple[str, list[str], list[str]]:
    """-> (the page with every table whose run exists rewritten, runs used, runs missing)."""
    used, missing = [], []

    def replace(m: re.Match) -> str:
        path = results_root / m["run"] / "results.json"
        if not path.is_file():
            missing.append(m["run"])
            return m[0]
        used.append(m["run"])
        return f"<!-- table: {m['run']} {m['which']} -->\n{table(json.loads(path.read_text()), m['which'])}\n<!-- /table -->"

    return MARKER.sub(replace, text), sorted(set(used)), sorted(set(missing))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(DOCS.parent / "results"), help="the folder holding the runs (default: results/)")
    p.add_argument("--pages", nargs="*", default=None, help="the pages to regenerate (default: docs/results/*.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page would change")
    args = p.parse_args(argv)
    pages = [pathlib.Path(x) for x in args.pages] if args.pages is not None else sorted((DOCS / "results").glob("*.md"))
    changed = []
    for page in pages:
        before = page.read_text()
        after, used, missing = regenerate(before, pathlib.Path(args.results))
        print(f"{page}: regenerated from {', '.join(used) or 'no run'}" + (f"; not found: {', '.join(missing)}" if missing else ""))
        if after != before:
            changed.append(page)
            if not args.check:
                page.write_text(after)
    if args.check and changed:
        print("would change: " + ", ".join(map(str, changed)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
