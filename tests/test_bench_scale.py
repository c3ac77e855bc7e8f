"""The memory plan and the accelerator report run as a user runs them (no numbers asserted beyond their sense)."""

import json
import os
import pathlib
import subprocess
import sys

from bench import bench_scale


def test_bench_scale_quick_reports_per_device_bytes():
    out = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--quick"], capture_output=True, text=True,
                         timeout=1200, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["case"], r["devices"]) for r in rows] == [("dpg_update", 8), ("sft_step", 8), ("sampler", 1)]
    for r in rows:
        assert r["total_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"] > 0
    dpg = rows[0]
    # the donated state is aliased: the outputs reuse the arguments' params and Adam buffers
    assert dpg["alias_bytes"] > 0
    # per device on 1x8, the sharded params + Adam moments (fp32: 12 bytes/param) are well under one replica
    assert dpg["argument_bytes"] < 12 * dpg["params"] / 2


def test_accel_on_cpu_reports_no_accelerator(tmp_path):
    """`bash scripts/dev.sh accel` itself (with this test's python: GUARD_JAX_NO_VENV) on a CPU-only JAX: no
    accelerator, exit 0, one JSON report."""
    path = tmp_path / "report.json"
    env = dict(os.environ, GUARD_JAX_NO_VENV="1", JAX_PLATFORMS="cpu", PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "scripts/dev.sh", "accel", "--out", str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(path.read_text())
    assert report["accelerator"] is None and report["status"] == "no accelerator"


def test_goals_are_judged_on_the_best_matching_row():
    """The plan's goal lines: the smallest total among the rows of the goal's model/case/tuning/devices
    (and batch, where the goal fixes it), met against its limit; None without a row."""
    GiB = bench_scale.GiB
    row = lambda case, devices, batch, gib, remat=True, tuning="full": {
        "model": "gemma-2b", "case": case, "tuning": tuning, "devices": devices, "batch": batch, "remat": remat,
        "total_bytes": int(gib * GiB), "total_gib": gib}
    rows = [row("dpg_update", 8, 504, 45.0), row("dpg_update", 8, 80, 15.7), row("dpg_update", 1, 40, 3.0),
            row("sampler", 1, 500, 16.3), row("sampler", 1, 250, 10.0)]
    full, lora, sampler = bench_scale.goal_lines(rows)
    assert (full["met"], full["best_batch"], full["best_gib"]) == (True, 80, 15.7)
    assert lora["met"] is None and lora["rows"] == []
    assert (sampler["met"], sampler["best_batch"]) == (False, 500)  # the goal fixes batch 500
