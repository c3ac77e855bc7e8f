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
    (lambda: E.estimate_ar_gain(0, 10, 3, 10), "accepted_a = 0 of draws_a = 10"),
    (lambda: E.estimate_kl_g_g2_from(E.Estimate(1.0, 0.5, 1.5, 0.95, 10), 0, 10), "accepted_a2 = 0 of draws_a2 = 10"),
])
def test_bad_inputs(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("call,count,fix", [
    (lambda: E.estimate_kl_g_a2(np.zeros(5), np.ones(5), 0, 100), "accepted_a = 0", "raise draws_a"),
    (lambda: E.estimate_kl_g_g2(np.zeros(5), np.ones(5), 5, 100, 0, 100), "accepted_a2 = 0", "raise draws_a2"),
    (lambda: E.estimate_kl_g2_g(np.zeros(5), np.ones(5), 5, 100, 0, 100), "accepted_a = 0", "raise draws_a"),
])
def test_zero_accepted_counts_name_the_count_and_the_fix(call, count, fix):
    with pytest.raises(ValueError, match=f"{count} of .* draws satisfied b.*{fix}"):
        call()


def test_kl_intervals_are_clipped_at_zero():
    # 3 samples of g whose log-ratio mean is about 0 and AR_a' close to Z: the interval would reach below 0
    rng = np.random.default_rng(0)
    for seed in range(20):
        x = np.random.default_rng(seed).normal(0, 1, 3)
        for est in (E.estimate_kl_g_a2(x, np.zeros(3), 999, 1000), E.estimate_kl_g_g2(x, np.zeros(3), 3, 1000, 3, 1000),
                    E.estimate_kl_g2_g(x, np.zeros(3), 3, 1000, 3, 1000)):
            assert 0.0 <= est.lo <= est.value <= est.hi, est
    unclipped = E.add_intervals([E.mean_interval(rng.normal(0, 1, 3)), E.log_proportion_interval(3, 1000)], 0.95, 3)
    assert unclipped.lo < 0 and E.nonnegative(unclipped).lo == 0.0


def test_mover_sum_of_normal_parts_is_the_normal_interval():
    z = 1.959963984540054
    parts = [E.Interval(1.0, 1.0 - z * 0.3, 1.0 + z * 0.3), E.Interval(-2.0, -2.0 - z * 0.4, -2.0 + z * 0.4)]
    est = E.add_intervals(parts, 0.95, 10)
    assert math.isclose(est.value, -1.0) and math.isclose(est.hi - est.value, z * 0.5) and math.isclose(est.value - est.lo, z * 0.5)


def test_log_proportion_interval_is_the_log_of_wilson():
    w, iv = E.wilson(3, 1000), E.log_proportion_interval(3, 1000)
    assert np.allclose(np.exp(iv), [w.value, w.lo, w.hi])
    assert iv.value - iv.lo > iv.hi - iv.value  # longer on the low side when few were accepted


def test_bootstrap_t_widens_toward_the_skewed_tail():
    # means of 15 lognormal samples: the t-interval misses the true mean mostly from below; bootstrap-t
    # moves its upper bound out and covers more often (McNemar: the discordant trials favour it beyond 2.58 sd)
    mu, trials, t = math.exp(0.5), 400, 2.1447866879169273
    only_b = only_t = up = 0
    for seed in range(trials):
        x = np.random.default_rng(seed).lognormal(0, 1, 15)
        iv = E.mean_interval(x)
        hit_t = abs(x.mean() - mu) <= t * x.std(ddof=1) / math.sqrt(15)
        hit_b = iv.lo <= mu <= iv.hi
        only_b, only_t = only_b + (hit_b and not hit_t), only_t + (hit_t and not hit_b)
        up += (iv.hi - iv.value) > (iv.value - iv.lo)
    assert up > 0.9 * trials
    assert only_b - only_t > 2.58 * math.sqrt(only_b + only_t), (only_b, only_t)
    c = E.mean_interval(np.full(5, 2.0))
    assert c == (2.0, 2.0, 2.0)
    assert E.mean_interval(x) == E.mean_interval(x)  # fixed seed: the same samples give the same interval


def regime_few_accepted():
    """Toy V = 6, T = 6 (EOS 0): Z = 0.0040, KL(g||a') = 32.0, AR_a' = 0.111; N_a, N_a' chosen for about 19
    accepted samples of a and of a' -> (log a, log a', b, exact quantities, N_a, N_a')."""
    model = TabularARM(6, 6, eos_id=0)
    b = exact_constraint(SequenceSpace.of(model, 6), C.contains_ngram([1, 2]) & ~C.token_at(0, 3))
    with jax.enable_x64(True):
        log_a = exact_log_prob(model, model.init(jax.random.PRNGKey(3), scale=2.15), 6)
        log_a2 = exact_log_prob(model, model.init(jax.random.PRNGKey(100), scale=6.0), 6)
    q = exact_quantities(log_a, log_a2, b)
    return log_a, log_a2, b, q, int(19 / q.z), int(19 / q.ar)


def coverage_few_accepted(seeds: int) -> dict:
    """Coverage of the 95% intervals of KL(g||a') and KL(g||g') over `seeds` Monte-Carlo runs in
    `regime_few_accepted`, and how many misses lie on each side."""
    log_a, log_a2, b, q, n_a, n_a2 = regime_few_accepted()
    out = {k: {"hits": 0, "exact_below": 0, "exact_above": 0} for k in ("kl_g_a2", "kl_g_g2")}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        ya, ya2 = _draw(rng, log_a, n_a), _draw(rng, log_a2, n_a2)
        ka, ka2 = int(b[ya].sum()), int(b[ya2].sum())
        g = ya[b[ya]]
        for name, est, truth in (("kl_g_a2", E.estimate_kl_g_a2(log_a[g], log_a2[g], ka, n_a), q.kl_g_a2),
                                 ("kl_g_g2", E.estimate_kl_g_g2(log_a[g], log_a2[g], ka, n_a, ka2, n_a2), q.kl_g_g2)):
            key = "hits" if est.contains(truth) else ("exact_below" if truth < est.lo else "exact_above")
            out[name][key] += 1
    return out


def test_regime_few_accepted_is_the_one_described():
    _, _, _, q, n_a, n_a2 = regime_few_accepted()
    assert 0.0035 < q.z < 0.0045 and 31 < q.kl_g_a2 < 33 and 19 / q.z == pytest.approx(n_a, abs=1)
    out = coverage_few_accepted(20)  # the default suite runs the measurement on a few seeds
    assert all(sum(v.values()) == 20 for v in out.values())


@pytest.mark.slow
def test_intervals_cover_with_few_accepted_samples():
    """600 seeds, about 19 accepted samples of a and a': the 95% intervals cover >= 0.93 (measured: 0.955 and
    0.950; the delta-method normal intervals they replace covered 0.928 and 0.922)."""
    seeds = 600
    out = coverage_few_accepted(seeds)
    coverage = {k: v["hits"] / seeds for k, v in out.items()}
    assert all(c >= 0.93 for c in coverage.values()), out
