"""Data parallelism on 8 forced host devices (a subprocess, since the device count is fixed at start-up)."""

import os
import pathlib
import subprocess
import sys


def test_eight_devices_agree_with_one():
    root = pathlib.Path(__file__).parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, str(root / "tests" / "multidevice_check.py")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "multidevice ok" in out.stdout
