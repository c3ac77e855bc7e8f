"""Hyperparameter sweeps: a grid of cells, each one process writing one results JSON, resumable.

    python experiments/sweep.py experiments/configs/toy_sweep.json --out results/sweeps/toy [--jobs 2]

The spec (JSON) names the command, the grid and what to summarise:

    {"command": ["python", "-m", "guard_jax.cli", "toy", "--quiet"],   # + --name value ... --out FILE
     "grid": {"beta": [0.2, 0.5], "seed": [0, 1]},
     "summary": {"x": "beta", "metrics": ["exact.KL(g||a2)", "monte_carlo.KL(g||a2).value"]}}

Optional spec fields: `"set_flag": "--set"` passes each cell's parameters as `--set name=value` (dotted names
reach nested config fields, e.g. `train.dpg.learning_rate`) instead of `--name value`; `"out_flag"` names the flag
that receives the cell's result file (default `--out`); `{cell_dir}` in the command is replaced by the cell's
own folder (e.g. as the results root of an experiment, so cells never share checkpoints). See
`experiments/configs/lexical_sweep.json`. Before running anything, a `--set` sweep of an experiment module with
`check_settings` (experiments.lexical, experiments.sentiment) checks every cell's settings: a grid key that some
cell does not read (e.g. `train.dpg.learning_rate` in a cell that never trains dpg) or a misspelled one refuses
the sweep.

A cell is done when its `result.json` exists (commands must write it atomically, as every guard_jax command
does); done cells are skipped, so a killed sweep resumes where it stopped. The summary (`summary.md`,
`summary.json`, `summary.png`/`.svg`: mean ± std over the other parameters, e.g. seeds) is rebuilt from the
cells' files alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import itertools
import json
import pathlib
import subprocess
import sys

import numpy as np

from guard_jax.io import atomic_write_json, atomic_write_text


def cells(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid, in a fixed order."""
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ValueError(f"grid must map each parameter to a non-empty list of values, got {grid!r}")
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def cell_name(cell: dict) -> str:
    show = lambda v: "+".join(map(str, v)) if isinstance(v, list) else str(v)
    return ",".join(f"{k}={show(v)}" for k, v in cell.items()).replace("/", "_")


def cell_command(spec: dict, cell: dict, result: pathlib.Path) -> list[str]:
    args = [str(x).replace("{cell_dir}", str(result.parent)) for x in spec["command"]]
    if args[0] == "python":  # the interpreter running the sweep (its virtual environment)
        args[0] = sys.executable
    set_flag = spec.get("set_flag")
    for k, v in cell.items():
        if set_flag:
            args += [set_flag, f"{k}={json.dumps(v)}"]
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args += [flag] if v else []
        else:
            args += [flag, str(v)]
    return args + [spec.get("out_flag", "--out"), str(result)]


def unread_keys(spec: dict, todo: list[dict]) -> list[str]:
    """Grid settings some cell would not read, or would refuse: for a `set_flag` spec whose command runs
    `python -m MODULE` and MODULE has `check_settings(argv) -> messages` (experiments.lexical, .sentiment),
    each cell's arguments are checked in this process, before any cell runs. -> "cell: message" lines."""
    cmd = [str(x) for x in spec["command"]]
    if not spec.get("set_flag") or "-m" not in cmd:
        return []
    module = importlib.import_module(cmd[cmd.index("-m") + 1])
    check = getattr(module, "check_settings", None)
    if check is None:
        return []
    out = []
    for cell in todo:
        argv = cell_command(spec, cell, pathlib.Path("result.json"))[cmd.index("-m") + 2 :]
        out += [f"{cell_name(cell)}: {m}" for m in check(argv)]
    return out


def run_cell(spec: dict, cell: dict, out: pathlib.Path) -> tuple[str, str]:
    """Run one cell unless its result exists. -> (cell name, "done" | "skipped" | "failed: ...")."""
    name = cell_name(cell)
    folder = out / "cells" / name
    result = folder / "result.json"
    if result.exists():
        return name, "skipped"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.run(cell_command(spec, cell, result), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result.exists():
        return name, f"failed (exit {proc.returncode}; see {folder / 'log.txt'})"
    return name, "done"


def lookup(obj, dotted: str):
    """`a.b.c` into nested dicts; keys may contain dots only if they are whole keys at that level."""
    if dotted in obj:
        return obj[dotted]
    head, _, rest = dotted.partition(".")
    while head not in obj and rest:
        nxt, _, rest = rest.partition(".")
        head = f"{head}.{nxt}"
    return lookup(obj[head], rest) if rest else obj[head]


def _lookup_or_none(obj, dotted: str):
    """A metric a cell does not report (e.g. a proposal it did not train) is None in the summary."""
    try:
        return lookup(obj, dotted)
    except (KeyError, TypeError):
        return None


def summarise(spec: dict, out: pathlib.Path) -> dict:
    """Summary table and plot from the cells' result files (no re-running)."""
    summary = spec.get("summary", {})
    metrics, x = summary.get("metrics", []), summary.get("x")
    rows = []
    for cell in cells(spec["grid"]):
        result = out / "cells" / cell_name(cell) / "result.json"
        if result.exists():
            data = json.loads(result.read_text())
            rows.append({**cell, **{m: _lookup_or_none(data, m) for m in metrics}})
    header = list(spec["grid"]) + metrics
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "n/a" if v is None else "+".join(map(str, v)) if isinstance(v, list) else str(v)
    lines += ["| " + " | ".join(fmt(r[h]) for h in header) + " |" for r in rows]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "summary.json", rows)
    if x and metrics and rows:
        _plot(rows, x, metrics, out)
    return {"rows": rows, "table": "\n".join(lines)}


def _plot(rows: list[dict], x: str, metrics: list[str], out: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    from guard_jax.plots import save_figure

    xs = sorted({r[x] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = [[r[m] for r in rows if r[x] == v and r[m] is not None] or [np.nan] for v in xs]
        mean, std = np.array([np.mean(v) for v in vals]), np.array([np.std(v) for v in vals])
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3)
        ax.set_xlabel(x)
        ax.set_title(m, fontsize=9)
    save_figure(fig, out / "summary")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=pathlib.Path, help="sweep spec (JSON)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for the cells and the summary")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    spec = json.loads(args.spec.read_text())
    for key in ("command", "grid"):
        if key not in spec:
            raise ValueError(f"sweep spec {args.spec} has no {key!r}")
    todo = cells(spec["grid"])
    problems = unread_keys(spec, todo)
    if problems:
        raise ValueError(f"sweep spec {args.spec}: {len(problems)} cell(s) would not read or would refuse their grid settings "
                         f"(a grid key every cell must read; split the sweep or drop the key):\n  " + "\n  ".join(problems))
    failed = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for name, status in pool.map(lambda c: run_cell(spec, c, args.out), todo):
            print(f"[{status}] {name}", flush=True)
            failed += [name] if status.startswith("failed") else []
    print(summarise(spec, args.out)["table"])
    print(f"summary: {args.out / 'summary.md'}, {args.out / 'summary.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
