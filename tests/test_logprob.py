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
