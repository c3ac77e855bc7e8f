"""The GUARD sampler: its law is g, it never returns b = 0, and its budget error says what it measured."""

import jax
import numpy as np
import pytest

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, log_gold
from guard_jax.lm import LM
from guard_jax.models.toy import TabularARM
from guard_jax.rejection import BudgetExhausted, guard_sample
from guard_jax.sampling import bos_prompt, sample
from tests.test_exact import _chi_square_ok

MODEL = TabularARM(4, 3, eos_id=0)
B = C.contains_token(2) & ~C.token_at(0, 3)


@pytest.fixture(scope="module")
def toy():
    params = MODEL.init(jax.random.PRNGKey(7), scale=1.0)
    space = SequenceSpace.of(MODEL, 3)
    with jax.enable_x64(True):
        log_a = exact_log_prob(MODEL, params, 3)
    b = exact_constraint(space, B)
    return params, space, log_a, b


def test_accepted_samples_follow_g(toy):
    params, space, log_a, b = toy
    r = guard_sample(jax.random.PRNGKey(0), LM.of(MODEL, params), B, 20_000, max_new_tokens=3, batch_size=4096, progress=False)
    assert r.tokens_NT.shape == (20_000, 3) and r.accepted >= 20_000
    index = space.index(r.tokens_NT)
    assert np.all(b[index])
    _chi_square_ok(index, np.exp(log_gold(log_a, b)))
    np.testing.assert_allclose(r.logp_N, log_a[index], atol=1e-5)
    z = np.exp(log_a[b]).sum()
    assert r.ar.lo <= z <= r.ar.hi


def test_a_million_draws_never_return_a_violation(toy):
    params, space, log_a, b = toy
    z = np.exp(log_a[b]).sum()
    r = guard_sample(jax.random.PRNGKey(1), LM.of(MODEL, params), B, int(0.99 * z * 1_000_000), max_new_tokens=3,
                     batch_size=1 << 16, progress=False)
    assert r.draws >= 900_000
    assert np.all(b[space.index(r.tokens_NT)])


def test_same_key_same_samples(toy):
    params = toy[0]
    run = lambda: guard_sample(jax.random.PRNGKey(3), LM.of(MODEL, params), B, 50, max_new_tokens=3, batch_size=64, progress=False)
    np.testing.assert_array_equal(run().tokens_NT, run().tokens_NT)


def test_accepted_samples_are_the_filtered_batches_of_fold_in_keys(toy):
    """Batch i is `sample(fold_in(key, i))`; the accepted rows are its b-satisfying rows, in order."""
    params = toy[0]
    key = jax.random.PRNGKey(5)
    r = guard_sample(key, LM.of(MODEL, params), B, 300, max_new_tokens=3, batch_size=64, progress=False)
    rows, i = [], 0
    while sum(len(t) for t, _ in rows) < 300:
        s = sample(jax.random.fold_in(key, i), MODEL, params, *bos_prompt(MODEL, 64), 3)
        ok = np.asarray(B(s.tokens_BT, s.lengths_B))
        rows.append((np.asarray(s.tokens_BT)[ok], np.asarray(s.logp_B)[ok]))
        i += 1
    np.testing.assert_array_equal(r.tokens_NT, np.concatenate([t for t, _ in rows])[:300])
    np.testing.assert_array_equal(r.logp_N, np.concatenate([lp for _, lp in rows])[:300])
    assert r.draws == 64 * i


def test_samples_condition_on_the_lm_prompt():
    """A prompted LM samples a(y | prompt): its acceptance rate is the exact conditional Z."""
    model = TabularARM(4, 4, eos_id=0)
    params = model.init(jax.random.PRNGKey(9), scale=1.0)
    lm = LM.of(model, params).with_prompt((model.bos_id, 2))
    with jax.enable_x64(True):
        log_a = exact_log_prob(model, params, 3, prompt_P=list(lm.prompt))
    z = np.exp(log_a[exact_constraint(SequenceSpace.of(model, 3), B)]).sum()
    r = guard_sample(jax.random.PRNGKey(4), lm, B, 5_000, max_new_tokens=3, batch_size=2048, progress=False)
    assert r.ar.contains(z), (r.ar, z)


def test_budget_exhausted_reports_measurements(toy):
    params = toy[0]
    with pytest.raises(BudgetExhausted) as err:
        guard_sample(jax.random.PRNGKey(2), LM.of(MODEL, params), B, 10_000, max_new_tokens=3, batch_size=256, max_draws=1000, progress=False)
    e = err.value
    assert e.draws == 1000 and 0 < e.accepted < 10_000
    msg = str(e)
    for part in ("1,000 draws", f"{e.accepted:,} of the 10,000", "AR estimate", "95% CI", "more draws expected", "max_draws"):
        assert part in msg


@pytest.mark.parametrize("name,kwargs", [("num_samples", dict(num_samples=0)), ("batch_size", dict(batch_size=0)),
                                         ("max_draws", dict(max_draws=-1)), ("max_new_tokens", dict(max_new_tokens=0))])
def test_bad_arguments_name_themselves(toy, name, kwargs):
    args = dict(num_samples=10, max_new_tokens=3, batch_size=8) | kwargs
    with pytest.raises(ValueError, match=name):
        guard_sample(jax.random.PRNGKey(0), LM.of(MODEL, toy[0]), B, **args)
