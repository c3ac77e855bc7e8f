"""Constraints: each factory on hand-made sequences, the combinators, and the error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guard_jax import constraints as C

TOKENS = np.array([[1, 2, 3, 0], [2, 1, 0, 0], [3, 3, 3, 3], [1, 2, 0, 0]])
LENGTHS = np.array([4, 2, 4, 1])


@pytest.mark.parametrize(
    "constraint,expected",
    [
        (C.contains_token(2), [True, True, False, False]),  # row 3's 2 lies after its end
        (C.contains_ngram([1, 2]), [True, False, False, False]),
        (C.contains_ngram([3, 3, 3]), [False, False, True, False]),
        (C.token_at(0, 1), [True, False, False, True]),
        (C.token_at(3, 0), [True, False, False, False]),
        (C.token_at(9, 0), [False, False, False, False]),
        (C.regex(r"^ab", ["_", "a", "b", "c"]), [True, False, False, False]),
        (C.regex(r"c$", ["_", "a", "b", "c"]), [False, False, True, False]),
        (C.predicate(lambda t, n: np.asarray(n) >= 2, "long"), [True, True, True, False]),
        (C.contains_token(2) & C.token_at(0, 1), [True, False, False, False]),
        (C.contains_token(2) | C.token_at(0, 3), [True, True, True, False]),
        (~C.contains_token(2), [False, False, True, True]),
        (C.all_of(C.contains_token(1), C.contains_token(2), ~C.contains_token(3)), [False, True, False, False]),
        (C.any_of(C.token_at(0, 3), C.token_at(1, 1)), [False, True, True, False]),
    ],
    ids=lambda x: getattr(x, "name", None),
)
def test_constraint_values(constraint, expected):
    np.testing.assert_array_equal(np.asarray(constraint(TOKENS, LENGTHS)), expected)


def test_token_constraints_are_jittable():
    b = C.contains_ngram([1, 2]) & ~C.token_at(2, 3)
    out = jax.jit(b.fn)(jnp.asarray(TOKENS), jnp.asarray(LENGTHS))
    np.testing.assert_array_equal(out, b(TOKENS, LENGTHS))


def test_wrong_shape_or_dtype_is_reported():
    with pytest.raises(TypeError, match="'bad'.*bool array of shape"):
        C.predicate(lambda t, n: np.ones(len(n)), "bad")(TOKENS, LENGTHS)
    with pytest.raises(TypeError, match="'short'.*shape"):
        C.predicate(lambda t, n: np.ones(2, bool), "short")(TOKENS, LENGTHS)
    with pytest.raises(ValueError, match="lengths_B"):
        C.contains_token(1)(TOKENS, LENGTHS[:2])
    with pytest.raises(ValueError, match="tokens_BT"):
        C.contains_token(1)(TOKENS[0], LENGTHS)


def test_empty_constraint_sets_raise():
    with pytest.raises(ValueError, match="at least one constraint"):
        C.all_of()
    with pytest.raises(ValueError, match="at least one constraint"):
        C.any_of()
    with pytest.raises(ValueError, match="ngram"):
        C.contains_ngram([])
