"""Data and FSDP parallelism on 8 forced host devices (a subprocess, since the device count is fixed at start-up)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def _check(*meshes: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_check.py"), *meshes], capture_output=True,
                         text=True, env=env, timeout=3000)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "multidevice ok" in out.stdout


@pytest.mark.parametrize("parts", ["driver,sft,l3m", "dpg,dpg_off", "aux,rl"])
def test_eight_devices_agree_with_one(parts):
    """On the 2x4 data x model mesh, a tiny GPT-2: draw / score / guard_sample and one step of every trainer
    (SFT, DPG on- and off-policy, L3M, aux, RL) equal one device, params and Adam moments sharded by the rules;
    in three parts (each its own 8-device subprocess), so no part runs much over a minute on 2 cores."""
    _check("2x4", "--only", parts)


@pytest.mark.slow
def test_every_mesh_agrees_with_one():
    """The same on 8x1, 4x2 and 2x4, plus sample_sharded / sample_pmap / log_prob_sharded on the 1-D data mesh
    and two DPG steps of two minibatches."""
    _check("8x1,4x2,2x4", "--full")
