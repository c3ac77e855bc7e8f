"""The chunked token log-prob (custom VJP) against the log_softmax path: values and gradients, padded batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guard_jax.logprob import default_chunk, token_log_prob
from guard_jax.models.gpt2 import GPT2
from guard_jax.sampling import log_prob


def _plain(x_ND, w_VD, y_N, temperature=1.0):
    logits_NV = x_ND @ w_VD.T / temperature
    return jnp.take_along_axis(jax.nn.log_softmax(logits_NV), y_N[:, None], axis=-1)[:, 0]


def _data(N=37, D=16, V=50, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x_ND = jax.random.normal(k[0], (N, D))
    w_VD = jax.random.normal(k[1], (V, D))
    y_N = jax.random.randint(k[2], (N,), 0, V)
    g_N = jax.random.normal(k[3], (N,))
    return x_ND, w_VD, y_N, g_N


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 64, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_log_softmax(chunk, temperature):
    # N = 37 rows: chunks of 8 and 10 leave a zero-padded last chunk, 64 is one chunk larger than N
    x_ND, w_VD, y_N, g_N = _data()
    got = token_log_prob(x_ND, w_VD, y_N, temperature, chunk)
    want = _plain(x_ND, w_VD, y_N, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(g_N * f(x, w))
    gx, gw = jax.grad(loss(lambda x, w: token_log_prob(x, w, y_N, temperature, chunk)), (0, 1))(x_ND, w_VD)
    hx, hw = jax.grad(loss(lambda x, w: _plain(x, w, y_N, temperature)), (0, 1))(x_ND, w_VD)
    np.testing.assert_allclose(gx, hx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, hw, rtol=1e-5, atol=1e-5)


def test_jit_vmap_free_and_peaked_logits():
    # large logits (a nearly one-hot softmax) stay finite and exact; jit gives the same numbers
    x_ND, w_VD, y_N, _ = _data(N=12, V=30, seed=1)
    x_ND = 40.0 * x_ND
    got = jax.jit(token_log_prob, static_argnums=(3, 4))(x_ND, w_VD, y_N, 1.0, 5)
    np.testing.assert_allclose(got, _plain(x_ND, w_VD, y_N), rtol=1e-5, atol=1e-4)
    assert np.isfinite(np.asarray(jax.grad(lambda x: token_log_prob(x, w_VD, y_N, 1.0, 5).sum())(x_ND))).all()


def test_default_chunk():
    assert default_chunk(8192) == 256
    assert default_chunk(256_000) == 8
    assert default_chunk(50) % 8 == 0
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        token_log_prob(*_data()[:3], 1.0, 0)


def _reference_log_prob(model, params, prompt_BP, mask_BP, tokens_BT, lengths_B, temperature=1.0):
    """The log_softmax path on the model's logits (what `log_prob` does for a model without features)."""
    P, T = prompt_BP.shape[1], tokens_BT.shape[1]
    inputs = jnp.concatenate([prompt_BP, tokens_BT[:, :-1]], axis=1)
    mask = jnp.concatenate([mask_BP, jnp.ones_like(tokens_BT[:, :-1])], axis=1)
    logits_BTV = model.apply(params, inputs, mask)[:, P - 1 : P - 1 + T] / temperature
    logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), tokens_BT[..., None], axis=-1)[..., 0]
    logp_BT = jnp.where(jnp.arange(T)[None] < lengths_B[:, None], logp_BT, 0.0)
    return logp_BT.sum(-1), logp_BT


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_log_prob_of_gpt2_matches_the_logits_path_on_padded_batches(tied, temperature):
    model = GPT2(vocab_size=67, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_id=0, eos_id=1, tie_word_embeddings=tied)
    params = model.init(jax.random.PRNGKey(3))
    assert hasattr(model, "apply_features")
    B, T = 5, 7
    # left-padded prompts of lengths 3, 1, 2, 3, 1 and continuations of lengths 7, 0, 3, 5, 1 (pad after the end)
    prompt_BP = jnp.array([[0, 5, 6], [2, 2, 0], [2, 0, 9], [0, 4, 4], [2, 2, 0]], jnp.int32)
    mask_BP = jnp.array([[1, 1, 1], [0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]], jnp.int32)
    lengths_B = jnp.array([7, 0, 3, 5, 1], jnp.int32)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(4), (B, T), 0, model.vocab_size)
    tokens_BT = jnp.where(jnp.arange(T)[None] < lengths_B[:, None], tokens_BT, model.pad_id)
    args = (prompt_BP, mask_BP, tokens_BT, lengths_B, temperature)
    got_B, got_BT = log_prob(model, params, *args)
    want_B, want_BT = _reference_log_prob(model, params, *args)
    np.testing.assert_allclose(got_BT, want_BT, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_B, want_B, rtol=1e-5, atol=1e-5)
    assert float(got_B[1]) == 0.0
    c_B = jnp.arange(1.0, B + 1)
    got_g = jax.grad(lambda p: jnp.sum(c_B * log_prob(model, p, *args)[0]))(params)
    want_g = jax.grad(lambda p: jnp.sum(c_B * _reference_log_prob(model, p, *args)[0]))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(got_g):
        h = want_g
        for k in path:
            h = h[k.key]
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("rows", [0, 1, 7, 8, 23, 37])
@pytest.mark.parametrize("chunk", [8, None])
def test_rows_skips_the_tail_and_equals_the_masked_full_computation(rows, chunk):
    # only the first `rows` rows are computed (chunks of 8: 0, 1, 1, 1, 3 or 5 of the 5 chunks); they equal the
    # full computation, the rest are 0, and the gradients equal those of the full computation masked to them
    x_ND, w_VD, y_N, g_N = _data()
    keep_N = jnp.arange(37) < rows
    got = jax.jit(lambda r: token_log_prob(x_ND, w_VD, y_N, 1.0, chunk, rows=r))(jnp.int32(rows))
    np.testing.assert_allclose(got, jnp.where(keep_N, token_log_prob(x_ND, w_VD, y_N, 1.0, chunk), 0.0), rtol=1e-6, atol=0)
    assert not np.any(np.asarray(got)[rows:])
    loss = lambda f: lambda x, w: jnp.sum(g_N * f(x, w))
    gx, gw = jax.grad(loss(lambda x, w: token_log_prob(x, w, y_N, 1.0, chunk, rows=jnp.int32(rows))), (0, 1))(x_ND, w_VD)
    hx, hw = jax.grad(loss(lambda x, w: jnp.where(keep_N, _plain(x, w, y_N), 0.0)), (0, 1))(x_ND, w_VD)
    np.testing.assert_allclose(gx, hx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, hw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [None, 23])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 3.0)])
