"""The sampler's growing cache (guard_jax.sampling.segments): the same uniforms give the same samples and
log-probs whether the cache is one buffer or grows in several scans, for every model family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guard_jax.constraints import contains_token
from guard_jax.decoding import TokenAutomaton, masked_sample, reachability_automaton
from guard_jax.decoding.masked_arm import MaskedARM
from guard_jax.exact import SequenceSpace, exact_constraint
from guard_jax.models.gemma import Gemma
from guard_jax.models.gpt2 import GPT2
from guard_jax.models.toy import TabularARM, TinyTransformerARM
from guard_jax.sampling import bos_prompt, log_prob, sample, sample_from_uniforms, segments, uniforms

T = 9


def _models():
    tab = TabularARM(vocab_size=4, max_len=T, eos_id=0)
    yield "tabular", tab, tab.init(jax.random.PRNGKey(0))
    tiny = TinyTransformerARM(vocab_size=5, max_len=T, eos_id=0)
    yield "tiny_transformer", tiny, tiny.init(jax.random.PRNGKey(1))
    gpt2 = GPT2(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_id=49, eos_id=None)
    yield "gpt2", gpt2, jax.tree.map(lambda x: 10 * x, gpt2.init(jax.random.PRNGKey(2)))  # weights large enough to matter
    gemma2 = Gemma(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, version=2, sliding_window=3, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, layer_types=("sliding_attention", "full_attention"), eos_id=None)
    yield "gemma2", gemma2, jax.tree.map(lambda x: 10 * x, gemma2.init(jax.random.PRNGKey(3)))


MODELS = {name: (model, params) for name, model, params in _models()}


@functools.partial(jax.jit, static_argnames=("model", "segment_ends"))
def _sample(u_TB, model, params, prompt_BP, mask_BP, segment_ends):
    return sample_from_uniforms(u_TB, model, params, prompt_BP, mask_BP, segment_ends=segment_ends)


def test_segments():
    assert segments(512) == list(range(64, 513, 64)) and segments(2048) == list(range(256, 2049, 256))
    assert segments(128) == [32, 64, 96, 128] and segments(200) == [33, 66, 100, 133, 166, 200]
    # a short run: up to 3 segments of at least 10 steps (the experiments' 30 tokens), one scan under 20
    assert segments(30) == [10, 20, 30] and segments(64) == [21, 42, 64] and segments(20) == [10, 20]
    assert segments(19) == [19] and segments(9) == [9] and segments(1) == [1]
    assert all(len(segments(t)) <= len(segments(t + 1)) for t in range(1, 600))  # more steps, never fewer scans


@pytest.mark.parametrize("name", sorted(MODELS))
def test_growing_cache_gives_the_same_samples(name):
    model, params = MODELS[name]
    prompt_BP, mask_BP = bos_prompt(model, 16)
    u_TB = uniforms(jax.random.PRNGKey(7), 16, T)
    one = _sample(u_TB, model, params, prompt_BP, mask_BP, (T,))
    for ends in ((1, T), (2, 5, T), (4, 8, T)):
        grown = _sample(u_TB, model, params, prompt_BP, mask_BP, ends)
        np.testing.assert_array_equal(np.asarray(grown.tokens_BT), np.asarray(one.tokens_BT))
        np.testing.assert_array_equal(np.asarray(grown.lengths_B), np.asarray(one.lengths_B))
        np.testing.assert_allclose(np.asarray(grown.logp_BT), np.asarray(one.logp_BT), atol=1e-5, rtol=0)
    logp_B, _ = log_prob(model, params, prompt_BP, mask_BP, one.tokens_BT, one.lengths_B)
    np.testing.assert_allclose(np.asarray(logp_B), np.asarray(one.logp_B), atol=1e-4, rtol=0)
    assert len({tuple(r) for r in np.asarray(one.tokens_BT).tolist()}) > 4  # the samples are not all alike


def test_masked_arm_grows_its_base_cache():
    base, params = MODELS["tabular"]
    space = SequenceSpace.of(base, T)
    masked = MaskedARM(base, prompt_len=1, max_new_tokens=T)
    mparams = MaskedARM.params_of(params, reachability_automaton(space, exact_constraint(space, contains_token(2))))
    prompt_BP, mask_BP = bos_prompt(base, 8)
    u_TB = uniforms(jax.random.PRNGKey(3), 8, T)
    one = _sample(u_TB, masked, mparams, prompt_BP, mask_BP, (T,))
    grown = _sample(u_TB, masked, mparams, prompt_BP, mask_BP, (3, T))
    np.testing.assert_array_equal(np.asarray(grown.tokens_BT), np.asarray(one.tokens_BT))
    assert (np.asarray(one.tokens_BT) == 2).any(axis=1).all()  # every masked sample satisfies b


def test_bad_segment_ends_are_refused():
    model, params = MODELS["tabular"]
    prompt_BP, mask_BP = bos_prompt(model, 2)
    u_TB = uniforms(jax.random.PRNGKey(0), 2, T)
    for ends in ((4, 3, T), (5,), (0, T)):
        with pytest.raises(ValueError, match="segment_ends"):
            sample_from_uniforms(u_TB, model, params, prompt_BP, mask_BP, segment_ends=ends)


def test_masked_sampler_grows_its_cache_like_the_sampler():
    """masked_sample segments its scan too (T=130: two segments); with an all-allowing mask it returns
    exactly the plain sampler's samples."""
    gpt2 = GPT2(vocab_size=6, n_positions=140, n_embd=16, n_layer=1, n_head=2, bos_id=5, eos_id=None)
    params = jax.tree.map(lambda x: 10 * x, gpt2.init(jax.random.PRNGKey(4)))
    everything = TokenAutomaton(jnp.zeros((1, 6), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool), jnp.asarray(0, jnp.int32))
    prompt_BP, mask_BP = bos_prompt(gpt2, 4)
    plain = sample(jax.random.PRNGKey(5), gpt2, params, prompt_BP, mask_BP, 130)
    masked = masked_sample(jax.random.PRNGKey(5), gpt2, params, prompt_BP, mask_BP, everything, 130)
    np.testing.assert_array_equal(np.asarray(masked.tokens_BT), np.asarray(plain.tokens_BT))
    np.testing.assert_allclose(np.asarray(masked.logp_B), np.asarray(plain.logp_B), atol=1e-4, rtol=0)


