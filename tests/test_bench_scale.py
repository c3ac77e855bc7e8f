"""The memory plan and the accelerator report run as a user runs them (no numbers asserted beyond their sense)."""

import json
import subprocess
import sys


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
    """What `bash scripts/dev.sh accel` runs (its case line, checked here; dev.sh itself first builds a venv)."""
    assert 'accel) exec python -m bench.accel "$@" ;;' in open("scripts/dev.sh").read()
    path = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "bench.accel", "--out", str(path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(path.read_text())
    assert report["accelerator"] is None and report["status"] == "no accelerator"
