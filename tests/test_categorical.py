"""guard_jax.sampling.categorical: the two-level inverse-CDF draw is the law softmax(logits), never picks a
token of probability zero, and returns the token's log-probability."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from guard_jax.sampling import categorical

V = 300  # three blocks of 128, the last one padded


def _logits():
    logits_V = 2.0 * np.asarray(jax.random.normal(jax.random.PRNGKey(0), (V,)))
    logits_V[::7] = -np.inf  # probability zero, in every block
    logits_V[256:] = -np.inf  # the last block (tokens 256..299, padded to 128) keeps one positive token, 299
    logits_V[-1] = 1.0
    return logits_V


_draw = jax.jit(categorical)


def test_law_matches_softmax_and_skips_zero_probability_tokens():
    logits_V = _logits()
    n = 200_000
    u_B = 1.0 - jax.random.uniform(jax.random.PRNGKey(1), (n,))
    token_B, logp_B = _draw(u_B, jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, V)))
    counts_V = np.bincount(np.asarray(token_B), minlength=V)
    p_V = np.exp(logits_V.astype(np.float64) - logits_V.max())
    p_V /= p_V.sum()
    assert counts_V[p_V == 0].sum() == 0
    # chi-square on tokens with enough expected counts, the rest pooled
    big = p_V * n >= 20
    observed = np.append(counts_V[big], counts_V[~big].sum())
    expected = np.append(p_V[big], p_V[~big].sum()) * n
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    np.testing.assert_allclose(np.asarray(logp_B), np.log(p_V[np.asarray(token_B)]), atol=2e-6)


def test_matches_float64_inverse_cdf_and_the_ends():
    logits_BV = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (512, 1000))
    u_B = 1.0 - jax.random.uniform(jax.random.PRNGKey(3), (512,))
    token_B, _ = _draw(u_B, logits_BV)
    p = np.exp(np.asarray(logits_BV, np.float64))
    cdf = np.cumsum(p / p.sum(1, keepdims=True), 1)
    reference_B = np.minimum((cdf < np.asarray(u_B, np.float64)[:, None]).sum(1), 999)
    assert np.mean(np.asarray(token_B) == reference_B) > 0.99  # the rest: float32 rounding at a boundary
    # u = 1 -> the last token of positive probability; u -> 0 -> the first one
    logits_V = jnp.asarray(_logits(), jnp.float32)
    ends, _ = _draw(jnp.array([1.0, 1e-30]), jnp.stack([logits_V, logits_V]))
    positive = np.flatnonzero(np.isfinite(_logits()))
    assert ends.tolist() == [positive[-1], positive[0]]


def test_masked_rows_and_small_vocabularies():
    logits_BV = jnp.log(jnp.array([[0.0, 0.25, 0.0, 0.75], [1.0, 0.0, 0.0, 0.0]]))
    token_B, logp_B = _draw(jnp.array([0.3, 0.9]), logits_BV)
    assert token_B.tolist() == [3, 0]
    np.testing.assert_allclose(np.asarray(logp_B), np.log([0.75, 1.0]), atol=1e-7)


def test_non_finite_rows_are_marked_at_full_vocabulary_size():
    """The finiteness test reads the total, not the logits: a NaN or +inf anywhere in the row (here far from
    the drawn block) or a row of -inf makes its logp NaN; the finite rows keep their exact log-probabilities."""
    V = 8192
    logits_BV = np.array(jax.random.normal(jax.random.PRNGKey(4), (5, V)), np.float32)
    logits_BV[:, :128] += 8.0  # the mass sits in block 0, so the draws land there
    logits_BV[1, 5000] = np.nan
    logits_BV[2, 7000] = np.inf
    logits_BV[3] = -np.inf
    logits_BV[4, ::3] = -np.inf
    token_B, logp_B = _draw(jnp.full((5,), 0.4), jnp.asarray(logits_BV))
    logp_B = np.asarray(logp_B)
    assert np.isnan(logp_B[1:4]).all() and np.isfinite(logp_B[[0, 4]]).all()
    for row in (0, 4):
        x = logits_BV[row].astype(np.float64)
        expected = x[int(token_B[row])] - x.max() - np.log(np.exp(x - x.max()).sum())
        np.testing.assert_allclose(logp_B[row], expected, atol=2e-6)
    assert np.isfinite(logits_BV[4, int(token_B[4])])
