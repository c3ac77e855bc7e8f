"""The GUARD sampler: draw y ~ a' in batches until `num_samples` satisfy b, within a draw budget.

Its output law is g'(y) = a'(y) b(y) / AR_a'; every returned sample satisfies b (checked again before
returning). When the budget runs out first, `BudgetExhausted` reports what was measured.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from guard_jax.constraints import Constraint
from guard_jax.estimators import Estimate, estimate_ar
from guard_jax.lm import LM
from guard_jax.sampling import Draws, draw_batches


class GuardResult(NamedTuple):
    """Accepted samples (tokens_NT, lengths_N, logp_N under a') and the acceptance statistics."""

    tokens_NT: np.ndarray
    lengths_N: np.ndarray
    logp_N: np.ndarray
    draws: int
    accepted: int
    ar: Estimate


class BudgetExhausted(RuntimeError):
    """The draw budget was spent before `num_samples` samples satisfied the constraint."""

    def __init__(self, draws: int, accepted: int, target: int, ar: Estimate):
        self.draws, self.accepted, self.target, self.ar = draws, accepted, target, ar
        still = target - accepted
        need = f"about {still / ar.value:,.0f} more draws" if ar.value > 0 else f"at least {still / max(ar.hi, 1e-300):,.0f} more draws (upper CI bound)"
        super().__init__(
            f"draw budget exhausted: {draws:,} draws gave {accepted:,} of the {target:,} samples asked for; "
            f"AR estimate {ar.value:.3g} (95% CI [{ar.lo:.3g}, {ar.hi:.3g}]); {need} expected to reach the target. "
            f"Raise max_draws or use a better proposal a'."
        )


def guard_sample(
    key: jax.Array,
    lm: LM,
    constraint: Constraint,
    num_samples: int,
    *,
    max_new_tokens: int,
    batch_size: int = 1024,
    max_draws: int = 10**7,
    progress: bool = True,
) -> GuardResult:
    """Rejection-sample `num_samples` sequences of the proposal `lm` (a', with its prompt) that satisfy b.

    Draws come from `sampling.draw_batches(key, lm, batch_size, max_new_tokens)`, at most `max_draws` in
    all (the last batch trimmed to the budget). The same key gives the same samples.
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("max_draws", max_draws), ("max_new_tokens", max_new_tokens)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    kept: list[Draws] = []
    draws = accepted = 0
    bar = tqdm(total=num_samples, desc="GUARD sampling", unit="sample", disable=not progress)
    for batch in draw_batches(key, lm, batch_size, max_new_tokens):
        take = min(batch_size, max_draws - draws)
        batch = Draws(*(x[:take] for x in batch))
        ok = np.asarray(constraint(batch.tokens_NT, batch.lengths_N), bool)
        draws += take
        accepted += int(ok.sum())
        kept.append(Draws(*(x[ok] for x in batch)))
        bar.update(min(int(ok.sum()), num_samples - bar.n))
        bar.set_postfix(draws=draws, ar=f"{accepted / draws:.3g}")
        if accepted >= num_samples or draws >= max_draws:
            break
    bar.close()
    ar = estimate_ar(accepted, draws)
    if accepted < num_samples:
        raise BudgetExhausted(draws, accepted, num_samples, ar)
    tokens_NT, lengths_N, logp_N = (np.concatenate(x)[:num_samples] for x in zip(*kept))
    if not np.all(np.asarray(constraint(tokens_NT, lengths_N))):
        raise AssertionError(f"constraint {constraint.name} is not deterministic: an accepted sample now fails it")
    return GuardResult(tokens_NT, lengths_N, logp_N, draws, accepted, ar)


def expected_draws(ar: float) -> float:
    """Expected proposal draws per accepted sample, 1 / AR."""
    return math.inf if ar <= 0 else 1.0 / ar
