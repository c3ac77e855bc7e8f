"""Sweeps: every cell runs once, a killed sweep resumes without redoing finished cells, no partial files."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from experiments.sweep import main

ROOT = pathlib.Path(__file__).parent.parent


def _spec(tmp_path, sleep=0.0):
    spec = {"command": [sys.executable, str(ROOT / "tests" / "fake_cell.py"), "--sleep", str(sleep)],
            "grid": {"lr": [0.1, 0.2, 0.3], "seed": [0, 1]},
            "summary": {"x": "lr", "metrics": ["metrics.loss"]}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_sweep_runs_every_cell_and_summarises(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(_spec(tmp_path)), "--out", str(out), "--jobs", "2"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert len(rows) == 6 and {r["metrics.loss"] for r in rows} == {1.0, 2.0, 3.0, 4.0}
    assert (out / "summary.png").stat().st_size > 0 and (out / "summary.svg").exists()
    assert "| lr | seed | metrics.loss |" in (out / "summary.md").read_text()
    assert main([str(_spec(tmp_path)), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("[skipped]") == 6


def test_killed_sweep_resumes_without_redoing_cells(tmp_path):
    out, spec = tmp_path / "out", _spec(tmp_path, sleep=60)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", str(spec), "--out", str(out)], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "cells" / "lr=0.1,seed=1" / "result.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline:  # cells lr=0.1 finish, then lr=0.2 sleeps
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name: json.loads(p.read_text())["started"] for p in out.glob("cells/*/result.json")}
    assert set(done_before) == {"lr=0.1,seed=0", "lr=0.1,seed=1"}
    assert not list(out.rglob("*.tmp")), "a partial result file was left behind"
    (tmp_path / "fast").mkdir()
    assert main([str(_spec(tmp_path / "fast", sleep=0.0)), "--out", str(out)]) == 0
    after = {p.parent.name: json.loads(p.read_text())["started"] for p in out.glob("cells/*/result.json")}
    assert len(after) == 6
    assert all(after[k] == v for k, v in done_before.items()), "a finished cell was run again"
