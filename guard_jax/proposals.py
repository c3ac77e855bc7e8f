"""Proposal recipes: how each proposal a' of the paper (and its neighbours) is built from a, b and the gold samples.

    p = warm_start_dpg(a, b, gold, DPGRecipeConfig(steps=6), key=k, start=sft(a, b, gold, key=k0))
    p.lm, p.train_samples, p.curve            # the trained a' (an LM), draws spent on it, its curve

Every recipe is `recipe(a, b, gold, config=None, *, key, run_dir=None, evaluator=None, ...) -> Proposal`:
- `a`: the base LM (with its context), `b`: the constraint, `gold`: `evaluate.draw_gold`'s samples of g
  (their `max_new_tokens` is the length every proposal samples);
- `config`: the recipe's frozen dataclass (None: the defaults, which are the trainers' own);
- `key`: the recipe's PRNG key (training draws, curve draws); `run_dir`: Orbax checkpoints, metrics.jsonl,
  TensorBoard, curve.json and `recipe.json` (the resolved settings; a run folder holding a run trained with
  other settings is refused, so a resumed run is always the run that was asked for);
- `evaluator`: an `evaluate.Evaluator` (`MonteCarloEvaluator` on LMs, `ExactEvaluator` on toy ARMs) that
  gives the curve: KL(g||a'), AR_a', KL(g||g') against the samples drawn for training, from a itself to the
  last point before the final budget (the caller evaluates the trained proposal fully). None: no curve.

Recipes: cap, sft (on b-filtered samples of a or of any proposal), dpg, warm_start_dpg (from an SFT model or
from CAP), l3m, aux (and its q = a·sigmoid(R) in `extras["q"]`), rl, masked, sft_masked, sft_asap.
`RECIPES` / `register` name them for the experiments (`Builder.get("sft_dpg")`), incl. `rl:BETA`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.config import ConfigError, config_hash, from_dict, to_dict
from guard_jax.constraints import Constraint
from guard_jax.evaluate import CurvePoint, Evaluator, Gold
from guard_jax.io import atomic_write_json
from guard_jax.lm import LM
from guard_jax.sampling import draw
from guard_jax.train.aux import AuxConfig, AuxTrainer
from guard_jax.train.common import adam
from guard_jax.train.dpg import DPG, DPGConfig
from guard_jax.train.l3m import L3M, L3MConfig
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.rl import RL, RLConfig
from guard_jax.train.sft import SFT, SFTConfig


def _default(cls, name: str):
    """The default of field `name` of the dataclass `cls` (recipes take the trainers' defaults)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def named_key(key: jax.Array, *names: str) -> jax.Array:
    """`key` folded with each name's CRC-32: the same names give the same key in every run."""
    for name in names:
        key = jax.random.fold_in(key, zlib.crc32(str(name).encode()))
    return key


@dataclasses.dataclass(frozen=True, eq=False)
class Proposal:
    """a' as an LM; the samples drawn to train it (warm starts included); its curve (before the final budget);
    its trainer's metrics file (None: untrained); `extras`: what else the recipe made (aux: "q" and "q_curve";
    sft_asap: "asap", the ASAp sampler after its draws)."""

    lm: LM
    train_samples: int
    curve: list[CurvePoint]
    metrics_jsonl: str | None
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# --- configs ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CAPConfig:
    """prompt: the constraint-aware text put before a's context."""

    prompt: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """eval_points: curve points during training, at evenly spaced steps (or at `eval_steps` when given);
    seed: the training loop's step keys (and SFT's minibatch order)."""

    eval_points: int = 3
    eval_steps: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.eval_points < 1:
            raise ValueError(f"eval_points must be >= 1, got {self.eval_points}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTRecipeConfig(Schedule):
    """SFT on the b-filtered samples of `draws` draws of the source, for `epochs` passes."""

    draws: int = 100_000
    epochs: float = 1.0
    batch_size: int = _default(SFTConfig, "batch_size")
    learning_rate: float = _default(SFTConfig, "learning_rate")
    warmup_steps: int = _default(SFTConfig, "warmup_steps")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTMaskedConfig(SFTRecipeConfig):
    """SFT on masked-decoding samples; regex: the constraint as a full-match regex ("" = from the task)."""

    regex: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTAsapConfig(SFTMaskedConfig):
    """SFT on ASAp samples: `draws` sequential ASAp samples (keep small: the trie is host-side), `asap_batch`
    rows per trie update."""

    draws: int = 512
    asap_batch: int = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskedConfig:
    """Masked decoding of a; regex: the constraint as a full-match regex ("" = from the task)."""

    regex: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPGRecipeConfig(Schedule):
    """DPG for `steps` updates of `n_samples` samples (in minibatches); swap_every: off-policy proposal checks."""

    steps: int = 10
    n_samples: int = _default(DPGConfig, "n_samples")
    minibatch: int = _default(DPGConfig, "minibatch")
    learning_rate: float = _default(DPGConfig, "learning_rate")
    warmup_steps: int = _default(DPGConfig, "warmup_steps")
    swap_every: int = _default(DPGConfig, "swap_every")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmStartConfig(DPGRecipeConfig):
    """Warm-start DPG; start: the registered proposal it starts from (an SFT model, or "cap")."""

    start: str = "sft_a"


@dataclasses.dataclass(frozen=True, kw_only=True)
class L3MRecipeConfig(Schedule):
    """L3M: SFT data = b-filtered samples of `draws` draws of a; one barrier E[b] >= threshold."""

    draws: int = 100_000
    steps: int = 10
    threshold: float = 0.5
    n_samples: int = _default(L3MConfig, "n_samples")
    batch_size: int = _default(L3MConfig, "batch_size")
    learning_rate: float = _default(L3MConfig, "learning_rate")
    mu_start: float = _default(L3MConfig, "mu_start")
    mu_end: float = _default(L3MConfig, "mu_end")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuxRecipeConfig(Schedule):
    """The auxiliary value head R and the policy distilled from q = a·sigmoid(R)."""

    steps: int = 10
    n_samples: int = _default(AuxConfig, "n_samples")
    learning_rate: float = _default(AuxConfig, "learning_rate")
    kl_weight: float = _default(AuxConfig, "kl_weight")
    minibatch: int | None = _default(AuxConfig, "minibatch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLRecipeConfig(Schedule):
    """KL-regularised REINFORCE with reward b and KL coefficient beta."""

    beta: float = 0.1
    steps: int = 10
    n_samples: int = _default(RLConfig, "n_samples")
    learning_rate: float = _default(RLConfig, "learning_rate")
    minibatch: int | None = _default(RLConfig, "minibatch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoConfig:
    """A recipe with no settings of its own."""


# --- shared machinery -------------------------------------------------------------------------------------

_OPTIMIZERS: dict = {}


def _share_optimizer(trainer, learning_rate: float, warmup_steps: int):
    """Give trainers with the same Adam settings one optimizer object: their jitted update takes it as a static
    argument, so sharing it compiles the update once instead of once per trainer (same maths)."""
    trainer.optimizer = _OPTIMIZERS.setdefault((type(trainer).__name__, learning_rate, warmup_steps), adam(learning_rate, warmup_steps))
    return trainer


def filtered_draws(key: jax.Array, lm: LM, b: Constraint, n: int, *, max_new_tokens: int, batch_size: int = 1024,
                   progress: bool = True, desc: str = "sampling") -> tuple[np.ndarray, np.ndarray, int]:
    """n draws of `lm` kept where b holds -> (tokens_NT, lengths_N, number kept)."""
    d = draw(key, lm, n, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc=desc)
    keep = np.asarray(b(d.tokens_NT, d.lengths_N), bool)
    return d.tokens_NT[keep], d.lengths_N[keep], int(keep.sum())


def _claim(run_dir: pathlib.Path | None, record: dict) -> None:
    """Record the resolved settings in run_dir/recipe.json, refusing a folder that holds a run made with others."""
    if run_dir is None:
        return
    path = pathlib.Path(run_dir) / "recipe.json"
    record = json.loads(json.dumps(record))
    if path.exists():
        before = json.loads(path.read_text())
        if before != record:
            diff = sorted(k for k in set(before["config"]) | set(record["config"]) if before["config"].get(k) != record["config"].get(k))
            raise ValueError(f"run_dir {run_dir} holds a {before['recipe']} run trained with other settings "
                             f"(differing: {', '.join(diff) or 'inputs'}); pass another run_dir or delete that folder")
        return
    atomic_write_json(path, record)


def _targets(steps: int, schedule: Schedule) -> list[int]:
    """The steps at which a curve point is taken (and the last one, `steps`)."""
    if schedule.eval_steps:
        bad = [s for s in schedule.eval_steps if not 0 < s <= steps]
        if bad:
            raise ValueError(f"eval_steps must lie in [1, steps={steps}], got {bad}")
        return sorted(set(schedule.eval_steps) | {steps})
    n = schedule.eval_points
    return sorted({max(1, round(steps * (i + 1) / n)) for i in range(n)} | {steps})


def _train(trainer, params, steps: int, schedule: Schedule, samples_at: Callable[[int], int], lm_of: Callable[[Any], LM], *,
           key: jax.Array, run_dir, evaluator: Evaluator | None, start: CurvePoint | None, progress: bool, tensorboard: bool,
           also: Callable[[Any], LM] | None = None):
    """Run `trainer` from `params` for `steps` updates, a curve point after each target step but the last.

    Resumes from run_dir's checkpoints and curve.json. `also`: a second LM of the state whose curve is kept too
    (aux's q). -> (final state, curve, second curve).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = None if run_dir is None else pathlib.Path(run_dir)
    curve_file = None if out is None else out / "curve.json"
    saved = json.loads(curve_file.read_text()) if curve_file is not None and curve_file.exists() else {}
    curves: dict[str, list[CurvePoint]] = {k: [CurvePoint.from_dict(p) for p in v] for k, v in saved.items()}
    names = ["policy"] + (["also"] if also is not None else [])
    point = lambda lm, s, tag: evaluator.point(lm, samples_at(s), s, named_key(key, *tag, "curve", str(s)))  # noqa: E731
    if evaluator is not None and not curves:
        first = start if start is not None else point(lm_of(params), 0, ())
        curves = {"policy": [first]} | ({"also": [first if start is not None else point(also(trainer.init_state(params)), 0, ("q",))]}
                                        if also is not None else {})
    state = trainer.init_state(params)
    loop = dict(out_dir=out, seed=schedule.seed, checkpoint_every=10**9, keep_last=1, progress=progress, tensorboard=tensorboard)
    for target in _targets(steps, schedule):
        state, _ = run(trainer, state, LoopConfig(steps=target, **loop))
        if evaluator is None or target == steps or any(p.step == target for p in curves["policy"]):
            continue  # the final point is the trained proposal's full evaluation, made by the caller
        curves["policy"].append(point(lm_of(state.params), target, ()))
        if also is not None:
            curves["also"].append(point(also(state), target, ("q",)))
        if curve_file is not None:
            atomic_write_json(curve_file, {k: [p.to_dict() for p in v] for k, v in curves.items()})
    return state, curves.get("policy", []), curves.get("also", [])


def _record(name: str, config, gold: Gold, **inputs) -> dict:
    return {"recipe": name, "config": to_dict(config), "max_new_tokens": gold.max_new_tokens, **inputs}


def _metrics(run_dir) -> str | None:
    return None if run_dir is None else str(pathlib.Path(run_dir) / "metrics.jsonl")


# --- recipes ----------------------------------------------------------------------------------------------


def cap(a: LM, b: Constraint, gold: Gold | None, config: CAPConfig, *, key=None, run_dir=None, evaluator=None) -> Proposal:
    """CAP: a itself, conditioned on the constraint-aware prompt before its context (no training)."""
    if config is None or not config.prompt:
        raise ValueError("cap needs CAPConfig(prompt=...), a non-empty constraint-aware prompt")
    return Proposal(a.with_prefix(config.prompt), 0, [], None)


def sft(a: LM, b: Constraint, gold: Gold, config: SFTRecipeConfig | None = None, *, key: jax.Array, run_dir=None,
        evaluator: Evaluator | None = None, source: LM | None = None, data: tuple | None = None, batch_size: int = 1024,
        progress: bool = True, tensorboard: bool = True, name: str = "sft") -> Proposal:
    """SFT of a (conditioned on its own context) on the b-filtered samples of `config.draws` draws of `source`
    (default a; e.g. a CAP proposal, whose samples a then learns without the prompt), or on
    `data` = (tokens_NT, lengths_N, draws) drawn otherwise. Draws batch by `batch_size`."""
    config = config or SFTRecipeConfig()
    if data is None:
        src = a if source is None else source
        _claim(run_dir, _record(name, config, gold, source_prompt=list(src.prompt), batch_size=batch_size))
        tokens, lengths, kept = filtered_draws(named_key(key, "train-draws"), src, b, config.draws, max_new_tokens=gold.max_new_tokens,
                                               batch_size=batch_size, progress=progress, desc=f"sampling for {name}")
        draws = config.draws
    else:
        tokens, lengths, draws = data
        kept = len(tokens)
        _claim(run_dir, _record(name, config, gold, data_draws=int(draws), data_kept=kept))
    if kept < config.batch_size:
        raise ValueError(f"{name}: only {kept} of {draws:,} draws satisfied the constraint, fewer than batch_size={config.batch_size}; "
                         "raise draws or lower batch_size")
    cfg = SFTConfig(batch_size=config.batch_size, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, seed=config.seed)
    trainer = _share_optimizer(SFT(a, tokens, lengths, cfg), config.learning_rate, config.warmup_steps)
    steps = max(1, round(config.epochs * trainer.steps_per_epoch))
    start = evaluator.start() if evaluator is not None else None

    def samples_at(step):  # draws needed to collect the examples seen so far (one pass = all the draws)
        return min(draws, math.ceil(step * config.batch_size * draws / kept))

    state, curve, _ = _train(trainer, a.params, steps, config, samples_at, a.with_params, key=key, run_dir=run_dir, evaluator=evaluator,
                             start=start, progress=progress, tensorboard=tensorboard)
    return Proposal(a.with_params(state.params), int(draws), curve, _metrics(run_dir))


def _dpg(a: LM, b: Constraint, gold: Gold, config: DPGRecipeConfig, *, key, run_dir, evaluator, init_params, offset: int,
         start: CurvePoint | None, proposal: LM | None, progress: bool, tensorboard: bool, record: dict) -> Proposal:
    _claim(run_dir, record)
    cfg = DPGConfig(n_samples=config.n_samples, minibatch=config.minibatch, max_new_tokens=gold.max_new_tokens,
                    learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, on_policy=proposal is None,
                    swap_every=config.swap_every)
    trainer = _share_optimizer(DPG(a, b, cfg, proposal=proposal), cfg.learning_rate, cfg.warmup_steps)
    state, curve, _ = _train(trainer, init_params, config.steps, config, lambda k: offset + k * cfg.n_samples, a.with_params, key=key,
                             run_dir=run_dir, evaluator=evaluator, start=start, progress=progress, tensorboard=tensorboard)
    return Proposal(a.with_params(state.params), offset + config.steps * cfg.n_samples, curve, _metrics(run_dir))


def dpg(a: LM, b: Constraint, gold: Gold, config: DPGRecipeConfig | None = None, *, key: jax.Array, run_dir=None,
        evaluator: Evaluator | None = None, progress: bool = True, tensorboard: bool = True) -> Proposal:
    """On-policy DPG from a toward g."""
    config = config or DPGRecipeConfig()
    return _dpg(a, b, gold, config, key=key, run_dir=run_dir, evaluator=evaluator, init_params=a.params, offset=0,
                start=evaluator.start() if evaluator is not None else None, proposal=None, progress=progress, tensorboard=tensorboard,
                record=_record("dpg", config, gold))


def warm_start_dpg(a: LM, b: Constraint, gold: Gold, config: DPGRecipeConfig | None = None, *, key: jax.Array, start: Proposal,
                   start_point: CurvePoint | None = None, run_dir=None, evaluator: Evaluator | None = None, progress: bool = True,
                   tensorboard: bool = True) -> Proposal:
    """Warm-start DPG, off-policy with `start.lm` as the first proposal; the policy is conditioned on a's context.
    From a trained proposal (start.train_samples > 0, e.g. SFT of a) the policy starts as that model; from an
    untrained one (CAP: a with a prompt, or any other fixed proposal) the policy starts at a. Samples drawn:
    start's plus DPG's. `start_point`: the curve point of the starting policy (default: measured by `evaluator`)."""
    config = config or DPGRecipeConfig()
    init = start.lm.params if start.train_samples > 0 else a.params
    if start_point is None and evaluator is not None:
        start_point = (evaluator.start() if init is a.params else
                       evaluator.point(a.with_params(init), start.train_samples, 0, named_key(key, "start")))
    return _dpg(a, b, gold, config, key=key, run_dir=run_dir, evaluator=evaluator, init_params=init, offset=start.train_samples,
                start=start_point, proposal=start.lm, progress=progress, tensorboard=tensorboard,
                record=_record("warm_start_dpg", config, gold, start_prompt=list(start.lm.prompt), start_samples=start.train_samples))


def l3m(a: LM, b: Constraint, gold: Gold, config: L3MRecipeConfig | None = None, *, key: jax.Array, run_dir=None,
        evaluator: Evaluator | None = None, data: tuple | None = None, batch_size: int = 1024, progress: bool = True,
        tensorboard: bool = True) -> Proposal:
    """L3M from a: SFT data = the b-filtered draws of a (or `data` = (tokens_NT, lengths_N, draws)), one barrier
    E[b] >= threshold, mu annealed from mu_start to mu_end over `steps`. Samples: the data's draws plus n_samples
    per step."""
    config = config or L3MRecipeConfig()
    if data is None:
        _claim(run_dir, _record("l3m", config, gold, batch_size=batch_size))
        tokens, lengths, kept = filtered_draws(named_key(key, "train-draws"), a, b, config.draws, max_new_tokens=gold.max_new_tokens,
                                               batch_size=batch_size, progress=progress, desc="sampling for l3m")
        draws = config.draws
    else:
        tokens, lengths, draws = data
        kept = len(tokens)
        _claim(run_dir, _record("l3m", config, gold, data_draws=int(draws), data_kept=kept))
    if kept < config.batch_size:
        raise ValueError(f"l3m: only {kept} of {draws:,} draws satisfied the constraint, fewer than batch_size={config.batch_size}; "
                         "raise draws or lower batch_size")
    cfg = L3MConfig(thresholds=(config.threshold,), total_steps=config.steps, n_samples=config.n_samples, batch_size=config.batch_size,
                    max_new_tokens=gold.max_new_tokens, learning_rate=config.learning_rate, mu_start=config.mu_start,
                    mu_end=config.mu_end, seed=config.seed)
    trainer = _share_optimizer(L3M(a, tokens, lengths, b, cfg), cfg.learning_rate, 0)
    state, curve, _ = _train(trainer, a.params, config.steps, config, lambda k: draws + k * cfg.n_samples, a.with_params, key=key,
                             run_dir=run_dir, evaluator=evaluator, start=evaluator.start() if evaluator is not None else None,
                             progress=progress, tensorboard=tensorboard)
    return Proposal(a.with_params(state.params), int(draws) + config.steps * cfg.n_samples, curve, _metrics(run_dir))


def _zero_head(params):
    """The value head's start: a copy of a's params with the final layer norm's scale (GPT-2 `ln_f`) at 0, so
    R = 0 (q = a) while the features below still carry gradient; all zeros for other layouts."""
    if isinstance(params, dict) and isinstance(params.get("ln_f"), dict) and "scale" in params["ln_f"]:
        head = jax.tree.map(lambda x: x, params)
        head["ln_f"] = {**params["ln_f"], "scale": jnp.zeros_like(params["ln_f"]["scale"])}
        return head
    return jax.tree.map(jnp.zeros_like, params)


def aux(a: LM, b: Constraint, gold: Gold, config: AuxRecipeConfig | None = None, *, key: jax.Array, run_dir=None,
        evaluator: Evaluator | None = None, progress: bool = True, tensorboard: bool = True) -> Proposal:
    """The auxiliary value-head trainer from a: R (a copy of a with a zero output scale, so q = a at the start)
    trained by BCE on b of the policy's samples, and the policy p_theta distilled from q = a·sigmoid(R) by a
    per-token KL. `lm` is the policy; `extras["q"]` is q itself (two forward passes per token) and
    `extras["q_curve"]` its curve, from the same run."""
    config = config or AuxRecipeConfig()
    if config.kl_weight <= 0:
        raise ValueError("aux: kl_weight must be > 0 (the proposal is the distilled policy)")
    _claim(run_dir, _record("aux", config, gold))
    cfg = AuxConfig(n_samples=config.n_samples, max_new_tokens=gold.max_new_tokens, learning_rate=config.learning_rate,
                    kl_weight=config.kl_weight, minibatch=config.minibatch)
    trainer = _share_optimizer(AuxTrainer(a, a.model, b, cfg), cfg.learning_rate, 0)

    def q_of(state) -> LM:
        return trainer.proposal(state)

    state, curve, q_curve = _train(trainer, {"head": _zero_head(a.params), "policy": a.params}, config.steps, config,
                                   lambda k: k * cfg.n_samples, lambda p: a.with_params(p["policy"]), key=key, run_dir=run_dir,
                                   evaluator=evaluator, start=evaluator.start() if evaluator is not None else None,
                                   progress=progress, tensorboard=tensorboard, also=q_of)
    return Proposal(a.with_params(state.params["policy"]), config.steps * cfg.n_samples, curve, _metrics(run_dir),
                    {"q": q_of(state), "q_curve": q_curve})


def rl(a: LM, b: Constraint, gold: Gold, config: RLRecipeConfig | None = None, *, key: jax.Array, run_dir=None,
       evaluator: Evaluator | None = None, progress: bool = True, tensorboard: bool = True) -> Proposal:
    """KL-regularised REINFORCE from a with reward b and coefficient `config.beta`."""
    config = config or RLRecipeConfig()
    _claim(run_dir, _record("rl", config, gold))
    cfg = RLConfig(beta=config.beta, n_samples=config.n_samples, max_new_tokens=gold.max_new_tokens,
                   learning_rate=config.learning_rate, minibatch=config.minibatch)
    trainer = _share_optimizer(RL(a, b, cfg), cfg.learning_rate, 0)
    state, curve, _ = _train(trainer, a.params, config.steps, config, lambda k: k * cfg.n_samples, a.with_params, key=key,
                             run_dir=run_dir, evaluator=evaluator, start=evaluator.start() if evaluator is not None else None,
                             progress=progress, tensorboard=tensorboard)
    return Proposal(a.with_params(state.params), config.steps * cfg.n_samples, curve, _metrics(run_dir))


# --- masking and ASAp -------------------------------------------------------------------------------------


def fullmatch_regex(spec: str) -> str:
    """A constraint spec as a full-match regex over the decoded text: `keyword:W` ->
    `([\\s\\S]*[^A-Za-z0-9_])?W([^A-Za-z0-9_][\\s\\S]*)?` (\\bW\\b with ASCII word characters); `regex:P` ->
    `[\\s\\S]*(P)[\\s\\S]*` (re.search's semantics)."""
    kind, _, arg = spec.partition(":")
    if " & " not in spec and kind == "keyword" and arg:
        return rf"([\s\S]*[^A-Za-z0-9_])?{re.escape(arg)}([^A-Za-z0-9_][\s\S]*)?"
    if " & " not in spec and kind == "regex" and arg:
        return rf"[\s\S]*({arg})[\s\S]*"
    raise ValueError(f"masking needs the constraint as a regex: {spec!r} is not keyword:WORD or regex:PATTERN; "
                     "give the recipe's `regex` (a full-match regex over the decoded text)")


def text_automaton(a: LM, pattern: str, max_new_tokens: int):
    """The token automaton of a full-match regex over the decoded text, for a's tokenizer. It walks each token's
    bytes (`guard_jax.grammars.token_bytes`), so multi-byte characters split across byte-level pieces are
    matched exactly."""
    from guard_jax.decoding import check_feasible, regex_automaton
    from guard_jax.grammars import token_bytes

    if a.model.eos_id is None:
        raise ValueError("masking needs a model with an eos_id (EOS is allowed only where the text matches)")
    if a.tokenizer is None:
        raise ValueError("text_automaton needs an LM with a tokenizer (LM.load(path) or LM.of(..., tokenizer=))")
    mask = regex_automaton(pattern, token_bytes(a.tokenizer, a.model.vocab_size), eos_id=a.model.eos_id, vocab_size=a.model.vocab_size)
    check_feasible(mask, max_new_tokens)
    return mask


def masked_lm(a: LM, automaton, max_new_tokens: int) -> LM:
    """a masked by `automaton` (masked decoding as an LM: sampled and scored under the masked law)."""
    from guard_jax.decoding.masked_arm import MaskedARM

    return dataclasses.replace(a, model=MaskedARM(a.model, len(a.prompt), max_new_tokens), params=MaskedARM.params_of(a.params, automaton))


def masked(a: LM, b: Constraint, gold: Gold, config: MaskedConfig | None = None, *, automaton, key=None, run_dir=None,
           evaluator=None) -> Proposal:
    """Masked decoding of a by a token automaton of b (no training)."""
    return Proposal(masked_lm(a, automaton, gold.max_new_tokens), 0, [], None)


def sft_masked(a: LM, b: Constraint, gold: Gold, config: SFTMaskedConfig | None = None, *, automaton, key: jax.Array, run_dir=None,
               evaluator: Evaluator | None = None, batch_size: int = 1024, progress: bool = True, tensorboard: bool = True) -> Proposal:
    """SFT of a on the (b-filtered) samples of masked decoding."""
    config = config or SFTMaskedConfig()
    return sft(a, b, gold, config, key=key, run_dir=run_dir, evaluator=evaluator, source=masked_lm(a, automaton, gold.max_new_tokens),
               batch_size=batch_size, progress=progress, tensorboard=tensorboard, name="sft_masked")


def sft_asap(a: LM, b: Constraint, gold: Gold, config: SFTAsapConfig | None = None, *, automaton, key: jax.Array, run_dir=None,
             evaluator: Evaluator | None = None, progress: bool = True, tensorboard: bool = True) -> Proposal:
    """SFT of a on the (b-filtered) samples of `config.draws` sequential ASAp draws; `extras["asap"]` is the
    sampler after them (its trie; `Asap.log_theta_levels` gives its next-sample law on toy ARMs)."""
    from guard_jax.decoding import Asap

    config = config or SFTAsapConfig()
    sampler = Asap(a.model, a.params, automaton, gold.max_new_tokens, prompt_1P=np.asarray(a.prompt))
    out = sampler.sample(named_key(key, "asap-draws"), config.draws, config.asap_batch)
    keep = np.asarray(b(out.tokens_NT, out.lengths_N), bool)
    p = sft(a, b, gold, config, key=key, run_dir=run_dir, evaluator=evaluator, data=(out.tokens_NT[keep], out.lengths_N[keep], config.draws),
            progress=progress, tensorboard=tensorboard, name="sft_asap")
    return dataclasses.replace(p, extras={"asap": sampler})


# --- the registry -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named proposal: `build(builder, name, config) -> Proposal`, its config class, the proposals it needs
    (`needs(config) -> names`), and `param`: the config field a `name:VALUE` suffix sets (None: no suffix)."""

    name: str
    build: Callable
    config_cls: type
    needs: Callable[[Any], list[str]] = lambda config: []
    param: str | None = None


RECIPES: dict[str, Recipe] = {}


def register(name: str, config_cls: type, *, needs: Callable[[Any], list[str]] | None = None, param: str | None = None):
    """Register `build(builder, name, config) -> Proposal` under `name`; with `param`, `name:VALUE` names the same
    recipe with config.<param> = float(VALUE) (e.g. `rl:0.5`)."""
    if ":" in name:
        raise ValueError(f"proposal name {name!r} must not contain ':' (it separates a parameter value)")
    if param is not None and param not in {f.name for f in dataclasses.fields(config_cls)}:
        raise ValueError(f"param {param!r} is not a field of {config_cls.__name__}")

    def deco(fn):
        if name in RECIPES:
            raise ValueError(f"proposal {name!r} is registered twice")
        RECIPES[name] = Recipe(name, fn, config_cls, needs or (lambda config: []), param)
        return fn

    return deco


def lookup(name: str) -> tuple[Recipe, dict]:
    """The recipe of a proposal name and the config fields its `:VALUE` suffix sets."""
    base, sep, value = name.partition(":")
    recipe = RECIPES.get(base)
    if recipe is None or (sep and recipe.param is None):
        raise ValueError(f"unknown proposal {name!r}; registered: {', '.join(sorted(RECIPES))}"
                         f" (with a ':VALUE' suffix: {', '.join(sorted(n for n, r in RECIPES.items() if r.param)) or 'none'})")
    if not sep:
        return recipe, {}
    try:
        return recipe, {recipe.param: float(value)}
    except ValueError:
        raise ValueError(f"proposal {name!r}: the value after ':' must be a number ({recipe.param})") from None


def resolve_config(name: str, data: Mapping | None = None, where: str = "train"):
    """The config of proposal `name` from its section (a dict, or a config instance), suffix values applied;
    `where` names the section's parent in error messages."""
    recipe, fixed = lookup(name)
    if data is not None and not isinstance(data, Mapping):
        cfg = data
        if not isinstance(cfg, recipe.config_cls):
            raise ConfigError(f"{where}.{name}: expected {recipe.config_cls.__name__}, got {type(cfg).__name__}")
        return dataclasses.replace(cfg, **fixed) if fixed else cfg
    given = dict(data or {})
    clash = [k for k in fixed if k in given and given[k] != fixed[k]]
    if clash:
        raise ConfigError(f"{where}.{name}.{clash[0]}={given[clash[0]]} contradicts the name's suffix ({fixed[clash[0]]})")
    return from_dict(recipe.config_cls, given | fixed, f"{where}.{name}")


class Builder:
    """Builds registered proposals by name for one (a, b, gold), once each (warm starts reuse their source).

    `configs`: name -> config (or its dict); a name without one gets its recipe's defaults. `cap`: the CAP
    proposal (an LM; e.g. `a.with_prefix(prompt)`). `key`: each proposal's key is `named_key(key, name)`.
    `run_root`: each proposal trains in run_root/<name>/<fingerprint>/ (see `fingerprint`), with config.json
    recording what it was trained with, so changed settings train afresh in another folder and a rerun with the
    same settings resumes. `inputs`: what else the runs depend on (the model, the context, the budgets), hashed
    into every fingerprint. `automaton`: the token automaton of b for masked recipes (default: from a's
    tokenizer and `regex` or the `constraint_spec`).
    """

    def __init__(self, a: LM, b: Constraint, gold: Gold, configs: Mapping[str, Any] | None = None, *, key: jax.Array,
                 cap: LM | None = None, run_root=None, evaluator: Evaluator | None = None, batch_size: int = 1024,
                 progress: bool = True, tensorboard: bool = True, inputs: Mapping | None = None, automaton=None,
                 constraint_spec: str | None = None):
        self.a, self.b, self.gold, self.cap, self.key = a, b, gold, cap, key
        self.configs = dict(configs or {})
        self.run_root = None if run_root is None else pathlib.Path(run_root)
        self.evaluator, self.batch_size, self.progress, self.tensorboard = evaluator, batch_size, progress, tensorboard
        self.inputs = dict(inputs or {})
        self.constraint_spec = constraint_spec
        self.cache: dict[str, Proposal] = {}
        self.seconds: dict[str, float] = {}
        self.finals: dict[str, CurvePoint] = {}  # name -> the point of its full evaluation (set by the caller)
        self._automata: dict[str, Any] = {} if automaton is None else {"": automaton}

    def config(self, name: str):
        """The resolved config of `name` (`name:VALUE` falls back to the config of `name`)."""
        return resolve_config(name, self.configs.get(name, self.configs.get(name.partition(":")[0])))

    def fingerprint(self, name: str) -> str:
        """A hash of everything proposal `name` is trained from: its config, the builder's inputs, and the
        fingerprints of the proposals it needs (that of "cap" holds the CAP prompt)."""
        recipe, _ = lookup(name)
        cfg = self.config(name)
        own = {"prompt": list(self.cap.prompt)} if name == "cap" and self.cap is not None else {}
        return config_hash({"proposal": name, "config": to_dict(cfg), "inputs": self.inputs, **own,
                            "needs": {n: self.fingerprint(n) for n in recipe.needs(cfg)}})

    def run_dir(self, name: str) -> pathlib.Path | None:
        """run_root/<name>/<fingerprint>/, with config.json recording the resolved settings (None: no run_root)."""
        if self.run_root is None:
            return None
        out = self.run_root / name.replace(":", "=") / self.fingerprint(name)
        record = {"proposal": name, "config": to_dict(self.config(name)), "inputs": self.inputs,
                  "needs": {n: self.fingerprint(n) for n in lookup(name)[0].needs(self.config(name))}}
        if not (out / "config.json").exists():
            atomic_write_json(out / "config.json", record)
        return out

    def key_of(self, name: str) -> jax.Array:
        return named_key(self.key, name)

    def get(self, name: str) -> Proposal:
        if name not in self.cache:
            recipe, _ = lookup(name)
            t0 = time.perf_counter()
            self.cache[name] = recipe.build(self, name, self.config(name))
            self.seconds[name] = time.perf_counter() - t0
        return self.cache[name]

    def final(self, name: str) -> CurvePoint | None:
        """The curve point of a built proposal at its full budget: its full evaluation if the caller set it
        (`finals`), else measured by the evaluator (None without one)."""
        if name not in self.finals and self.evaluator is not None:
            p = self.get(name)
            self.finals[name] = self.evaluator.point(p.lm, p.train_samples, -1, named_key(self.key_of(name), "curve", "-1"))
        return self.finals.get(name)

    def need_cap(self, name: str) -> LM:
        if self.cap is None:
            raise ValueError(f"proposal {name!r} needs a CAP proposal: give a non-empty cap_prompt")
        return self.cap

    def automaton(self, regex: str):
        """The token automaton of b (built once per regex): `regex`, else from the constraint spec."""
        if regex not in self._automata:
            if not regex and "" in self._automata:
                return self._automata[""]
            if not regex and self.constraint_spec is None:
                raise ValueError("masking needs the constraint as a regex: give the recipe's `regex` or a constraint spec")
            pattern = regex or fullmatch_regex(self.constraint_spec)
            self._automata[regex] = text_automaton(self.a, pattern, self.gold.max_new_tokens)
        return self._automata[regex]

    def common(self, name: str) -> dict:
        """The keyword arguments every trained recipe gets from the builder."""
        return dict(key=self.key_of(name), run_dir=self.run_dir(name), evaluator=self.evaluator, progress=self.progress,
                    tensorboard=self.tensorboard)


@register("cap", NoConfig)
def _cap(bld: Builder, name: str, config) -> Proposal:
    return Proposal(bld.need_cap(name), 0, [], None)


@register("sft_a", SFTRecipeConfig)
def _sft_a(bld: Builder, name: str, config) -> Proposal:
    return sft(bld.a, bld.b, bld.gold, config, batch_size=bld.batch_size, name=name, **bld.common(name))


@register("sft_cap", SFTRecipeConfig, needs=lambda config: ["cap"])
def _sft_cap(bld: Builder, name: str, config) -> Proposal:
    return sft(bld.a, bld.b, bld.gold, config, source=bld.get("cap").lm, batch_size=bld.batch_size, name=name, **bld.common(name))


@register("dpg", DPGRecipeConfig)
def _dpg_entry(bld: Builder, name: str, config) -> Proposal:
    return dpg(bld.a, bld.b, bld.gold, config, **bld.common(name))


@register("sft_dpg", WarmStartConfig, needs=lambda config: [config.start])
def _sft_dpg(bld: Builder, name: str, config) -> Proposal:
    start = bld.get(config.start)
    return warm_start_dpg(bld.a, bld.b, bld.gold, config, start=start, start_point=bld.final(config.start), **bld.common(name))


@register("cap_dpg", DPGRecipeConfig, needs=lambda config: ["cap"])
def _cap_dpg(bld: Builder, name: str, config) -> Proposal:
    start = bld.get("cap")
    return warm_start_dpg(bld.a, bld.b, bld.gold, config, start=start,
                          start_point=bld.evaluator.start() if bld.evaluator is not None else None, **bld.common(name))


@register("l3m", L3MRecipeConfig)
def _l3m(bld: Builder, name: str, config) -> Proposal:
    return l3m(bld.a, bld.b, bld.gold, config, batch_size=bld.batch_size, **bld.common(name))


@register("aux", AuxRecipeConfig)
def _aux(bld: Builder, name: str, config) -> Proposal:
    return aux(bld.a, bld.b, bld.gold, config, **bld.common(name))


@register("aux_q", NoConfig, needs=lambda config: ["aux"])
def _aux_q(bld: Builder, name: str, config) -> Proposal:
    p = bld.get("aux")
    return Proposal(p.extras["q"], p.train_samples, p.extras["q_curve"], p.metrics_jsonl)


@register("rl", RLRecipeConfig, param="beta")
def _rl(bld: Builder, name: str, config) -> Proposal:
    return rl(bld.a, bld.b, bld.gold, config, **bld.common(name))


@register("masked", MaskedConfig)
def _masked(bld: Builder, name: str, config) -> Proposal:
    return masked(bld.a, bld.b, bld.gold, config, automaton=bld.automaton(config.regex))


@register("sft_masked", SFTMaskedConfig)
def _sft_masked(bld: Builder, name: str, config) -> Proposal:
    return sft_masked(bld.a, bld.b, bld.gold, config, automaton=bld.automaton(config.regex), batch_size=bld.batch_size, **bld.common(name))


@register("sft_asap", SFTAsapConfig)
def _sft_asap(bld: Builder, name: str, config) -> Proposal:
    return sft_asap(bld.a, bld.b, bld.gold, config, automaton=bld.automaton(config.regex), **bld.common(name))


__all__ = ["AuxRecipeConfig", "Builder", "CAPConfig", "DPGRecipeConfig", "L3MRecipeConfig", "MaskedConfig", "NoConfig", "Proposal",
           "RECIPES", "RLRecipeConfig", "Recipe", "SFTAsapConfig", "SFTMaskedConfig", "SFTRecipeConfig", "Schedule", "WarmStartConfig",
           "aux", "cap", "dpg", "filtered_draws", "fullmatch_regex", "l3m", "lookup", "masked", "masked_lm", "named_key", "register",
           "resolve_config", "rl", "sft", "sft_asap", "sft_masked", "text_automaton", "warm_start_dpg"]
