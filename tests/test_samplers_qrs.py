"""QRS: the sampler's law is the closed form min(P, β a′) / (β AR_β), and that closed form's distance to g."""

import math

import jax
import numpy as np
import pytest

from guard_jax.estimators import wilson
from guard_jax.exact import exact_quantities
from guard_jax.samplers import qrs, qrs_exact
from tests.samplers_toy import chi_square_p, toy


@pytest.fixture(scope="module")
def problem():
    return toy()


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_qrs_samples_follow_the_closed_form_law(problem, beta):
    ex = qrs_exact(problem.log_a, problem.log_a2, problem.b, beta)
    out = qrs(jax.random.PRNGKey(1), problem.a, problem.a2, problem.constraint, 2000, beta=beta, max_new_tokens=4,
              batch_size=2048)
    assert out.method == "qrs" and out.log_weights_N is None and out.satisfied_N.all()
    assert np.all(problem.b[problem.index(out.tokens_NT)])
    assert chi_square_p(problem.index(out.tokens_NT), np.exp(ex.log_law)) > 1e-3
    draws = out.info["draws"]
    assert wilson(round(out.acceptance_rate * draws), draws, 0.999).contains(ex.acceptance_rate)
    assert out.model_calls == 2 * draws  # a′ draws them, a scores them
    # the importance-sampling log Z over every draw: within 4 standard errors of the exact Z
    w = problem.ratio
    se = math.sqrt(np.sum(np.exp(problem.log_a2) * (w - w @ np.exp(problem.log_a2)) ** 2) / draws)
    z = math.exp(exact_quantities(problem.log_a, problem.log_a2, problem.b).log_z)
    assert abs(math.exp(out.log_z) - z) < 4 * se


def test_qrs_exact_law_runs_from_guard_to_g_as_beta_grows(problem):
    p = problem
    betas = np.geomspace(1e-3, 100.0, 30)
    rows = [qrs_exact(p.log_a, p.log_a2, p.b, float(beta)) for beta in betas]
    ar, tv, kl = (np.array([getattr(r, f) for r in rows]) for f in ("acceptance_rate", "tv", "kl_g_law"))
    assert np.all(np.diff(ar) <= 1e-12) and np.all(np.diff(tv) <= 1e-12) and np.all(np.diff(kl) <= 1e-12)
    # the acceptance rate is E_a′[min(1, P / (β a′))]
    for beta, r in zip(betas, rows):
        direct = np.sum(np.exp(p.log_a2) * np.minimum(1.0, p.ratio / beta))
        assert r.acceptance_rate == pytest.approx(direct, rel=1e-10)
    # beta below min P/a′ on the support: the GUARD law g′; above max P/a′: g itself, at AR = Z / beta
    q = exact_quantities(p.log_a, p.log_a2, p.b)
    ratio = p.ratio[p.b]
    low, high = qrs_exact(p.log_a, p.log_a2, p.b, 0.99 * ratio.min()), qrs_exact(p.log_a, p.log_a2, p.b, ratio.max())
    assert low.acceptance_rate == pytest.approx(q.ar, rel=1e-6)  # exact_quantities sums in float32
    assert low.tv == pytest.approx(q.tv_g_g2, abs=1e-6) and low.kl_g_law == pytest.approx(q.kl_g_g2, abs=1e-6)
    assert high.tv < 1e-6 and abs(high.kl_g_law) < 1e-6 and abs(high.kl_law_g) < 1e-6  # log_gold normalises in float32
    assert high.acceptance_rate == pytest.approx(q.z / ratio.max(), rel=1e-6)


def test_qrs_at_a_large_beta_samples_g(problem):
    p = problem
    beta = 1.01 * float(p.ratio[p.b].max())  # margin: the LM holds float32 params
    out = qrs(jax.random.PRNGKey(2), p.a, p.a2, p.constraint, 2000, beta=beta, max_new_tokens=4, batch_size=2048)
    assert out.info["clipped_fraction"] == 0.0
    assert chi_square_p(p.index(out.tokens_NT), np.exp(p.log_g)) > 1e-3


def test_qrs_stops_at_its_budget_and_rejects_a_bad_beta(problem):
    p = problem
    out = qrs(jax.random.PRNGKey(3), p.a, p.a2, p.constraint, 10**6, beta=1.0, max_new_tokens=4, batch_size=256,
              max_draws=600)
    assert out.info["draws"] == 600 and out.info["exhausted"] and out.num_samples < 600
    with pytest.raises(ValueError, match="beta must be > 0"):
        qrs(jax.random.PRNGKey(3), p.a, p.a2, p.constraint, 10, beta=0.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        qrs(jax.random.PRNGKey(3), p.a, p.a2, p.constraint, 0, beta=1.0, max_new_tokens=4)