class _BatchLast:
    """A tabular ARM whose cache keeps the batch on its last axis ([L, B]): prefill_shared cannot broadcast it."""

    def __init__(self, inner):
        self.inner = inner
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = inner.vocab_size, inner.bos_id, inner.eos_id, inner.pad_id

    def __hash__(self):
        return hash(("batch-last", self.inner))

    def __eq__(self, other):
        return isinstance(other, _BatchLast) and other.inner == self.inner

    def apply(self, params, tokens_BT, mask_BT=None):
        return self.inner.apply(params, tokens_BT, mask_BT)

    def _t(self, cache):
        return {k: (v if v.ndim == 0 else v.T) for k, v in cache.items()}

    def init_cache(self, batch_size, max_len):
        return self._t(self.inner.init_cache(batch_size, max_len))

    def grow_cache(self, cache, max_len):
        return self._t(self.inner.grow_cache(self._t(cache), max_len))

    def prefill(self, params, tokens_BP, mask_BP, cache):
        logits_BV, cache = self.inner.prefill(params, tokens_BP, mask_BP, self._t(cache))
        return logits_BV, self._t(cache)

    def decode(self, params, token_B, cache):
        logits_BV, cache = self.inner.decode(params, token_B, self._t(cache))
        return logits_BV, self._t(cache)


@pytest.mark.parametrize("name", sorted(MODELS) + ["batch_last"])
def test_a_shared_prompt_row_gives_the_samples_of_the_repeated_prompt(name):
    """A one-row prompt shared by the batch (prefilled once, its cache broadcast; a model whose cache is not
    batch-leading prefills every row) gives the repeated prompt's samples and log-probs, which teacher-forced
    scoring confirms, with a left-padded prompt too."""
    model, params = MODELS["tabular"] if name == "batch_last" else MODELS[name]
    model = _BatchLast(model) if name == "batch_last" else model
    B, new = 16, T - 3
    prompt_1P, mask_1P = jnp.asarray([[model.pad_id, model.bos_id, 2]], jnp.int32), jnp.asarray([[0, 1, 1]], bool)
    prompt_BP, mask_BP = jnp.repeat(prompt_1P, B, 0), jnp.repeat(mask_1P, B, 0)
    u_TB = uniforms(jax.random.PRNGKey(11), B, new)
    shared = _sample(u_TB, model, params, prompt_1P, mask_1P, None)
    rows = _sample(u_TB, model, params, prompt_BP, mask_BP, None)
    np.testing.assert_array_equal(np.asarray(shared.tokens_BT), np.asarray(rows.tokens_BT))
    np.testing.assert_allclose(np.asarray(shared.logp_BT), np.asarray(rows.logp_BT), atol=1e-5, rtol=0)
    logp_B, _ = log_prob(model, params, prompt_BP, mask_BP, shared.tokens_BT, shared.lengths_B)
    np.testing.assert_allclose(np.asarray(logp_B), np.asarray(shared.logp_B), atol=1e-4, rtol=0)
    assert len({tuple(r) for r in np.asarray(shared.tokens_BT).tolist()}) > 4
    if name == "gpt2":  # `sample` draws batch_size rows after a shared row: the same uniforms, the same samples
        via_sample = sample(jax.random.PRNGKey(11), model, params, prompt_1P, mask_1P, new, batch_size=B)
        np.testing.assert_array_equal(np.asarray(via_sample.tokens_BT), np.asarray(shared.tokens_BT))


def test_a_prompt_with_another_row_count_is_refused():
    model, params = MODELS["tabular"]
    prompt_BP, mask_BP = bos_prompt(model, 3)
    with pytest.raises(ValueError, match="prompt_BP has 3 rows for 4 samples"):
        sample_from_uniforms(uniforms(jax.random.PRNGKey(0), 4, T), model, params, prompt_BP, mask_BP)
