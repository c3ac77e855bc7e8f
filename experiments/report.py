"""The command line and the written report of the single-run experiments (`l3m_length`, `attribute_finetune`).

Each such experiment is a frozen config dataclass, `run_experiment(cfg, progress=...) -> results` and
`markdown(results, command) -> str`; `main` parses

    python -m experiments.<name> [--quick | --config FILE] [--set KEY=VALUE ...] [--out DIR] [--progress]

(the config strictly, by `guard_jax.config.load_json`: an unknown key is an error naming it), runs it and
writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable

from guard_jax.config import apply_settings, from_dict, load_json
from guard_jax.io import atomic_write_json, atomic_write_text

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


def header(title: str, command: str, results: dict) -> list[str]:
    """The first lines of a results.md: the title, and the command with the run's wall time."""
    return [f"# {title}", "", f"Command: `{command}` ({results['seconds']:.0f} s on a shared, loaded 2-core CPU).", ""]


def write(out: pathlib.Path, results: dict, markdown: str) -> None:
    """results.json and results.md under `out`, each written atomically."""
    atomic_write_json(pathlib.Path(out) / "results.json", results)
    atomic_write_text(pathlib.Path(out) / "results.md", markdown)


def main(argv, *, name: str, doc: str, config_cls: type, run_experiment: Callable[..., dict],
         markdown: Callable[[dict, str], str]) -> dict:
    """The experiment `experiments.<name>` from the command line `argv` -> its results (also written)."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the tiny configs/{name}_quick.json (the tests' run)")
    parser.add_argument("--config", type=pathlib.Path, help=f"JSON object of {config_cls.__name__} fields (the rest keep their defaults)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results") / name)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick and args.config:
        parser.error("--quick and --config both name a config: pass one")
    path = args.config or (CONFIGS / f"{name}_quick.json" if args.quick else None)
    cfg = load_json(config_cls, path, args.settings) if path else from_dict(config_cls, apply_settings({}, args.settings), "--set")
    results = run_experiment(cfg, progress=args.progress)
    command = " ".join([f"python -m experiments.{name}"] + (["--quick"] if args.quick else []) +
                       ([f"--config {args.config}"] if args.config else []) + [f"--set {s}" for s in args.settings])
    write(args.out, results, markdown(results, command))
    return results
