"""IMH: the transition matrix by enumeration has g as its stationary law, and the chains' law after k rounds
from GUARD starts is g′ K^k (chi-square)."""

import jax
import numpy as np
import pytest

from guard_jax.samplers import guard_start, imh, imh_exact
from tests.samplers_toy import chi_square_p, toy


@pytest.fixture(scope="module")
def problem():
    return toy()


def test_imh_matrix_is_stochastic_with_g_stationary_and_converges_to_g(problem):
    p = problem
    ex = imh_exact(p.log_a, p.log_a2, p.b)
    g = np.exp(ex.log_g_K)
    assert np.all(ex.K_KK >= 0) and np.allclose(ex.K_KK.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(g @ ex.K_KK, g, atol=1e-12)
    # detailed balance, g(y) K(y, y′) = g(y′) K(y′, y)
    flow = g[:, None] * ex.K_KK
    np.testing.assert_allclose(flow, flow.T, atol=1e-12)
    start = np.exp(p.log_a2[ex.support_K]) / np.exp(p.log_a2[ex.support_K]).sum()  # g′ = a′b / AR
    tv = [0.5 * np.abs(ex.law_after(start, k) - g).sum() for k in (0, 1, 5, 50, 2000)]
    assert tv[0] > 0.1 and all(x > y for x, y in zip(tv, tv[1:])) and tv[-1] < 1e-3


@pytest.mark.parametrize("steps", [2, 5])
def test_imh_chains_follow_the_matrix_power_from_guard_starts(problem, steps):
    p = problem
    ex = imh_exact(p.log_a, p.log_a2, p.b)
    out = imh(jax.random.PRNGKey(steps), p.a, p.a2, p.constraint, 3000, num_steps=steps, max_new_tokens=4, batch_size=3000)
    assert out.method == "imh" and out.satisfied_N.all() and np.all(p.b[p.index(out.tokens_NT)])
    start = np.exp(p.log_a2[ex.support_K]) / np.exp(p.log_a2[ex.support_K]).sum()
    law = np.zeros(p.space.size)
    law[ex.support_K] = ex.law_after(start, steps)
    assert chi_square_p(p.index(out.tokens_NT), law) > 1e-3
    # and not the starting law g′: the test sees the moves
    before = np.zeros(p.space.size)
    before[ex.support_K] = start
    assert chi_square_p(p.index(out.tokens_NT), before) < 1e-3
    init_draws = out.info["init_draws"]
    assert out.model_calls == init_draws + 3000 + 2 * 3000 * steps  # GUARD draws, their scores, proposals and scores


def test_imh_from_given_starts_and_its_errors(problem):
    p = problem
    tokens, lengths, _, _ = guard_start(jax.random.PRNGKey(0), p.a2, p.constraint, 64, max_new_tokens=4, batch_size=64)
    out = imh(jax.random.PRNGKey(1), p.a, p.a2, p.constraint, 64, num_steps=2, max_new_tokens=4, init=(tokens, lengths))
    assert out.info["init_draws"] == 0 and len(out.info["acceptance_by_step"]) == 2 and 0 < out.acceptance_rate < 1
    bad = tokens.copy()
    bad[:, :] = 0  # EOS first: b fails
    with pytest.raises(ValueError, match="b = 0"):
        imh(jax.random.PRNGKey(1), p.a, p.a2, p.constraint, 64, num_steps=1, max_new_tokens=4, init=(bad, lengths * 0 + 1))
    with pytest.raises(ValueError, match="init must be"):
        imh(jax.random.PRNGKey(1), p.a, p.a2, p.constraint, 32, num_steps=1, max_new_tokens=4, init=(tokens, lengths))
    with pytest.raises(ValueError, match="max_init_draws"):
        imh(jax.random.PRNGKey(1), p.a, p.a2, p.constraint, 64, num_steps=1, max_new_tokens=4, max_init_draws=10)
