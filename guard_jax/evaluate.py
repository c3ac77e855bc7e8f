"""Evaluation of a proposal a' against the gold distribution g = a·b / Z, as in the paper.

Draw N_a samples of a once (`draw_gold`): their b-filtered subset are the samples of g, and their count
gives Z. Every proposal is then evaluated against those same gold samples (`evaluate_proposal`): N_a'
draws of a' give AR_a' and the samples of g' (exactly what the GUARD sampler returns from those draws),
each sample set is scored by the other model, and every quantity comes with its confidence interval.

    gold = draw_gold(key_a, a, b, 100_000, max_new_tokens=30)
    ev = evaluate_proposal(key_a2, gold, a, a2, b, 20_000)       # Evaluation: ev.kl_g_a2, ev.ar, ...
    ev = monte_carlo(key, a, a2, b, max_new_tokens=30, n_a=100_000, n_a2=20_000)   # both steps at once

Training curves use an `Evaluator`: `MonteCarloEvaluator` (on the gold samples) for language models and
`ExactEvaluator` (by enumeration of V^T, `guard_jax.exact`) for toy ARMs; both return `CurvePoint`s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from guard_jax import estimators as E
from guard_jax.constraints import Constraint
from guard_jax.lm import LM
from guard_jax.sampling import draw, score


class Gold(NamedTuple):
    """Samples of g: the b-filtered draws of a (tokens_NT, lengths_N, logp_a_N), with the draw counts
    (`accepted` of `draws`) and the number of new tokens they were drawn with."""

    tokens_NT: np.ndarray
    lengths_N: np.ndarray
    logp_a_N: np.ndarray
    accepted: int
    draws: int
    max_new_tokens: int

    @property
    def z(self) -> E.Estimate:
        """Z = AR_a with its Wilson interval."""
        return E.estimate_ar(self.accepted, self.draws)

    @property
    def kl_g_a(self) -> E.Estimate:
        """KL(g||a) = -log Z with its interval."""
        return E.estimate_kl_g_a(self.z)


def draw_gold(key: jax.Array, a: LM, b: Constraint, n: int, *, max_new_tokens: int, batch_size: int = 1024, progress: bool = True,
              desc: str = "sampling a (gold)") -> Gold:
    """n draws of a, kept where b holds: the samples of g. Raises when fewer than 2 satisfy b."""
    if n <= 0:
        raise ValueError(f"n (the number of draws of a) must be > 0, got {n}")
    d = draw(key, a, n, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc=desc)
    keep = np.asarray(b(d.tokens_NT, d.lengths_N), bool)
    if keep.sum() < 2:
        raise ValueError(f"only {int(keep.sum())} of {n:,} samples of a satisfied {b.name}: raise n (AR_a is about "
                         f"{keep.mean():.2g}) or pick a more frequent constraint")
    return Gold(d.tokens_NT[keep], d.lengths_N[keep], d.logp_N[keep], int(keep.sum()), n, int(max_new_tokens))


def estimate_dict(e: E.Estimate | None) -> dict | None:
    """An Estimate as a JSON-ready dict (value, lo, hi, level, n); None stays None."""
    return None if e is None else {"value": e.value, "lo": e.lo, "hi": e.hi, "level": e.level, "n": e.n}


def _from_est(d: dict | None) -> E.Estimate | None:
    return None if d is None else E.Estimate(d["value"], d["lo"], d["hi"], d["level"], d["n"])


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluation:
    """The paper's estimates for one proposal (None where too few samples of g' were drawn: AR gain and
    KL(g||g') need 1, KL(g'||g) 2), the draws of a' (`accepted` of `draws` satisfied b), and the samples
    of g' (tokens_NT, lengths_N: the b-filtered draws of a')."""

    z: E.Estimate
    ar: E.Estimate
    ar_gain: E.Estimate | None
    kl_g_a: E.Estimate
    kl_g_a2: E.Estimate
    kl_g_g2: E.Estimate | None
    kl_g2_g: E.Estimate | None
    draws: int
    accepted: int
    tokens_NT: np.ndarray
    lengths_N: np.ndarray

    def estimates(self) -> dict[str, E.Estimate | None]:
        """The estimates under the paper's names: Z, AR_a2, AR_gain, KL(g||a), KL(g||a2), KL(g||g2), KL(g2||g)."""
        return {"Z": self.z, "AR_a2": self.ar, "AR_gain": self.ar_gain, "KL(g||a)": self.kl_g_a, "KL(g||a2)": self.kl_g_a2,
                "KL(g||g2)": self.kl_g_g2, "KL(g2||g)": self.kl_g2_g}

    def to_dict(self) -> dict:
        """`estimates()` as JSON-ready dicts (None where missing)."""
        return {k: estimate_dict(v) for k, v in self.estimates().items()}

    def point(self, samples: int, step: int = -1) -> "CurvePoint":
        """This evaluation as the curve point of a proposal trained on `samples` draws."""
        return CurvePoint(samples, step, self.kl_g_a2, self.ar, self.kl_g_g2)


