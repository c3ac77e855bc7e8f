"""Exact machinery on toy ARMs: enumeration, exact laws, Theorem 2, the gold ARM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy import stats

from guard_jax import constraints as C
from guard_jax.exact import (SequenceSpace, enumerate_sequences, exact_constraint, exact_log_prob, exact_quantities,
                             arm_from_law, log_gold)
from guard_jax.models.toy import TabularARM, TinyTransformerARM
from guard_jax.sampling import bos_prompt, log_prob, sample


def _valid_count(V, T, eos):
    if eos is None:
        return V**T
    return sum((V - 1) ** (t - 1) for t in range(1, T + 1)) + (V - 1) ** T


@pytest.mark.parametrize("V,T,eos", [(2, 1, None), (3, 3, None), (3, 3, 0), (4, 2, 3), (5, 4, 2)])
def test_enumeration_counts_and_roundtrip(V, T, eos):
    tokens_NT, lengths_N, valid_N = enumerate_sequences(V, T, eos)
    assert tokens_NT.shape == (V**T, T)
    assert int(valid_N.sum()) == _valid_count(V, T, eos)
    space = SequenceSpace(V, T, eos)
    np.testing.assert_array_equal(space.index(tokens_NT), np.arange(V**T))
    if eos is not None:
        ends = np.asarray(tokens_NT)[np.arange(V**T), np.asarray(lengths_N) - 1]
        early = np.asarray(lengths_N) < T
        assert np.all(ends[early] == eos)


@pytest.mark.parametrize("model", [TabularARM(3, 4, eos_id=None), TabularARM(4, 3, eos_id=1),
                                   TinyTransformerARM(3, 4, eos_id=2)], ids=repr)
def test_exact_log_prob_is_a_distribution_and_matches_scoring(model, x64):
    params = model.init(jax.random.PRNGKey(0))
    T = model.max_len
    logp = exact_log_prob(model, params, T)
    space = SequenceSpace.of(model, T)
    tokens_NT, lengths_N, valid_N = enumerate_sequences(model.vocab_size, T, model.eos_id)
    assert np.all(np.isneginf(logp[~np.asarray(valid_N)]))
    assert abs(np.exp(logp).sum() - 1.0) < 1e-6  # the transformer computes in float32
    prompt, mask = bos_prompt(model, space.size)
    scored, _ = log_prob(model, params, prompt, mask, tokens_NT, lengths_N)
    np.testing.assert_allclose(np.asarray(scored)[np.asarray(valid_N)], logp[np.asarray(valid_N)], atol=1e-5)


def test_exact_log_prob_chunking_is_invisible(x64):
    model = TabularARM(3, 5, eos_id=0)
    params = model.init(jax.random.PRNGKey(1))
    whole = exact_log_prob(model, params, 5)
    chunked = exact_log_prob(model, params, 5, budget_bytes=1)  # one stem per chunk
    np.testing.assert_array_equal(whole, chunked)


def test_tiny_z_has_no_underflow(x64):
    # V=2, T=5, every conditional puts logit -15 on token 1: Z = P(11111) = sigmoid(-15)^5 ~ 1e-33.
    model = TabularARM(2, 5)
    params = {"logits_NV": jnp.tile(jnp.asarray([[0.0, -15.0]]), (model.num_prefixes, 1))}
    logp = exact_log_prob(model, params, 5)
    b = exact_constraint(SequenceSpace.of(model, 5), C.token_at(0, 1) & C.contains_ngram([1, 1, 1, 1, 1]))
    q = exact_quantities(logp, logp, b)
    expected = 5 * float(jax.nn.log_sigmoid(-15.0))
    assert q.z < 1e-30
    assert abs(q.log_z - expected) < 1e-9
    assert abs(q.kl_g_a - (-expected)) < 1e-9


_spaces = st.tuples(st.integers(2, 5), st.integers(1, 5), st.booleans()).filter(lambda s: s[0] ** s[1] <= 3125)


@given(space=_spaces, seed=st.integers(0, 2**31 - 1), density=st.floats(0.05, 1.0))
def test_theorem2_and_kl_properties(space, seed, density):
    V, T, with_eos = space
    with jax.enable_x64(True):
        model = TabularARM(V, T, eos_id=V - 1 if with_eos else None)
        ka, ka2 = jax.random.split(jax.random.PRNGKey(seed))
        log_a = exact_log_prob(model, model.init(ka, scale=2.0), T)
        log_a2 = exact_log_prob(model, model.init(ka2, scale=2.0), T)
        rng = np.random.default_rng(seed)
        b = (rng.random(V**T) < density) & np.isfinite(log_a)
        b[rng.choice(np.flatnonzero(np.isfinite(log_a)))] = True  # non-empty
        q = exact_quantities(log_a, log_a2, b)
    assert abs(q.kl_g_a2 - (-q.log_ar + q.kl_g_g2)) <= 1e-6
    assert abs(q.kl_g_a + q.log_z) <= 1e-9
    for kl in (q.kl_g_a, q.kl_g_a2, q.kl_g_g2, q.kl_g2_g):
        assert kl >= -1e-12
    assert 0 <= q.tv_g_g2 <= 1
    # zero only when the laws agree: a' = a gives g' = g
    same = exact_quantities(log_a, log_a, b)
    assert abs(same.kl_g_g2) < 1e-9 and abs(same.kl_g2_g) < 1e-9 and same.tv_g_g2 < 1e-9
    if q.tv_g_g2 > 1e-6:
        assert q.kl_g_g2 > 0 and q.kl_g2_g > 0


def test_arm_from_law_equals_g_and_samples_g(x64):
    model = TabularARM(3, 4, eos_id=0)
    params = model.init(jax.random.PRNGKey(3), scale=1.5)
    space = SequenceSpace.of(model, 4)
    log_a = exact_log_prob(model, params, 4)
    b = exact_constraint(space, C.contains_token(2) & ~C.token_at(0, 1))
    log_g = log_gold(log_a, b)
    g_model, g_params = arm_from_law(space, log_g)
    log_g_arm = exact_log_prob(g_model, g_params, 4)
    np.testing.assert_allclose(np.exp(log_g_arm), np.exp(log_g), atol=1e-12)
    q = exact_quantities(log_a, log_g_arm, b)
    assert abs(q.log_ar) < 1e-9 and abs(q.kl_g_g2) < 1e-9 and abs(q.kl_g_a2) < 1e-9
    # sampling from the gold ARM gives g (chi-square at a fixed seed)
    prompt, mask = bos_prompt(g_model, 20000)
    s = sample(jax.random.PRNGKey(0), g_model, g_params, prompt, mask, 4)
    assert np.all(b[space.index(s.tokens_BT)])
    _chi_square_ok(space.index(s.tokens_BT), np.exp(log_g))


def chi_square_bins(index_N, probs):
    """Observed and expected counts of grid indices under a law, the rarest cells pooled so every bin expects >= 5."""
    support = np.flatnonzero(probs > 0)
    counts = np.bincount(index_N, minlength=probs.size)[support]
    expected = probs[support] * len(index_N)
    order = np.argsort(expected)
    obs, exp, bins_o, bins_e = 0, 0.0, [], []
    for i in order:
        obs, exp = obs + counts[i], exp + expected[i]
        if exp >= 5:
            bins_o.append(obs), bins_e.append(exp)
            obs, exp = 0, 0.0
    if exp > 0:
        bins_o[-1] += obs
        bins_e[-1] += exp
    return bins_o, bins_e


def chi_square_p(bins_o, bins_e) -> float:
    return stats.chisquare(bins_o, np.asarray(bins_e) * sum(bins_o) / sum(bins_e)).pvalue


def _chi_square_ok(index_N, probs, alpha=1e-3):
    p = chi_square_p(*chi_square_bins(index_N, probs))
    assert p > alpha, f"chi-square p-value {p:.2e}"


def test_sampler_jit_and_eager_agree():
    model = TinyTransformerARM(4, 3, eos_id=3)
    params = model.init(jax.random.PRNGKey(0))
    prompt, mask = bos_prompt(model, 16)
    fast = sample(jax.random.PRNGKey(5), model, params, prompt, mask, 3)
    with jax.disable_jit():
        slow = sample(jax.random.PRNGKey(5), model, params, prompt, mask, 3)
    np.testing.assert_array_equal(fast.tokens_BT, slow.tokens_BT)
    np.testing.assert_array_equal(fast.lengths_B, slow.lengths_B)
    np.testing.assert_allclose(fast.logp_B, slow.logp_B, atol=1e-5)


@pytest.mark.parametrize("kwargs,name", [(dict(vocab_size=1, max_len=3), "vocab_size"), (dict(vocab_size=3, max_len=0), "max_len"),
                                         (dict(vocab_size=3, max_len=2, eos_id=3), "eos_id")])
def test_bad_spaces_raise(kwargs, name):
    for cls in (TabularARM, TinyTransformerARM):
        with pytest.raises(ValueError, match=name):
            cls(**kwargs)
    if "eos_id" not in kwargs:
        with pytest.raises(ValueError, match=name):
            SequenceSpace(**kwargs)


def test_mismatched_grids_and_empty_constraint_raise():
    with pytest.raises(ValueError, match="one grid"):
        exact_quantities(np.zeros(8), np.zeros(9), np.ones(8, bool))
    with pytest.raises(ValueError, match="zero probability"):
        exact_quantities(np.zeros(8), np.zeros(8), np.zeros(8, bool))


def test_rl_ideal_keeps_mass_off_the_constraint(x64):
    from guard_jax.exact import log_rl_ideal

    model = TabularARM(3, 3, eos_id=0)
    log_a = exact_log_prob(model, model.init(jax.random.PRNGKey(4)), 3)
    b = exact_constraint(SequenceSpace.of(model, 3), C.contains_token(1))
    z = np.exp(log_a[b]).sum()
    previous = 0.0
    for beta in (2.0, 1.0, 0.5, 0.2, 0.1):
        q = exact_quantities(log_a, log_rl_ideal(log_a, b, beta), b)
        expected_ar = z * np.exp(1 / beta) / (z * np.exp(1 / beta) + 1 - z)
        assert abs(q.ar - expected_ar) < 1e-12 and 1 - q.ar > 0  # mass on b = 0 never vanishes
        assert abs(q.kl_g_g2) < 1e-12  # proportional to a on b = 1: rejection with it returns g exactly
        assert abs(q.kl_g_a2 + q.log_ar) < 1e-12 and q.ar > previous  # Theorem 2; AR rises as beta falls
        previous = q.ar
    with pytest.raises(ValueError, match="beta"):
        log_rl_ideal(log_a, b, 0.0)
