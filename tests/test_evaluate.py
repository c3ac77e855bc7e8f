"""guard_jax.evaluate against exact answers on a toy ARM: every Monte-Carlo estimate's CI holds the exact value,
the gold samples are drawn once and reused, monte_carlo = draw_gold + evaluate_proposal, and the two curve
evaluators (Monte Carlo on gold, exact by enumeration) agree within the Monte-Carlo intervals."""

import math

import jax
import numpy as np
import pytest

from guard_jax import evaluate as ev
from guard_jax.metrics.diversity import common_set_size, diversity_report
from guard_jax.metrics.position import position_report
from guard_jax.toy_demo import toy_problem

LEVEL = 0.99


@pytest.fixture(scope="module")
def toy():
    return toy_problem(seed=1, vocab_size=5, max_len=5, beta=0.5)


@pytest.fixture(scope="module")
def gold(toy):
    return ev.draw_gold(jax.random.PRNGKey(0), toy.a, toy.constraint, 40_000, max_new_tokens=5, batch_size=8192, progress=False)


def test_gold_is_the_b_filtered_draws_of_a(toy, gold):
    assert gold.draws == 40_000 and gold.accepted == len(gold.tokens_NT) == len(gold.logp_a_N) >= 2
    assert np.asarray(toy.constraint(gold.tokens_NT, gold.lengths_N)).all()
    assert gold.z.contains(toy.exact.z) and gold.kl_g_a.contains(toy.exact.kl_g_a)
    assert math.isclose(gold.kl_g_a.value, -math.log(gold.z.value))
    with pytest.raises(ValueError, match="raise n"):
        ev.draw_gold(jax.random.PRNGKey(0), toy.a, toy.constraint, 3, max_new_tokens=5, progress=False)


def test_evaluate_proposal_intervals_hold_the_exact_values(toy, gold):
    e = ev.evaluate_proposal(jax.random.PRNGKey(1), gold, toy.a, toy.a2, toy.constraint, 20_000, batch_size=8192, level=LEVEL,
                             progress=False)
    x = toy.exact
    exact = {"z": x.z, "ar": x.ar, "ar_gain": x.ar / x.z, "kl_g_a": x.kl_g_a, "kl_g_a2": x.kl_g_a2, "kl_g_g2": x.kl_g_g2, "kl_g2_g": x.kl_g2_g}
    for name, value in exact.items():
        est = getattr(e, name)
        assert est.contains(value), (name, est, value)
    assert e.draws == 20_000 and e.accepted == len(e.tokens_NT) and np.asarray(toy.constraint(e.tokens_NT, e.lengths_N)).all()
    d = e.to_dict()
    assert set(d) == {"Z", "AR_a2", "AR_gain", "KL(g||a)", "KL(g||a2)", "KL(g||g2)", "KL(g2||g)"}
    assert d["KL(g||a2)"] == {"value": e.kl_g_a2.value, "lo": e.kl_g_a2.lo, "hi": e.kl_g_a2.hi, "level": LEVEL, "n": e.kl_g_a2.n}


def test_gold_is_reused_not_redrawn(toy, gold):
    """Two evaluations with different keys share Z and KL(g||a') exactly (both come from the gold set alone)."""
    e1, e2 = (ev.evaluate_proposal(jax.random.PRNGKey(k), gold, toy.a, toy.a2, toy.constraint, 512, progress=False) for k in (1, 2))
    assert e1.z == e2.z == gold.z and e1.kl_g_a2 == e2.kl_g_a2
    assert e1.ar != e2.ar  # the draws of a' are fresh


def test_monte_carlo_is_draw_gold_then_evaluate_proposal(toy):
    key = jax.random.PRNGKey(7)
    mc = ev.monte_carlo(key, toy.a, toy.a2, toy.constraint, max_new_tokens=5, n_a=4096, n_a2=1024, progress=False)
    ka, ka2 = jax.random.split(key)
    g = ev.draw_gold(ka, toy.a, toy.constraint, 4096, max_new_tokens=5, progress=False)
    e = ev.evaluate_proposal(ka2, g, toy.a, toy.a2, toy.constraint, 1024, progress=False)
    assert mc.to_dict() == e.to_dict()
    with pytest.raises(ValueError, match="raise n_a2"):
        ev.monte_carlo(key, toy.a, toy.a2, toy.constraint, max_new_tokens=5, n_a=4096, n_a2=1, progress=False)