def evaluate_proposal(key: jax.Array, gold: Gold, a: LM, a2: LM, b: Constraint, n_a2: int, *, batch_size: int = 1024,
                      score_batch_size: int | None = None, level: float = 0.95, progress: bool = True,
                      desc: str = "sampling a'") -> Evaluation:
    """Evaluate a' on the gold samples of a (never redrawn): n_a2 draws of a' with `key`, the gold samples
    scored by a' and the samples of g' scored by a (teacher-forced, in batches of `score_batch_size`,
    default `batch_size`)."""
    if n_a2 <= 0:
        raise ValueError(f"n_a2 (the number of draws of a') must be > 0, got {n_a2}")
    sb = score_batch_size or batch_size
    d = draw(key, a2, n_a2, max_new_tokens=gold.max_new_tokens, batch_size=batch_size, progress=progress, desc=desc)
    keep = np.asarray(b(d.tokens_NT, d.lengths_N), bool)
    k = int(keep.sum())
    logp_a2_G = score(a2, gold.tokens_NT, gold.lengths_N, batch_size=sb)
    z, ar = E.estimate_ar(gold.accepted, gold.draws, level), E.estimate_ar(k, n_a2, level)
    kl_g_a2 = E.estimate_kl_g_a2(gold.logp_a_N, logp_a2_G, gold.accepted, gold.draws, level)
    gain = kl_g_g2 = kl_g2_g = None
    if k >= 1:
        gain = E.estimate_ar_gain(gold.accepted, gold.draws, k, n_a2, level)
        kl_g_g2 = E.estimate_kl_g_g2_from(kl_g_a2, k, n_a2, level)
    if k >= 2:
        logp_a_G2 = score(a, d.tokens_NT[keep], d.lengths_N[keep], batch_size=sb)
        kl_g2_g = E.estimate_kl_g2_g(d.logp_N[keep], logp_a_G2, k, n_a2, gold.accepted, gold.draws, level)
    return Evaluation(z, ar, gain, E.estimate_kl_g_a(z), kl_g_a2, kl_g_g2, kl_g2_g, n_a2, k, d.tokens_NT[keep], d.lengths_N[keep])


