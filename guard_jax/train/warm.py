"""Warm starts: the parameters to start a trainer from, read from a guard_jax run folder (its Orbax
checkpoints, latest or best) or from a Hugging Face model folder (config.json + safetensors).

SFT -> DPG: `params = warm.load_params(sft_run_dir, like=a.params)`, then an off-policy
`DPG(a, b, config, proposal=a.with_params(params))` started from `init_state(params)`; CAP -> DPG: the base
params with `proposal=a.with_prefix(cap_prompt)`.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from guard_jax.models.base import Params


def _checkpoint_dir(path: pathlib.Path, which: str) -> pathlib.Path:
    sub = {"latest": "checkpoints", "best": "best"}
    if which not in sub:
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    for candidate in (path / sub[which], path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return candidate
    raise FileNotFoundError(f"no Orbax checkpoint in {path} (looked for numbered steps in {path / sub[which]} and {path}); "
                            "pass a guard_jax run folder (LoopConfig.out_dir) or a Hugging Face folder with config.json")


def _like(restored: Params, like: Params, where: str) -> Params:
    want, got = jax.tree_util.tree_structure(like), jax.tree_util.tree_structure(restored)
    if want != got:
        raise ValueError(f"the params in {where} do not have the structure of `like` (another model or config?):\n"
                         f"  checkpoint: {got}\n  expected:   {want}")
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(like)):
        if x.shape != y.shape:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} in {where} has shape {x.shape}, expected {y.shape}")
    return jax.tree.map(lambda x, y: jnp.asarray(x, y.dtype), restored, like)


def load_params(path: str | pathlib.Path, like: Params | None = None, which: str = "latest") -> Params:
    """Params from a run folder's latest (or `which="best"`) Orbax checkpoint, or from a Hugging Face folder.

    `like` (a params pytree of the target model) fixes structure and dtypes and is checked against the
    checkpoint; without it the raw restored tree is returned. A Hugging Face folder is read by
    `guard_jax.models.hf.load`.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"warm-start path {path} does not exist")
    if (path / "config.json").exists():
        from guard_jax.models import hf

        _, params, _ = hf.load(path)
    else:
        ckpt = _checkpoint_dir(path, which)
        # the loop saves one metric (LoopConfig.best_metric, lower is better) with each best checkpoint
        options = ocp.CheckpointManagerOptions(best_fn=lambda m: next(iter(m.values())), best_mode="min") if which == "best" else None
        with ocp.CheckpointManager(ckpt.absolute(), options=options) as mngr:
            step = mngr.best_step() if which == "best" else mngr.latest_step()
            params = mngr.restore(step, args=ocp.args.StandardRestore())["params"]
    return params if like is None else _like(params, like, str(path))
