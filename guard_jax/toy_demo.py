"""The toy GUARD problem behind `guard-jax toy` and notebooks/theorem2_toy.ipynb.

a is a random tabular ARM, b a token-level constraint, and the proposal a' the exact ARM of the mixture
(1 - beta) a + beta h, where h = c b / Z_c is the gold distribution of *another* random ARM c: a' puts
more mass on b than a (AR rises with beta) but distorts g (KL(g||g') > 0 for beta > 0), like an imperfectly
trained proposal. Everything is exact on the grid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from guard_jax import constraints as C
from guard_jax.exact import ExactQuantities, SequenceSpace, arm_from_law, exact_constraint, exact_log_prob, exact_quantities, log_gold
from guard_jax.lm import LM
from guard_jax.models.toy import TabularARM


class ToyProblem(NamedTuple):
    a: LM
    a2: LM
    constraint: C.Constraint
    space: SequenceSpace
    exact: ExactQuantities


def toy_problem(seed: int = 0, vocab_size: int = 6, max_len: int = 6, eos: bool = True, beta: float = 0.5, scale: float = 1.5) -> ToyProblem:
    """Build (a, a', b) and their exact quantities. b: the bigram (1, 2) occurs and the first token is not 3."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1] (0: a' = a, 1: a' = g), got {beta}")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 for the demo constraint (tokens 1, 2, 3), got {vocab_size}")
    model = TabularARM(vocab_size, max_len, eos_id=0 if eos else None)
    key_a, key_c = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(key_a, scale=scale)
    constraint = C.contains_ngram([1, 2]) & ~C.token_at(0, 3)
    space = SequenceSpace.of(model, max_len)
    with jax.enable_x64(True):
        log_a = exact_log_prob(model, params, max_len)
        b = exact_constraint(space, constraint)
        log_h = log_gold(exact_log_prob(model, model.init(key_c, scale=scale), max_len), b)
        log_mix = np.logaddexp(np.log1p(-beta) + log_a, np.log(beta) + log_h) if 0 < beta < 1 else (log_a if beta == 0 else log_h)
        model2, params2 = arm_from_law(space, log_mix)
        log_a2 = exact_log_prob(model2, params2, max_len)
        exact = exact_quantities(log_a, log_a2, b)
    params2 = jax.tree.map(lambda x: np.asarray(x, np.float32), params2)
    return ToyProblem(LM.of(model, params), LM.of(model2, params2), constraint, space, exact)