def monte_carlo(key: jax.Array, a: LM, a2: LM, b: Constraint, *, max_new_tokens: int, n_a: int, n_a2: int, batch_size: int = 1024,
                level: float = 0.95, progress: bool = True) -> Evaluation:
    """`draw_gold` (n_a draws of a) then `evaluate_proposal` (n_a2 draws of a'), keys split from `key`.

    Raises ValueError when fewer than 2 samples of g or of g' were found (raise n_a / n_a2).
    """
    key_a, key_a2 = jax.random.split(key)
    gold = draw_gold(key_a, a, b, n_a, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    ev = evaluate_proposal(key_a2, gold, a, a2, b, n_a2, batch_size=batch_size, level=level, progress=progress)
    if ev.accepted < 2:
        raise ValueError(f"only {ev.accepted} of {n_a2} samples of a' satisfied the constraint: raise n_a2 to estimate with confidence")
    return ev


# --- curves -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """KL(g||a'), AR_a' and KL(g||g') of a proposal after `samples` draws for its training (`step` updates;
    -1: its final evaluation). Exact evaluators give zero-width intervals and more quantities in `extra`."""

    samples: int
    step: int
    kl_g_a2: E.Estimate
    ar: E.Estimate
    kl_g_g2: E.Estimate | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        d = estimate_dict
        return {"samples": int(self.samples), "step": int(self.step), "KL(g||a2)": d(self.kl_g_a2), "AR_a2": d(self.ar),
                "KL(g||g2)": d(self.kl_g_g2), **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "CurvePoint":
        extra = {k: v for k, v in d.items() if k not in ("samples", "step", "KL(g||a2)", "AR_a2", "KL(g||g2)")}
        return cls(int(d["samples"]), int(d["step"]), _from_est(d["KL(g||a2)"]), _from_est(d["AR_a2"]), _from_est(d["KL(g||g2)"]), extra)


class Evaluator(Protocol):
    """Measures proposals along a training curve (`MonteCarloEvaluator`, `ExactEvaluator`)."""

    def start(self) -> CurvePoint:
        """The point of a itself (no training): KL(g||a) = -log Z, AR = Z, KL(g||g) = 0."""

    def point(self, lm: LM, samples: int, step: int, key: jax.Array) -> CurvePoint:
        """The point of the proposal `lm` after `samples` training draws and `step` updates."""


@dataclasses.dataclass(frozen=True, eq=False)
class MonteCarloEvaluator:
    """Curve points from the gold samples (KL(g||a')) and `n_draws` fresh draws of each a' (AR, KL(g||g'))."""

    gold: Gold
    b: Constraint
    n_draws: int
    batch_size: int = 1024
    score_batch_size: int | None = None

    def start(self) -> CurvePoint:
        z = self.gold.z
        return CurvePoint(0, 0, self.gold.kl_g_a, z, E.Estimate(0.0, 0.0, 0.0, z.level, z.n))

    def point(self, lm: LM, samples: int, step: int, key: jax.Array) -> CurvePoint:
        kl = E.estimate_kl_g_a2(self.gold.logp_a_N, score(lm, self.gold.tokens_NT, self.gold.lengths_N,
                                                           batch_size=self.score_batch_size or self.batch_size),
                                self.gold.accepted, self.gold.draws)
        d = draw(key, lm, self.n_draws, max_new_tokens=self.gold.max_new_tokens, batch_size=self.batch_size, progress=False)
        k = int(np.asarray(self.b(d.tokens_NT, d.lengths_N)).sum())
        return CurvePoint(samples, step, kl, E.estimate_ar(k, self.n_draws), E.estimate_kl_g_g2_from(kl, k, self.n_draws) if k else None)


def exact_estimate(value: float) -> E.Estimate:
    """An exact value as a zero-width `Estimate` (level 1, no samples)."""
    return E.Estimate(float(value), float(value), float(value), 1.0, 0)


class ExactEvaluator:
    """Exact curve points on a toy ARM: every law over V^T enumerated (`guard_jax.exact`, in float64).

    `extra` of each point: ar_gain, kl_g2_g, tv_g_g2 and mass_b0 (the mass a' puts on b = 0)."""

    def __init__(self, a: LM, b: Constraint, max_len: int):
        from guard_jax.exact import SequenceSpace, exact_constraint

        self.max_len, self.space = int(max_len), SequenceSpace.of(a.model, max_len)
        with jax.enable_x64(True):
            self.log_a = self.log_law(a)
            self.b = exact_constraint(self.space, b)

    def log_law(self, lm: LM) -> np.ndarray:
        """log lm(y) over the grid V^T (float64)."""
        from guard_jax.exact import exact_log_prob

        with jax.enable_x64(True):
            return exact_log_prob(lm.model, lm.params, self.max_len, np.asarray(lm.prompt))

    def start(self) -> CurvePoint:
        return self.point_of_law(self.log_a, 0, 0)

    def point(self, lm: LM, samples: int, step: int, key: jax.Array | None = None) -> CurvePoint:
        return self.point_of_law(self.log_law(lm), samples, step)

    def point_of_law(self, log_a2: np.ndarray, samples: int, step: int) -> CurvePoint:
        """The point of a proposal given as its log law over the grid (e.g. ASAp's next-sample law)."""
        from guard_jax.exact import exact_quantities

        with jax.enable_x64(True):
            q = exact_quantities(self.log_a, log_a2, self.b)
        extra = {"ar_gain": q.ar / q.z, "kl_g2_g": q.kl_g2_g, "tv_g_g2": q.tv_g_g2,
                 "mass_b0": max(1.0 - q.ar, 0.0)}  # >= 0; round-off of AR = 1 can give -1e-16
        return CurvePoint(int(samples), int(step), exact_estimate(q.kl_g_a2), exact_estimate(q.ar), exact_estimate(q.kl_g_g2), extra)
