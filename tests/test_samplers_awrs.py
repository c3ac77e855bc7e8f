"""AWRS: the token step is properly weighted (exactly, over every walk order), and SMC with AWRS steps on the
toy grid has an unbiased Ẑ and a weighted law equal to g."""

import itertools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guard_jax.decoding import reachability_automaton
from guard_jax.samplers import awrs, awrs_from_order
from tests.samplers_toy import T, V, check_unbiased_and_properly_weighted, toy


def plackett_luce(order, q):
    """Probability that a draw without replacement from q visits the tokens in `order`."""
    p, left = 1.0, 1.0
    for v in order:
        if q[v] == 0:
            return p if np.all(q[list(order[list(order).index(v):])] == 0) else 0.0
        p, left = p * q[v] / left, left - q[v]
    return p


@pytest.mark.parametrize("seed", range(6))
def test_awrs_step_is_properly_weighted_over_every_walk_order(seed):
    rng = np.random.default_rng(seed)
    vocab = 5
    q = rng.dirichlet(np.ones(vocab))
    if seed % 2:
        q[rng.integers(vocab)] = 0.0  # a token of zero mass is never returned
        q /= q.sum()
    allowed = rng.random(vocab) < 0.5
    allowed[rng.choice(np.flatnonzero(q > 0))] = True
    orders = np.array(list(itertools.permutations(range(vocab))))
    probs = np.array([plackett_luce(o, q) for o in orders])
    assert probs.sum() == pytest.approx(1.0)
    with jax.enable_x64(True):
        log_q = jnp.broadcast_to(jnp.log(jnp.asarray(q)), (len(orders), vocab))
        token, log_w, checks = awrs_from_order(jnp.asarray(orders), log_q, jnp.broadcast_to(jnp.asarray(allowed), (len(orders), vocab)))
    token, w = np.asarray(token), np.exp(np.asarray(log_w))
    assert np.all(allowed[token[probs > 0]]) and np.all(q[token[probs > 0]] > 0)
    # the returned token is a draw of q restricted to the allowed tokens ...
    law = np.array([probs[token == v].sum() for v in range(vocab)])
    np.testing.assert_allclose(law, q * allowed / (q * allowed).sum(), atol=1e-12)
    # ... and E[W 1[x = v]] = q(v) 1[v allowed]: proper weighting, so E[W] = q(allowed)
    np.testing.assert_allclose([np.sum(probs * w * (token == v)) for v in range(vocab)], q * allowed, atol=1e-12)
    assert np.all(np.asarray(checks) >= 1) and np.all(np.asarray(checks) <= vocab)


def test_awrs_smc_is_unbiased_and_properly_weighted_for_g():
    problem = toy()
    mask = reachability_automaton(problem.space, problem.b)
    runs, particles = 3000, 4
    out = awrs(jax.random.PRNGKey(11), problem.a, problem.a2, problem.constraint, particles, mask=mask,
               max_new_tokens=T, ess_threshold=0.9, num_runs=runs)
    assert out.method == "awrs" and out.satisfied_N.all()
    check_unbiased_and_properly_weighted(problem, out, runs, particles)
    # fewer token checks than a full mask's V per generated token (and b once per particle)
    assert runs * particles < out.constraint_calls < V * out.lengths_N.sum() + runs * particles
    with pytest.raises(ValueError, match="awrs needs mask="):
        awrs(jax.random.PRNGKey(0), problem.a, problem.a2, problem.constraint, 4, mask=None, max_new_tokens=T)
