"""Masked decoding: every sample satisfies b, the sampler's law is the exact masked law, masking distorts g
unless the constraint does not reweight, and regex masks from outlines-core work on a real tokenizer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard_jax import constraints as C
from guard_jax.decoding import (
    check_feasible,
    exact_masked_log_prob,
    masked_sample,
    reachability_automaton,
    regex_automaton,
    unconstrained_automaton,
)
from guard_jax.exact import SequenceSpace, exact_constraint, exact_quantities, log_gold
from guard_jax.models.toy import TabularARM
from guard_jax.sampling import bos_prompt, sample
from tests.test_exact import _chi_square_ok
from tests.masking_toy import MODEL, toy_problem


@pytest.fixture(scope="module")
def toy():
    return toy_problem()


def _masked(model, params, mask, n, key=0, max_len=None):
    prompt, pmask = bos_prompt(model, n)
    return masked_sample(jax.random.PRNGKey(key), model, params, prompt, pmask, mask, max_len or model.max_len)


def test_masked_law_matches_sampler_exactly_and_by_chi_square(toy):
    params, space, log_a, b = toy
    mask = reachability_automaton(space, b)
    s = _masked(MODEL, params, mask, 20_000)
    index = space.index(np.asarray(s.tokens_BT))
    assert np.all(b[index])
    log_q = exact_masked_log_prob(space, log_a, b)
    assert np.isclose(np.exp(log_q).sum(), 1.0) and np.all(np.isneginf(log_q[~b]))
    np.testing.assert_allclose(np.asarray(s.logp_B), log_q[index], atol=1e-4)
    np.testing.assert_allclose(np.asarray(s.base_logp_B), log_a[index], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(mask.accepts(s.tokens_BT, s.lengths_B)), True)
    _chi_square_ok(index, np.exp(log_q))


def test_unconstrained_mask_is_plain_sampling(toy):
    params = toy[0]
    prompt, pmask = bos_prompt(MODEL, 256)
    plain = sample(jax.random.PRNGKey(3), MODEL, params, prompt, pmask, 3)
    masked = masked_sample(jax.random.PRNGKey(3), MODEL, params, prompt, pmask, unconstrained_automaton(4), 3)
    np.testing.assert_array_equal(plain.tokens_BT, masked.tokens_BT)
    np.testing.assert_array_equal(plain.lengths_B, masked.lengths_B)
    np.testing.assert_allclose(plain.logp_B, masked.logp_B, atol=1e-6)
    np.testing.assert_allclose(masked.base_logp_B, masked.logp_B, atol=1e-6)


def test_masking_distorts_g_on_a_concrete_case(toy):
    _, space, log_a, b = toy
    q = exact_quantities(log_a, exact_masked_log_prob(space, log_a, b), b)
    assert q.ar == pytest.approx(1.0)  # masking always satisfies b ...
    assert q.kl_g_a2 > 1e-3  # ... but it does not sample g
    assert q.kl_g_a2 == pytest.approx(q.kl_g_g2)


def test_no_distortion_when_b_constrains_only_the_first_token(toy):
    params, space, log_a, _ = toy
    b = exact_constraint(space, C.token_at(0, 1) | C.token_at(0, 2))
    log_q = exact_masked_log_prob(space, log_a, b)
    np.testing.assert_allclose(np.exp(log_q), np.exp(log_gold(log_a, b)), rtol=1e-5, atol=1e-12)  # log_a is float32
    assert abs(exact_quantities(log_a, log_q, b).kl_g_a2) < 1e-8


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from([(2, 3, None), (3, 2, 0), (3, 3, 0), (3, 3, None)]), density=st.floats(0.05, 0.6))
def test_every_masked_sample_satisfies_b(seed, shape, density):
    V, T, eos = shape
    model = TabularARM(V, T, eos_id=eos)
    space = SequenceSpace.of(model, T)
    rng = np.random.default_rng(seed)
    _, _, valid = space.tokens(jnp.arange(space.size)), None, space.lengths_and_valid(space.tokens(jnp.arange(space.size)))[1]
    b = (rng.random(space.size) < density) & np.asarray(valid)
    b[rng.choice(np.flatnonzero(np.asarray(valid)))] = True
    params = model.init(jax.random.PRNGKey(seed), scale=2.0)
    s = _masked(model, params, reachability_automaton(space, b), 256, key=seed)
    assert np.all(b[space.index(np.asarray(s.tokens_BT))])
    assert np.all(np.isfinite(np.asarray(s.logp_B)))


def test_infeasible_constraint_is_refused():
    with pytest.raises(ValueError, match="never satisfied"):
        reachability_automaton(SequenceSpace(3, 2), np.zeros(9, bool))
    mask = regex_automaton("(ab){3}", ["a", "b"], eos_id=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        check_feasible(mask, 5)
    check_feasible(mask, 6)


# ---- regex masks on a real tokenizer (outlines-core) ----

PATTERN = r"(ab|01)+a?"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models

    vocab = {"a": 0, "b": 1, "0": 2, "1": 3, "ab": 4, "01": 5, "b0": 6, "<eos>": 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("0", "1"), ("b", "0")]))
    tok.add_special_tokens(["<eos>"])
    tok.decoder = decoders.Fuse()
    return tok


def _oracle(tok, tokens_BT, lengths_B, eos_id):
    out = []
    for row, n in zip(np.asarray(tokens_BT), np.asarray(lengths_B)):
        ended = n > 0 and row[n - 1] == eos_id
        ids = row[: n - 1 if ended else n].tolist()
        known = all(tok.id_to_token(i) not in (None, "<eos>") for i in ids)  # an id outside the vocabulary has no text
        out.append(known and re.fullmatch(PATTERN, tok.decode(ids, skip_special_tokens=True)) is not None)
    return np.asarray(out)


def test_regex_mask_on_a_bpe_tokenizer(tokenizer):
    eos = tokenizer.token_to_id("<eos>")
    strings = {i: s for s, i in tokenizer.get_vocab().items() if i != eos}
    V, T = 9, 6  # one id (8) the tokenizer never produces: never allowed
    mask = regex_automaton(PATTERN, strings, eos_id=eos, vocab_size=V)
    check_feasible(mask, T)
    assert tokenizer.decode(tokenizer.encode("ab01a").ids) == "ab01a"
    model = TabularARM(V, T, eos_id=eos)
    params = model.init(jax.random.PRNGKey(0), scale=2.0)
    s = _masked(model, params, mask, 2000, key=1)
    tokens, lengths = np.asarray(s.tokens_BT), np.asarray(s.lengths_B)
    assert np.all(_oracle(tokenizer, tokens, lengths, eos))
    assert not np.any(tokens == 8)
    # the automaton's own b agrees with the regex oracle on unconstrained samples too (both outcomes occur)
    prompt, pmask = bos_prompt(model, 2000)
    plain = sample(jax.random.PRNGKey(2), model, params, prompt, pmask, T)
    ours = np.asarray(mask.constraint()(plain.tokens_BT, plain.lengths_B))
    np.testing.assert_array_equal(ours, _oracle(tokenizer, plain.tokens_BT, plain.lengths_B, eos))
    assert 0 < ours.mean() < 1


@pytest.mark.parametrize("pattern", [r"(ab)*", r"(ab|01){1,3}", r"a(ba)*b?", r"[ab]+0|1"])
def test_regex_automaton_is_fullmatch_and_its_masks_are_exact_reachability(pattern):
    strings = ["a", "b", "0", "1", "ab", "01"]
    eos, V, T = 6, 7, 4
    model = TabularARM(V, T, eos_id=eos)
    space = SequenceSpace.of(model, T)
    tokens = np.asarray(space.tokens(jnp.arange(space.size)))
    lengths, valid = (np.asarray(x) for x in space.lengths_and_valid(jnp.asarray(tokens)))
    texts = ["".join(strings[v] for v in row[:n] if v != eos) for row, n in zip(tokens, lengths)]
    ended = tokens[np.arange(len(tokens)), lengths - 1] == eos
    b = valid & np.array([re.fullmatch(pattern, t) is not None for t in texts])
    mask = regex_automaton(pattern, strings, eos_id=eos)
    np.testing.assert_array_equal(np.asarray(mask.accepts(tokens, lengths)) & valid, b)
    assert b[ended].any() and b[~ended].any() if pattern != r"(ab)*" else b[ended].any()
    params = model.init(jax.random.PRNGKey(5), scale=2.0)
    ours, exact = (_masked(model, params, m, 512, key=4) for m in (mask, reachability_automaton(space, b)))
    np.testing.assert_array_equal(ours.tokens_BT, exact.tokens_BT)
    np.testing.assert_allclose(ours.logp_B, exact.logp_B, atol=1e-5)


def test_categorical_with_allowed_draws_the_masked_law_with_both_log_probs():
    """`categorical(allowed_BV=)`, one exp pass for both laws: with every token allowed it is the unmasked draw
    bit for bit (V = 300); otherwise logq and loga are the masked and unmasked log-softmax at the drawn token,
    the token is allowed and its frequencies follow the masked law (chi-square); rows whose allowed tokens lie
    100 below the best take the exact fallback (finite, the same values); a NaN logit, even at a forbidden
    token, or nothing allowed gives NaN on both routes."""
    from guard_jax.sampling import categorical

    rng = np.random.default_rng(0)
    B, V = 4096, 300
    logits_BV = jnp.asarray(np.tile(rng.normal(size=(1, V)) * 2, (B, 1)), jnp.float32)
    u_B = 1.0 - jax.random.uniform(jax.random.PRNGKey(3), (B,))
    draw = jax.jit(lambda u_B, x_BV, allowed_BV: categorical(u_B, x_BV, allowed_BV=allowed_BV))
    token_B, logq_B, loga_B = draw(u_B, logits_BV, jnp.ones((B, V), bool))
    ref_token_B, ref_logp_B = categorical(u_B, logits_BV)
    np.testing.assert_array_equal(np.asarray(token_B), np.asarray(ref_token_B))
    np.testing.assert_array_equal(np.asarray(logq_B), np.asarray(ref_logp_B))
    allowed_V = rng.random(V) < 0.1
    for shift in (0.0, -100.0):  # -100: every allowed weight under e^-69 of the best, the fallback
        x_BV = jnp.where(jnp.asarray(allowed_V), logits_BV + shift, logits_BV)
        token_B, logq_B, loga_B = (np.asarray(z) for z in draw(u_B, x_BV, jnp.broadcast_to(jnp.asarray(allowed_V), (B, V))))
        x_V = np.asarray(x_BV[0], np.float64)
        log_a_V = x_V - np.logaddexp.reduce(x_V)
        log_q_V = np.where(allowed_V, log_a_V, -np.inf)
        log_q_V = log_q_V - np.logaddexp.reduce(log_q_V[allowed_V])
        assert allowed_V[token_B].all()
        np.testing.assert_allclose(logq_B, log_q_V[token_B], atol=1e-4)
        np.testing.assert_allclose(loga_B, log_a_V[token_B], atol=1e-4, rtol=1e-6)
        _chi_square_ok(token_B, np.exp(log_q_V))
    _, logq_B, _ = draw(u_B[:2], logits_BV[:2], jnp.zeros((2, V), bool))
    assert np.isnan(np.asarray(logq_B)).all()
    for shift in (0.0, -100.0):
        x_BV = jnp.where(jnp.asarray(allowed_V), logits_BV[:2] + shift, logits_BV[:2]).at[:, int(np.argmin(allowed_V))].set(jnp.nan)
        _, logq_B, _ = draw(u_B[:2], x_BV, jnp.broadcast_to(jnp.asarray(allowed_V), (2, V)))
        assert np.isnan(np.asarray(logq_B)).all()


def test_categorical_with_packed_bits_is_the_draw_of_the_unpacked_mask():
    """`categorical(allowed_bits_BW=)` (llguidance's int32 bitmasks, bit-tested inside the block sums) gives the
    same tokens, logq and loga as `allowed_BV` of the unpacked bits, for the same uniforms: whole words per
    block (V = 8,192), a padded last block and word (V = 300), blocks that are not whole words (V = 40, unpacked),
    rows with nothing allowed, rows taking the underflow fallback, and a NaN logit at a forbidden token. The
    masked LM's `mask_logits_bits` equals `mask_logits` of the unpacked bits, also for a row whose only set
    bits lie past V."""
    from guard_jax.sampling import unpack_bitmask
    from guard_jax.decoding.masked_arm import mask_logits, mask_logits_bits
    from guard_jax.sampling import categorical

    rng = np.random.default_rng(1)
    packed = jax.jit(lambda u_B, x_BV, bits_BW: categorical(u_B, x_BV, allowed_bits_BW=bits_BW))
    unpacked = jax.jit(lambda u_B, x_BV, bits_BW: categorical(u_B, x_BV, allowed_BV=unpack_bitmask(bits_BW, x_BV.shape[1])))
    for V in (8192, 300, 40):
        B, W = 64, -(-V // 32)
        allowed_BV = rng.random((B, V)) < rng.choice([0.01, 0.3, 0.95], (B, 1))
        allowed_BV[0] = False  # nothing allowed
        padded_BV = np.zeros((B, W * 32), bool)
        padded_BV[:, :V] = allowed_BV
        bits_BW = np.packbits(padded_BV, axis=1, bitorder="little").view(np.int32)
        x_BV = rng.normal(size=(B, V)).astype(np.float32) * 3
        x_BV[1:4] = np.where(allowed_BV[1:4], x_BV[1:4] - 100.0, x_BV[1:4])  # the underflow fallback
        x_BV[4, np.flatnonzero(~allowed_BV[4])[0]] = np.nan
        u_B = 1.0 - jax.random.uniform(jax.random.PRNGKey(V), (B,))
        got, want = packed(u_B, x_BV, bits_BW), unpacked(u_B, x_BV, bits_BW)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"V={V}")
        token_B, logq_B = np.asarray(got[0]), np.asarray(got[1])
        assert np.isnan(logq_B[[0, 4]]).all() and np.isfinite(logq_B[1:4]).all()
        ok = np.isfinite(logq_B)
        assert allowed_BV[np.flatnonzero(ok), token_B[ok]].all()
        if V % 32:
            bits_BW[5] = 0
            bits_BW[5, -1] = np.int32(-1)  # only bits past V: nothing allowed
        np.testing.assert_array_equal(np.asarray(mask_logits_bits(x_BV, bits_BW)),
                                      np.asarray(mask_logits(x_BV, unpack_bitmask(bits_BW, V))))
    with pytest.raises(ValueError, match="allowed_bits_BW"):
        categorical(u_B, x_BV, allowed_bits_BW=bits_BW[:, :-1])