def test_backward_only_is_zero_with_the_gradient_of_token_log_prob(rows, temperature, softcap):
    # known log-probs + token_log_prob_backward_only: the value is 0 (no head in the forward pass), the
    # gradients those of token_log_prob (the backward takes each chunk's log-sum-exp from its recomputed logits)
    from guard_jax.logprob import token_log_prob_backward_only
    x_ND, w_VD, y_N, g_N = _data()
    r = None if rows is None else jnp.int32(rows)
    args = dict(temperature=temperature, chunk=8, rows=r, softcap=softcap)
    assert not np.any(np.asarray(token_log_prob_backward_only(x_ND, w_VD, y_N, **args)))
    grads = [jax.grad(lambda x, w: jnp.sum(g_N * f(x, w, y_N, **args)), (0, 1))(x_ND, w_VD)
             for f in (token_log_prob_backward_only, token_log_prob)]
    assert np.abs(np.asarray(grads[1][1])).max() > 1e-2
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_log_prob_with_known_values_returns_them_with_the_gradient_of_logp():
    model = GPT2(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_id=0, eos_id=1)
    params = model.init(jax.random.PRNGKey(0))
    prompt_BP, mask_BP = jnp.zeros((5, 2), jnp.int32), jnp.ones((5, 2), bool)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (5, 6), 2, 40)
    lengths_B, known_B = jnp.array([6, 1, 3, 6, 4]), jnp.arange(5.0) - 9.0
    c_B = jnp.linspace(-1.0, 2.0, 5)
    f = lambda known: lambda p: jnp.sum(c_B * log_prob(model, p, prompt_BP, mask_BP, tokens_BT, lengths_B, known_B=known)[0])
    got, want = jax.grad(f(known_B))(params), jax.grad(f(None))(params)
    np.testing.assert_array_equal(log_prob(model, params, prompt_BP, mask_BP, tokens_BT, lengths_B, known_B=known_B)[0], known_B)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sequence_first_is_a_stable_permutation_with_the_valid_rows_first():
    from guard_jax.logprob import sequence_first

    valid_N = np.array([0, 1, 1, 0, 0, 1, 0, 1], bool)
    order_N, rows = sequence_first(jnp.asarray(valid_N))
    assert int(rows) == 4 and list(np.asarray(order_N)) == [1, 2, 5, 7, 0, 3, 4, 6]
    order_N, rows = sequence_first(jnp.zeros(3, bool))
    assert int(rows) == 0 and list(np.asarray(order_N)) == [0, 1, 2]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softcap_values_and_gradients_match_the_capped_log_softmax(temperature):
    x_ND, w_VD, y_N, g_N = _data()
    cap = 2.0  # logits here are O(4): the cap bends them
    capped = lambda x, w: jnp.take_along_axis(jax.nn.log_softmax(jnp.tanh(x @ w.T / cap) * cap / temperature), y_N[:, None],
                                              axis=-1)[:, 0]
    got = token_log_prob(x_ND, w_VD, y_N, temperature, 8, softcap=cap)
    np.testing.assert_allclose(got, capped(x_ND, w_VD), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, _plain(x_ND, w_VD, y_N, temperature), atol=1e-2)  # the cap matters
    loss = lambda f: lambda x, w: jnp.sum(g_N * f(x, w))
    gx, gw = jax.grad(loss(lambda x, w: token_log_prob(x, w, y_N, temperature, 8, softcap=cap)), (0, 1))(x_ND, w_VD)
    hx, hw = jax.grad(loss(capped), (0, 1))(x_ND, w_VD)
    np.testing.assert_allclose(gx, hx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, hw, rtol=1e-5, atol=1e-5)


