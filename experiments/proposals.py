"""Proposals a' by name: a registry that the experiments read, so new proposals plug in without edits.

    @register("my_method")
    def my_method(b: Builder, hp: dict) -> Proposal: ...

`hp` is `config["train"][name]` (may be empty). A proposal registered with `param=` also answers to `name:VALUE`
(e.g. `rl:0.2`): hp is `config["train"][name]` updated by `config["train"]["name:VALUE"]` and {param: float(VALUE)},
and the builder gets the full name as `hp["name"]` (its run folder). A builder may ask `b.get(other)` for a proposal it warm-starts
from (built once, cached). Each trainer runs in `run_dir/<context>/<name>/` (Orbax checkpoints, the loop's
metrics.jsonl, curve.json): rerunning an experiment resumes its training. Every proposal reports the number of
samples drawn for its training (warm starts included) and its curve: KL(g||a'), AR_a', KL(g||g') against
the samples drawn so far, evaluated on the shared gold samples (issue 9's sample-efficiency and Pareto figures).
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from experiments.pipeline import Gold, Setup, Task, curve_point
from guard_jax.evaluate import LM, draw
from guard_jax.io import atomic_write_json
from guard_jax.train.dpg import DPG, DPGConfig
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.sft import SFT


class Proposal(NamedTuple):
    """a' as an LM (model, params, prompt); samples drawn to train it; its curve; its trainer's metrics file."""

    lm: LM
    train_samples: int
    curve: list[dict]
    metrics_jsonl: str | None


PROPOSALS: dict[str, Callable] = {}
PARAMETRISED: dict[str, str] = {}  # name -> the hp key a `name:VALUE` suffix sets
_OPTIMIZERS: dict = {}


def _share_optimizer(trainer, learning_rate: float, warmup_steps: int):
    """Give trainers with the same Adam settings one optimizer object: their jitted update takes it as a static
    argument, so sharing it compiles the update once instead of once per trainer (same maths)."""
    trainer.optimizer = _OPTIMIZERS.setdefault((type(trainer).__name__, learning_rate, warmup_steps), trainer.optimizer)
    return trainer


def register(name: str, param: str | None = None):
    """Register a builder; with `param`, `name:VALUE` names the same builder with hp[param] = float(VALUE)."""
    if ":" in name:
        raise ValueError(f"proposal name {name!r} must not contain ':' (it separates a parameter value)")

    def deco(fn):
        if name in PROPOSALS:
            raise ValueError(f"proposal {name!r} is registered twice")
        PROPOSALS[name] = fn
        if param is not None:
            PARAMETRISED[name] = param
        return fn

    return deco


class Builder:
    """Builds proposals for one task on demand, caching them (warm starts reuse their source)."""

    def __init__(self, setup: Setup, task: Task, gold: Gold):
        self.setup, self.task, self.gold = setup, task, gold
        self.cache: dict[str, Proposal] = {}
        self.seconds: dict[str, float] = {}
        self.finals: dict[str, dict] = {}  # name -> the curve point of its full evaluation (set by pipeline.run_task)
        self.extra: dict[str, object] = {}  # what builders share besides proposals (a trained aux state, a token automaton)

    def get(self, name: str) -> Proposal:
        if name not in self.cache:
            base, sep, value = name.partition(":")
            if base not in PROPOSALS or (sep and base not in PARAMETRISED):
                raise ValueError(f"unknown proposal {name!r} in config 'proposals'; registered: {', '.join(sorted(PROPOSALS))}"
                                 f" (with a ':VALUE' suffix: {', '.join(sorted(PARAMETRISED)) or 'none'})")
            train = self.setup.config.get("train", {})
            hp = dict(train.get(base, {}))
            if sep:
                try:
                    hp |= {**train.get(name, {}), PARAMETRISED[base]: float(value), "name": name}
                except ValueError:
                    raise ValueError(f"proposal {name!r}: the value after ':' must be a number ({PARAMETRISED[base]})") from None
            t0 = time.perf_counter()
            self.cache[name] = PROPOSALS[base](self, hp)
            self.seconds[name] = time.perf_counter() - t0
        return self.cache[name]

    def final(self, name: str) -> dict:
        """The curve point of a built proposal at its full budget: its full evaluation if done, else a curve point."""
        if name not in self.finals:
            p = self.get(name)
            self.finals[name] = self.point(p.lm, p.train_samples, -1, name)
        return self.finals[name]

    def run_dir(self, name: str) -> pathlib.Path:
        return self.setup.run_dir / self.task.name / name.replace(":", "=")

    def point(self, lm: LM, samples: int, step: int, tag: str) -> dict:
        n = int(self.setup.config["eval"].get("n_curve", 2000))
        return {"samples": int(samples), "step": int(step),
                **curve_point(self.setup, self.task, self.gold, lm, n, self.setup.key(self.task.name, tag, "curve", str(step)))}

    def train(self, name: str, trainer, params, steps: int, eval_points: int, samples_at: Callable[[int], int],
              lm_of: Callable[[object], LM], start: dict | None = None, seed: int = 0) -> tuple[object, list[dict]]:
        """Run `trainer` from `params` for `steps` updates in `eval_points` chunks, adding a curve point after each
        but the last (the full evaluation of the trained proposal ends the curve, see `final`).

        `start`: the curve point before training (computed if None). Resumes from the run folder's checkpoints and
        curve.json. -> (final params, curve).
        """
        if steps < 1:
            raise ValueError(f"train.{name}.steps must be >= 1, got {steps}")
        out = self.run_dir(name)
        curve_file = out / "curve.json"
        curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
        if not curve:
            curve = [start if start is not None else self.point(lm_of(params), samples_at(0), 0, name)]
            atomic_write_json(curve_file, curve)
        targets = sorted({max(1, round(steps * (i + 1) / max(1, eval_points))) for i in range(max(1, eval_points))} | {steps})
        state = trainer.init_state(params)
        loop = dict(out_dir=out, seed=seed, checkpoint_every=10**9, keep_last=1, progress=self.setup.progress, tensorboard=False)
        for target in targets:
            state, _ = run(trainer, state, LoopConfig(steps=target, **loop))
            if target == steps or any(p["step"] == target for p in curve):
                continue  # the final point is the proposal's full evaluation (pipeline.run_task)
            curve.append(self.point(lm_of(state.params), samples_at(target), target, name))
            atomic_write_json(curve_file, curve)
        return state.params, curve


def _filtered_draws(b: Builder, lm: LM, n: int, tag: str) -> tuple[np.ndarray, np.ndarray, int]:
    """n draws of `lm` kept where b holds: (tokens_NT, lengths_N, number kept)."""
    s = b.setup
    d = draw(s.key(b.task.name, tag, "train-draws"), lm, n, s.max_new_tokens, s.batch_size, s.progress, f"[{b.task.name}] sampling for {tag}")
    keep = np.asarray(b.task.constraint(d.tokens_NT, d.lengths_N))
    return d.tokens_NT[keep], d.lengths_N[keep], int(keep.sum())


def _sft(b: Builder, name: str, hp: dict, source: LM | None, data: tuple | None = None) -> Proposal:
    """SFT of a (no prompt: the task's context) on the b-filtered draws of `source`, one pass by default;
    or on `data` = (tokens_NT, lengths_N, kept, draws) drawn otherwise (ASAp)."""
    s = b.setup
    if data is None:
        draws = int(hp.get("draws", 100_000))
        tokens, lengths, kept = _filtered_draws(b, source, draws, name)
    else:
        tokens, lengths, kept, draws = data
    batch = int(hp.get("batch_size", 16))
    if kept < batch:
        raise ValueError(f"{name}: only {kept} of {draws:,} draws satisfied the constraint, fewer than train.{name}.batch_size={batch}; "
                         f"raise train.{name}.draws or lower batch_size")
    lr, warmup = float(hp.get("learning_rate", 1e-3)), int(hp.get("warmup_steps", 0))
    trainer = _share_optimizer(SFT(s.model, tokens, lengths, batch_size=batch, learning_rate=lr, context=s.ids(b.task.context),
                                   seed=int(s.config.get("seed", 0)), warmup_steps=warmup), lr, warmup)
    steps = max(1, round(float(hp.get("epochs", 1.0)) * trainer.steps_per_epoch))

    def samples_at(step):  # draws needed to collect the examples seen so far (one pass = all the draws)
        return min(draws, math.ceil(step * batch * draws / kept))

    params, curve = b.train(name, trainer, s.params, steps, int(hp.get("eval_points", 3)), samples_at,
                            lambda p: s.lm(p, b.task.context), start=_base_point(b), seed=int(s.config.get("seed", 0)))
    return Proposal(s.lm(params, b.task.context), draws, curve, str(b.run_dir(name) / "metrics.jsonl"))


def _base_point(b: Builder) -> dict:
    """The curve point of a itself (no training): KL(g||a) = -log Z, AR = Z, KL(g||g) = 0."""
    z = b.gold.z
    kl = {"value": -math.log(z.value), "lo": -math.log(z.hi), "hi": -math.log(max(z.lo, 1e-300)), "level": z.level, "n": z.n}
    return {"samples": 0, "step": 0, "KL(g||a2)": kl, "AR_a2": z._asdict(), "KL(g||g2)": {"value": 0.0, "lo": 0.0, "hi": 0.0, "level": z.level, "n": z.n}}


def _dpg(b: Builder, name: str, hp: dict, init_params, offset: int, start: dict | None, proposal_params=None,
         proposal_text: str | None = None) -> Proposal:
    """DPG from `init_params`: on-policy, or off-policy with a frozen proposal (other params and/or a CAP prompt)."""
    s = b.setup
    off = proposal_params is not None or proposal_text is not None
    cfg = DPGConfig(n_samples=int(hp.get("n_samples", 2048)), minibatch=int(hp.get("minibatch", 256)), max_new_tokens=s.max_new_tokens,
                    learning_rate=float(hp.get("learning_rate", 1e-4)), warmup_steps=int(hp.get("warmup_steps", 0)),
                    on_policy=not off, swap_every=int(hp.get("swap_every", 1)))
    trainer = _share_optimizer(DPG(s.model, s.params, b.task.constraint, cfg, context=s.ids(b.task.context),
                                   proposal_context=s.ids(proposal_text) if proposal_text is not None else None,
                                   proposal_params=proposal_params), cfg.learning_rate, cfg.warmup_steps)
    steps = int(hp.get("steps", 10))
    params, curve = b.train(name, trainer, init_params, steps, int(hp.get("eval_points", 3)), lambda k: offset + k * cfg.n_samples,
                            lambda p: s.lm(p, b.task.context), start=start, seed=int(s.config.get("seed", 0)))
    return Proposal(s.lm(params, b.task.context), offset + steps * cfg.n_samples, curve, str(b.run_dir(name) / "metrics.jsonl"))


@register("cap")
def cap(b: Builder, hp: dict) -> Proposal:
    """CAP: a itself, conditioned on the constraint-aware prompt before the context (no training)."""
    if not b.task.cap_prompt:
        raise ValueError("proposal 'cap' needs a non-empty cap_prompt in the config")
    return Proposal(b.setup.lm(b.setup.params, b.task.cap_prompt + b.task.context), 0, [], None)


@register("sft_a")
def sft_a(b: Builder, hp: dict) -> Proposal:
    """SFT on b-filtered samples of a."""
    return _sft(b, "sft_a", hp, b.setup.lm(b.setup.params, b.task.context))


@register("sft_cap")
def sft_cap(b: Builder, hp: dict) -> Proposal:
    """SFT on b-filtered samples of the CAP proposal (the model learns them without the prompt)."""
    return _sft(b, "sft_cap", hp, b.get("cap").lm)


@register("dpg")
def dpg(b: Builder, hp: dict) -> Proposal:
    """On-policy DPG from a."""
    return _dpg(b, "dpg", hp, b.setup.params, 0, _base_point(b))


@register("sft_dpg")
def sft_dpg(b: Builder, hp: dict) -> Proposal:
    """Warm-start DPG: from the SFT-on-a model, off-policy with that model as the first proposal."""
    name = hp.get("from", "sft_a")
    src = b.get(name)
    return _dpg(b, "sft_dpg", hp, src.lm.params, src.train_samples, b.final(name), proposal_params=src.lm.params)


@register("cap_dpg")
def cap_dpg(b: Builder, hp: dict) -> Proposal:
    """Warm-start DPG from CAP: the policy starts at a; off-policy, the first proposal is a with the CAP prompt."""
    if not b.task.cap_prompt:
        raise ValueError("proposal 'cap_dpg' needs a non-empty cap_prompt in the config")
    return _dpg(b, "cap_dpg", hp, b.setup.params, 0, _base_point(b), proposal_text=b.task.cap_prompt + b.task.context)


from experiments import baselines  # noqa: E402,F401  (registers l3m, aux, aux_q, rl, masked, sft_masked, sft_asap)
