"""The one training loop every trainer (SFT, DPG, L3M, aux, RL) runs through.

A trainer is an object with
- `init_state(params) -> TrainState`: the state at step 0 from initial params;
- `step(state, key) -> (state, metrics)`: one update; `metrics` maps names to scalars.

The loop derives the key of step s as `fold_in(PRNGKey(seed), s)`, so a run resumed from its checkpoint
at step s replays steps s, s+1, ... exactly: a run killed at any point and resumed ends bit-identical to an
uninterrupted one. It writes each step's metrics to `metrics.jsonl` and TensorBoard (once per step, also
after a kill and resume: later lines are dropped at start), removes stray temporary files of atomic writes
killed midway (`.NAME.*.tmp` in out_dir), shows a progress bar,
stops with `NonFiniteError` naming the step and quantity at the first NaN/Inf, and keeps Orbax checkpoints
(the last k for resuming; optionally the best k by a metric in `best/`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from guard_jax.io import atomic_write_text, remove_stale_temporaries
from guard_jax.sampling import NonFiniteError


class TrainState(NamedTuple):
    """step (int32 scalar), params, optimizer state, and trainer-specific state (e.g. log Z-hat, proposal)."""

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any


class Trainer(Protocol):
    def init_state(self, params) -> TrainState: ...

    def step(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """steps: total updates; out_dir: checkpoints, metrics.jsonl and TensorBoard events (None: no files)."""

    steps: int
    out_dir: str | pathlib.Path | None = None
    seed: int = 0
    checkpoint_every: int = 50
    keep_last: int = 2
    best_metric: str | None = None  # e.g. "kl_g_pi": also keep the best checkpoints (lowest) in out_dir/best
    keep_best: int = 1
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "keep_last", "keep_best"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def check_finite(step: int, metrics: dict[str, float], state: TrainState | None = None) -> None:
    """Raise NonFiniteError at the first NaN/Inf metric or parameter."""
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"step {step}: {name} is {value}; stopping (lower the learning rate, check the data, or resume from the last checkpoint)")
    if state is not None and not bool(_all_finite(state.params)):
        bad = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(state.params) if not bool(_all_finite(leaf))]
        raise NonFiniteError(f"step {step}: parameters {', '.join(bad[:5])} hold NaN/Inf; stopping")


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def rewind_metrics(path: pathlib.Path, start: int) -> None:
    """Keep only the lines of steps < `start` in a metrics JSONL file (atomically).

    A run resumed from its checkpoint at `start` writes steps start, start+1, ... again; without this, the
    steps run after the last checkpoint and before a kill would appear twice. A torn last line (a kill
    mid-write) is dropped too.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if step < start:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class _Logs:
    def __init__(self, out_dir: pathlib.Path | None, tensorboard: bool, start: int):
        self.jsonl = self.tb = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out_dir)
            rewind_metrics(out_dir / "metrics.jsonl", start)
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                # purge_step hides the events of steps >= start written before a kill
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start if start > 0 else None)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _manager(path: pathlib.Path, keep: int, best_metric: str | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode="min",
        keep_checkpoints_without_metrics=False if best_metric else True,
        cleanup_tmp_directories=True,  # a checkpoint half-written when a run was killed
    )
    return ocp.CheckpointManager(path.absolute(), options=options)


def restore_latest(out_dir: str | pathlib.Path, like: TrainState) -> TrainState | None:
    """The latest checkpoint in `out_dir/checkpoints`, shaped like `like`, or None if there is none."""
    path = pathlib.Path(out_dir) / "checkpoints"
    if not path.exists():
        return None
    mngr = _manager(path, keep=1_000_000)
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    mngr.close()
    return TrainState(*restored)


def run(trainer: Trainer, state: TrainState, config: LoopConfig) -> tuple[TrainState, list[dict]]:
    """Run `trainer` from `state` (or from the latest checkpoint in config.out_dir) to config.steps.

    -> (final state, the metrics of the steps run in this call).
    """
    out = pathlib.Path(config.out_dir) if config.out_dir is not None else None
    if out is not None:
        resumed = restore_latest(out, state)
        state = resumed if resumed is not None else state
    start = int(state.step)
    logs = _Logs(out, config.tensorboard, start)
    ckpt = _manager(out / "checkpoints", config.keep_last) if out is not None else None
    best = _manager(out / "best", config.keep_best, config.best_metric) if out is not None and config.best_metric else None
    history = []
    bar = tqdm(total=config.steps, initial=start, desc="training", unit="step", disable=not config.progress)
    try:
        for s in range(start, config.steps):
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, step_key(config.seed, s))
            metrics = _scalars(metrics)
            metrics["seconds"] = time.perf_counter() - t0
            if "samples" in metrics:
                metrics["samples_per_s"] = metrics["samples"] / metrics["seconds"]
            check_finite(s, metrics, state)
            logs.write(s, metrics)
            history.append({"step": s, **metrics})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]})
            done = s + 1
            if ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                ckpt.save(done, args=ocp.args.StandardSave(state))
                if best is not None and config.best_metric in metrics:
                    best.save(done, args=ocp.args.StandardSave(state), metrics={config.best_metric: metrics[config.best_metric]})
    finally:
        bar.close()
        logs.close()
        for m in (ckpt, best):
            if m is not None:
                m.wait_until_finished()
                m.close()
    return state, history
