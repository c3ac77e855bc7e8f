"""The GUARD sampler: draw y ~ a' in batches until `num_samples` satisfy b, within a draw budget.

Its output law is g'(y) = a'(y) b(y) / AR_a'; every returned sample satisfies b (checked again before
returning). When the budget runs out first, `BudgetExhausted` reports what was measured.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from guard_jax.constraints import Constraint
from guard_jax.estimators import Estimate, estimate_ar
from guard_jax.models.base import ARM, Params
from guard_jax.sampling import bos_prompt, check_finite_logp, sample


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
    model: ARM,
    params: Params,
    constraint: Constraint,
    num_samples: int,
    *,
    max_new_tokens: int,
    batch_size: int = 1024,
    max_draws: int = 10**7,
    prompt: tuple[jax.Array, jax.Array] | None = None,
    progress: bool = True,
) -> GuardResult:
    """Rejection-sample `num_samples` sequences of a' that satisfy b.

    `prompt` is (tokens_1P, mask_1P), repeated for every row; default [BOS]. Draws are made in batches of
    `batch_size`; at most `max_draws` in all. The same key gives the same samples.
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("max_draws", max_draws), ("max_new_tokens", max_new_tokens)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if prompt is None:
        prompt_BP, mask_BP = bos_prompt(model, batch_size)
    else:
        tokens, mask = (jnp.asarray(x, jnp.int32) for x in prompt)
        if tokens.ndim != 2 or tokens.shape[0] != 1 or mask.shape != tokens.shape:
            raise ValueError(f"prompt must be (tokens_1P, mask_1P) with one row, got shapes {tokens.shape} and {mask.shape}")
        prompt_BP, mask_BP = jnp.repeat(tokens, batch_size, 0), jnp.repeat(mask, batch_size, 0)
    kept_tokens, kept_lengths, kept_logp = [], [], []
    draws = accepted = 0
    bar = tqdm(total=num_samples, desc="GUARD sampling", unit="sample", disable=not progress)
    batch_index = 0
    while accepted < num_samples and draws < max_draws:
        s = sample(jax.random.fold_in(key, batch_index), model, params, prompt_BP, mask_BP, max_new_tokens)
        batch_index += 1
        take = min(batch_size, max_draws - draws)
        check_finite_logp(np.asarray(s.logp_B)[:take], f"GUARD sampler, proposal {type(model).__name__} (batch {batch_index - 1})")
        tokens, lengths = np.asarray(s.tokens_BT)[:take], np.asarray(s.lengths_B)[:take]
        ok = np.asarray(constraint(tokens, lengths))
        draws += take
        accepted += int(ok.sum())
        kept_tokens.append(tokens[ok])
        kept_lengths.append(lengths[ok])
        kept_logp.append(np.asarray(s.logp_B)[:take][ok])
        bar.update(min(int(ok.sum()), num_samples - bar.n))
        bar.set_postfix(draws=draws, ar=f"{accepted / draws:.3g}")
    bar.close()
    ar = estimate_ar(accepted, draws)
    if accepted < num_samples:
        raise BudgetExhausted(draws, accepted, num_samples, ar)
    tokens_NT = np.concatenate(kept_tokens)[:num_samples]
    lengths_N = np.concatenate(kept_lengths)[:num_samples]
    if not np.all(np.asarray(constraint(tokens_NT, lengths_N))):
        raise AssertionError(f"constraint {constraint.name} is not deterministic: an accepted sample now fails it")
    return GuardResult(tokens_NT, lengths_N, np.concatenate(kept_logp)[:num_samples], draws, accepted, ar)


def expected_draws(ar: float) -> float:
    """Expected proposal draws per accepted sample, 1 / AR."""
    return math.inf if ar <= 0 else 1.0 / ar
