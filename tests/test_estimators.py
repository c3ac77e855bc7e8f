"""Every Monte-Carlo estimator against its exact twin: 99% CIs cover the truth in >= 95% of 200 trials."""

import math

import jax
import numpy as np
import pytest

from guard_jax import constraints as C
from guard_jax import estimators as E
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_quantities
from guard_jax.models.toy import TabularARM

TRIALS, N_A, N_A2, LEVEL = 200, 3000, 2000, 0.99


@pytest.fixture(scope="module")
def problem():
    model = TabularARM(4, 3, eos_id=0)
    with jax.enable_x64(True):
        log_a = exact_log_prob(model, model.init(jax.random.PRNGKey(11), scale=1.0), 3)
        log_a2 = exact_log_prob(model, model.init(jax.random.PRNGKey(12), scale=1.0), 3)
    b = exact_constraint(SequenceSpace.of(model, 3), C.contains_token(2))
    return log_a, log_a2, b, exact_quantities(log_a, log_a2, b)


def _draw(rng, log_p, n):
    return rng.choice(log_p.size, size=n, p=np.exp(log_p) / np.exp(log_p).sum())


def _trial(seed, log_a, log_a2, b):
    rng = np.random.default_rng(seed)
    ya, ya2 = _draw(rng, log_a, N_A), _draw(rng, log_a2, N_A2)
    ka, ka2 = int(b[ya].sum()), int(b[ya2].sum())
    g, g2 = ya[b[ya]], ya2[b[ya2]]
    z = E.estimate_ar(ka, N_A, LEVEL)
    return {
        "z": z,
        "kl_g_a": E.estimate_kl_g_a(z),
        "ar_gain": E.estimate_ar_gain(ka, N_A, ka2, N_A2, LEVEL),
        "ar": E.estimate_ar(ka2, N_A2, LEVEL),
        "kl_g_a2": E.estimate_kl_g_a2(log_a[g], log_a2[g], ka, N_A, LEVEL),
        "kl_g_g2": E.estimate_kl_g_g2(log_a[g], log_a2[g], ka, N_A, ka2, N_A2, LEVEL),
        "kl_g2_g": E.estimate_kl_g2_g(log_a2[g2], log_a[g2], ka2, N_A2, ka, N_A, LEVEL),
        "log_z_is": E.estimate_log_z_is(np.where(b[ya2], log_a[ya2], -np.inf), log_a2[ya2], LEVEL).log_z,
    }


def test_confidence_intervals_cover_the_exact_values(problem):
    log_a, log_a2, b, q = problem
    truth = {"z": q.z, "kl_g_a": q.kl_g_a, "ar_gain": q.ar / q.z, "ar": q.ar, "kl_g_a2": q.kl_g_a2, "kl_g_g2": q.kl_g_g2, "kl_g2_g": q.kl_g2_g, "log_z_is": q.log_z}
    hits = {k: 0 for k in truth}
    for seed in range(TRIALS):
        for k, est in _trial(seed, log_a, log_a2, b).items():
            hits[k] += est.contains(truth[k])
    coverage = {k: v / TRIALS for k, v in hits.items()}
    assert all(c >= 0.95 for c in coverage.values()), coverage


def test_estimates_are_consistent(problem):
    log_a, log_a2, b, q = problem
    est = _trial(12345, log_a, log_a2, b)
    # Theorem 2 holds for the estimates by construction, and the two routes to KL(g||g') agree
    assert math.isclose(est["kl_g_g2"].value, est["kl_g_a2"].value + math.log(est["ar"].value))
    ka2 = round(est["ar"].value * N_A2)
    assert E.estimate_kl_g_g2_from(est["kl_g_a2"], ka2, N_A2, LEVEL) == est["kl_g_g2"]
    # KL(g||a) = -log Z, its interval the image of Z's; the AR gain is AR_a' / Z
    assert math.isclose(est["kl_g_a"].value, -math.log(est["z"].value))
    assert math.isclose(est["kl_g_a"].lo, -math.log(est["z"].hi)) and math.isclose(est["kl_g_a"].hi, -math.log(est["z"].lo))
    assert math.isclose(est["ar_gain"].value, est["ar"].value / est["z"].value)
    assert est["ar_gain"].lo < est["ar_gain"].value < est["ar_gain"].hi
    # the intervals shrink like 1/sqrt(n): a wider level gives a wider interval
    wide = E.estimate_ar(300, 1000, 0.999)
    narrow = E.estimate_ar(300, 1000, 0.9)
    assert wide.lo < narrow.lo < 0.3 < narrow.hi < wide.hi


def test_wilson_known_values():
    # Wilson 95% for 10/100 (reference: statsmodels proportion_confint(..., method="wilson"))
    e = E.wilson(10, 100)
    assert abs(e.lo - 0.0552291) < 1e-6 and abs(e.hi - 0.1743657) < 1e-6
    assert E.wilson(0, 50).lo == 0.0 and E.wilson(50, 50).hi == 1.0


def test_importance_sampling_effective_sample_size():
    log_q = np.log(np.full(1000, 0.5))
    est = E.estimate_log_z_is(log_q, log_q)  # P = q: every weight is 1
    assert abs(est.log_z.value) < 1e-12 and abs(est.ess - 1000) < 1e-9
    est = E.estimate_log_z_is(np.r_[0.0, np.full(999, -np.inf)], np.zeros(1000))
    assert abs(est.ess - 1.0) < 1e-9


@pytest.mark.parametrize("call,name", [
    (lambda: E.estimate_ar(1, 0), "draws must be > 0"),
    (lambda: E.estimate_ar(5, 3), "accepted count"),
    (lambda: E.wilson(1, 10, level=1.5), "level"),
    (lambda: E.estimate_kl_g_a2([0.0], [0.0], 1, 10), "at least 2"),
    (lambda: E.estimate_kl_g_a2([0.0, 1.0], [0.0, -np.inf], 1, 10), "zero probability"),
    (lambda: E.estimate_log_z_is(np.full(3, -np.inf), np.zeros(3)), "every importance weight is 0"),
    (lambda: E.estimate_kl_g_a(E.estimate_ar(0, 10)), "needs Z > 0"),
    (lambda: E.estimate_ar_gain(0, 10, 3, 10), "accepted samples of both"),
    (lambda: E.estimate_kl_g_g2_from(E.Estimate(1.0, 0.5, 1.5, 0.95, 10), 0, 10), "accepted samples of a'"),
])
def test_bad_inputs(call, name):
    with pytest.raises(ValueError, match=name):
        call()
