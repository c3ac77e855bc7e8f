#!/usr/bin/env bash
# One entry point for set-up and the common jobs. Creates ./.venv on first use (Python 3.11) and keeps
# it in sync with requirements*.txt, every version held by requirements-lock.txt (GUARD_JAX_NO_VENV=1: the `python` on PATH instead); then runs the job.
#   bash scripts/dev.sh main        the main job (README): the lexical experiment on the embedded model
#   bash scripts/dev.sh toy         GUARD on a toy ARM, every quantity exact vs Monte Carlo
#   bash scripts/dev.sh test        the default test suite (what CI runs)
#   bash scripts/dev.sh test-slow   the slow tests
#   bash scripts/dev.sh bench       all benchmarks, one JSON line each
#   bash scripts/dev.sh docs        regenerate docs/results tables from the runs in results/
#   bash scripts/dev.sh accel       on an accelerator: default tests + gemma-2b-shape benchmarks -> accel_report.json (CPU: "no accelerator", exit 0)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GUARD_JAX_NO_VENV:-}" ]; then  # GUARD_JAX_NO_VENV=1: use the `python` on PATH as it is (tests, CI images)
  PY=${PYTHON:-python3.11}
  command -v "$PY" >/dev/null || PY=python3
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  stamp=.venv/.guard_jax_installed
  want=$(cat requirements.txt requirements-test.txt requirements-lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements-test.txt -c requirements-lock.txt
    .venv/bin/python -m pip install -q --no-deps -e .
    echo "$want" > "$stamp"
  fi
  export PATH="$PWD/.venv/bin:$PATH"
fi
job=${1:-main}; shift || true
case "$job" in
  main) exec python -m experiments.lexical --config experiments/configs/lexical_main.json "$@" ;;
  toy) exec guard-jax toy "$@" ;;
  test) exec python -m pytest -m "not slow" -n 2 "$@" ;;
  test-slow) exec python -m pytest -m slow "$@" ;;
  bench) for f in bench/bench_*.py; do python -m "bench.$(basename "$f" .py)" "$@"; done ;;
  docs) exec python docs/make_docs.py "$@" ;;
  accel) exec python -m bench.accel "$@" ;;
  *) echo "unknown job '$job': use main, toy, test, test-slow, bench, docs or accel" >&2; exit 2 ;;
esac