def test_few_samples_of_g2_leave_estimates_out(toy, gold):
    e = ev.evaluate_proposal(jax.random.PRNGKey(3), gold, toy.a, toy.a, toy.constraint, 1, progress=False)
    assert e.accepted in (0, 1) and e.kl_g2_g is None
    assert (e.ar_gain is None) == (e.accepted == 0) and (e.kl_g_g2 is None) == (e.accepted == 0)


def test_exact_evaluator_is_the_exact_quantities(toy):
    exact = ev.ExactEvaluator(toy.a, toy.constraint, 5)
    start = exact.start()
    assert (start.samples, start.step) == (0, 0) and abs(start.kl_g_g2.value) < 1e-12
    assert math.isclose(start.kl_g_a2.value, -math.log(toy.exact.z), rel_tol=1e-9) and math.isclose(start.ar.value, toy.exact.z, rel_tol=1e-9)
    p = exact.point(toy.a2, 100, 3)
    x = toy.exact
    assert (p.samples, p.step) == (100, 3)
    for got, want in ((p.kl_g_a2, x.kl_g_a2), (p.ar, x.ar), (p.kl_g_g2, x.kl_g_g2)):
        assert got.lo == got.value == got.hi and math.isclose(got.value, want, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(p.extra["kl_g2_g"], x.kl_g2_g, rel_tol=1e-6) and math.isclose(p.extra["ar_gain"], x.ar / x.z, rel_tol=1e-6)
    assert math.isclose(p.kl_g_a2.value, -math.log(p.ar.value) + p.kl_g_g2.value, rel_tol=1e-9)  # Theorem 2
    assert ev.CurvePoint.from_dict(p.to_dict()) == p


def test_monte_carlo_curve_points_hold_the_exact_ones(toy, gold):
    mc = ev.MonteCarloEvaluator(gold, toy.constraint, 20_000, batch_size=8192)
    exact = ev.ExactEvaluator(toy.a, toy.constraint, 5)
    start = mc.start()
    assert start.ar == gold.z and start.kl_g_a2 == gold.kl_g_a and start.kl_g_g2.value == 0.0
    p, q = mc.point(toy.a2, 10, 1, jax.random.PRNGKey(4)), exact.point(toy.a2, 10, 1)
    for name in ("kl_g_a2", "ar", "kl_g_g2"):
        assert getattr(p, name).contains(getattr(q, name).value), name


def test_diversity_at_one_set_size():
    assert common_set_size([100, 37, 5, 1000], n_max=50, min_set=20) == 37
    assert common_set_size([3, 5], n_max=50, min_set=20) is None
    texts = [f"the cat number {i} sat on the mat" for i in range(40)]
    r = diversity_report(texts, 20, semantic=False)
    assert r["n"] == 40 and r["self_bleu_set"] == 20 and set(r["self_bleu"]) == {"2", "3", "4", "5"} and r["semantic_note"] == "disabled"
    assert diversity_report(texts[:10], 20, semantic=False)["self_bleu"] is None
    assert diversity_report(texts[:1], 20)["self_bleu_note"] == "fewer than 2 samples"


def test_position_report():
    r = position_report(np.array([0.05, np.nan, 0.55, 0.56]))
    assert r["positions"] == [0.05, 0.55, 0.56] and r["matched"] == 3 and r["total"] == 4
    assert len(r["fractions"]) == 10 and r["fractions"][0] == pytest.approx(1 / 3) and r["fractions"][5] == pytest.approx(2 / 3)


def test_public_names():
    import guard_jax as gj
    from guard_jax import lm, proposals, rejection, sampling

    assert gj.LM is lm.LM and gj.draw is sampling.draw and gj.score is sampling.score and gj.guard_sample is rejection.guard_sample
    assert gj.draw_gold is ev.draw_gold and gj.evaluate_proposal is ev.evaluate_proposal and gj.monte_carlo is ev.monte_carlo
    assert gj.Evaluation is ev.Evaluation and gj.proposals is proposals and gj.proposals.warm_start_dpg is proposals.warm_start_dpg
    assert {"constraints", "estimators", "exact", "config"} <= set(dir(gj))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gj.nope  # noqa: B018
