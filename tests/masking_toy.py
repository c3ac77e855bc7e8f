"""The toy problem the masking, ASAp and MaskedARM tests share: a peaky tabular ARM over V=4, T=3 with EOS
and the constraint "contains 2 and does not start with 3"."""

import jax
import numpy as np

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob
from guard_jax.models.toy import TabularARM

MODEL = TabularARM(4, 3, eos_id=0)
B = C.contains_token(2) & ~C.token_at(0, 3)


def toy_problem():
    """-> (params, space, log_a float64 over the grid, b over the grid)."""
    params = MODEL.init(jax.random.PRNGKey(7), scale=1.5)
    space = SequenceSpace.of(MODEL, 3)
    with jax.enable_x64(True):
        log_a = np.asarray(exact_log_prob(MODEL, params, 3), np.float64)
    return params, space, log_a, exact_constraint(space, B)