def _decoder_models():
    from guard_jax.models.gemma import Gemma
    from guard_jax.models.llama import Llama

    # Gemma 2 with a final soft-cap small enough to bend these random logits; Llama with an untied head
    yield "gemma2_softcap", Gemma(67, 16, 32, 2, 2, 1, 8, version=2, final_logit_softcapping=0.05, attn_logit_softcapping=50.0, bos_id=0, eos_id=1)
    yield "gemma1", Gemma(67, 16, 32, 1, 2, 2, 8, version=1, bos_id=0, eos_id=1)
    yield "llama", Llama(67, 16, 32, 2, 2, 1, 8, bos_id=0, eos_id=1, pad_id=3)


@pytest.mark.parametrize("name,model", list(_decoder_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_log_prob_of_gemma_and_llama_matches_the_logits_path_on_padded_batches(name, model):
    """The features path (apply_features + token_log_prob, soft-capped for Gemma 2) against log_softmax of the
    model's own logits (`apply`, which caps them): values and parameter gradients on left-padded prompts and
    continuations of different lengths."""
    params = model.init(jax.random.PRNGKey(3))
    assert hasattr(model, "apply_features") and model.logit_softcap == (0.05 if name == "gemma2_softcap" else None)
    B, T = 4, 6
    prompt_BP = jnp.array([[0, 5, 6], [2, 2, 0], [2, 0, 9], [0, 4, 4]], jnp.int32)
    mask_BP = jnp.array([[1, 1, 1], [0, 0, 1], [0, 1, 1], [1, 1, 1]], jnp.int32)
    lengths_B = jnp.array([6, 0, 3, 2], jnp.int32)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(4), (B, T), 0, model.vocab_size)
    tokens_BT = jnp.where(jnp.arange(T)[None] < lengths_B[:, None], tokens_BT, model.pad_id)
    args = (prompt_BP, mask_BP, tokens_BT, lengths_B, 1.0)
    got_B, got_BT = log_prob(model, params, *args)
    want_B, want_BT = _reference_log_prob(model, params, *args)
    np.testing.assert_allclose(got_BT, want_BT, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_B, want_B, rtol=1e-5, atol=1e-5)
    c_B = jnp.arange(1.0, B + 1)
    got_g = jax.grad(lambda p: jnp.sum(c_B * log_prob(model, p, *args)[0]))(params)
    want_g = jax.grad(lambda p: jnp.sum(c_B * _reference_log_prob(model, p, *args)[0]))(params)
    for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
