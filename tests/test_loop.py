"""The shared loop: exact resume after SIGKILL, NaN detection, metric files, checkpoint policies."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guard_jax.train.loop import LoopConfig, NonFiniteError, TrainState, restore_latest, run

ROOT = pathlib.Path(__file__).parent.parent


def _job(out, steps, kill_after=None):
    args = [sys.executable, str(ROOT / "tests" / "resume_job.py"), str(out), str(steps)]
    args += ["--kill-after", str(kill_after)] if kill_after is not None else []
    return subprocess.run(args, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_bit_identical(tmp_path):
    straight = _job(tmp_path / "straight", 8)
    assert straight.returncode == 0, straight.stderr
    killed = _job(tmp_path / "resumed", 8, kill_after=3)
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    assert not (tmp_path / "resumed" / "final.npz").exists()
    resumed = _job(tmp_path / "resumed", 8)
    assert resumed.returncode == 0, resumed.stderr
    a, b = np.load(tmp_path / "straight" / "final.npz"), np.load(tmp_path / "resumed" / "final.npz")
    assert len(a.files) == len(b.files) > 0
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:4] == [0, 1, 2, 3] and steps[-1] == 7  # steps after the checkpoint were redone, none skipped


class _Counter:
    """A toy trainer: params drift by a key-dependent amount; optionally emits NaN at one step."""

    def __init__(self, nan_at=None):
        self.nan_at = nan_at

    def init_state(self, params):
        return TrainState(jnp.asarray(0, jnp.int32), params, {}, {})

    def step(self, state, key):
        params = {"w": state.params["w"] + jax.random.normal(key, (3,))}
        loss = jnp.sum(params["w"] ** 2)
        if self.nan_at is not None and int(state.step) == self.nan_at:
            loss = jnp.asarray(jnp.nan)
        return TrainState(state.step + 1, params, state.opt_state, state.extra), {"loss": loss, "kl_g_pi": -float(state.step)}


def test_nan_stops_with_the_step_and_quantity(tmp_path):
    trainer = _Counter(nan_at=4)
    with pytest.raises(NonFiniteError, match="step 4: loss is nan"):
        run(trainer, trainer.init_state({"w": jnp.zeros(3)}), LoopConfig(steps=10, progress=False))
    bad = TrainState(jnp.asarray(0, jnp.int32), {"w": jnp.asarray([0.0, jnp.inf, 0.0])}, {}, {})

    class Identity(_Counter):
        def step(self, state, key):
            return TrainState(state.step + 1, state.params, {}, {}), {"loss": 0.0}

    with pytest.raises(NonFiniteError, match=r"parameters \['w'\]"):
        run(Identity(), bad, LoopConfig(steps=2, progress=False))


def test_metrics_files_and_checkpoint_policies(tmp_path):
    trainer = _Counter()
    config = LoopConfig(steps=6, out_dir=tmp_path, checkpoint_every=1, keep_last=2, best_metric="kl_g_pi", keep_best=1, progress=False)
    state, history = run(trainer, trainer.init_state({"w": jnp.zeros(3)}), config)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(6))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [5, 6]
    assert [int(p.name) for p in (tmp_path / "best").iterdir() if p.name.isdigit()] == [6]  # kl_g_pi falls each step
    restored = restore_latest(tmp_path, state)
    assert int(restored.step) == 6
    np.testing.assert_array_equal(restored.params["w"], state.params["w"])
    # a finished run resumed is a no-op
    again, more = run(trainer, trainer.init_state({"w": jnp.zeros(3)}), config)
    assert more == [] and int(again.step) == 6


def test_bad_loop_config():
    with pytest.raises(ValueError, match="steps"):
        LoopConfig(steps=0)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_between_checkpoints_writes_each_step_once(tmp_path):
    class DiesAt(_Counter):
        def __init__(self, die_at):
            super().__init__()
            self.die_at = die_at

        def step(self, state, key):
            if int(state.step) == self.die_at:
                raise _Killed
            return super().step(state, key)

    config = LoopConfig(steps=30, out_dir=tmp_path, checkpoint_every=10, progress=False)
    with pytest.raises(_Killed):  # killed at step 12: steps 10 and 11 are in metrics.jsonl, the checkpoint is at 10
        run(DiesAt(12), DiesAt(12).init_state({"w": jnp.zeros(3)}), config)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "lo')  # a line torn by the kill
    stray = [tmp_path / ".metrics.json.k3j2.tmp", tmp_path / ".export.x1.tmp"]
    stray[0].write_text("half a file")
    stray[1].mkdir()
    state, history = run(_Counter(), _Counter().init_state({"w": jnp.zeros(3)}), config)
    assert [h["step"] for h in history] == list(range(10, 30))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(30))
    assert not any(p.exists() for p in stray) and not list(tmp_path.glob(".*.tmp"))
    straight, _ = run(_Counter(), _Counter().init_state({"w": jnp.zeros(3)}), LoopConfig(steps=30, progress=False))
    np.testing.assert_array_equal(state.params["w"], straight.params["w"])
