"""The batch-drawing driver over an LM: `draw_batches`, `draw` and `score` against the low-level sampler and
the exact law of a toy ARM."""

import itertools

import jax
import numpy as np
import pytest

from guard_jax.exact import SequenceSpace, exact_log_prob
from guard_jax.lm import LM
from guard_jax.models.toy import TabularARM
from guard_jax.sampling import bos_prompt, draw, draw_batches, log_prob, sample, score
from tests.test_exact import _chi_square_ok

MODEL = TabularARM(4, 4, eos_id=0)
PARAMS = MODEL.init(jax.random.PRNGKey(3), scale=1.0)


def test_batch_i_is_sample_with_fold_in_key_i():
    key = jax.random.PRNGKey(1)
    batches = list(itertools.islice(draw_batches(key, LM.of(MODEL, PARAMS), 32, 3), 3))
    for i, d in enumerate(batches):
        s = sample(jax.random.fold_in(key, i), MODEL, PARAMS, *bos_prompt(MODEL, 32), 3)
        np.testing.assert_array_equal(d.tokens_NT, np.asarray(s.tokens_BT))
        np.testing.assert_array_equal(d.lengths_N, np.asarray(s.lengths_B))
        np.testing.assert_array_equal(d.logp_N, np.asarray(s.logp_B))
    assert isinstance(batches[0].tokens_NT, np.ndarray)


def test_draw_is_the_first_n_rows_of_the_batches():
    key, lm = jax.random.PRNGKey(2), LM.of(MODEL, PARAMS)
    d = draw(key, lm, 70, max_new_tokens=3, batch_size=32, progress=False)
    rows = np.concatenate([b.tokens_NT for b in itertools.islice(draw_batches(key, lm, 32, 3), 3)])[:70]
    assert d.tokens_NT.shape == (70, 3) and d.lengths_N.shape == d.logp_N.shape == (70,)
    np.testing.assert_array_equal(d.tokens_NT, rows)
    np.testing.assert_array_equal(draw(key, lm, 70, max_new_tokens=3, batch_size=32, progress=False).tokens_NT, d.tokens_NT)


def test_a_prompted_lm_samples_and_scores_its_exact_conditional_law():
    lm = LM.of(MODEL, PARAMS).with_prompt((MODEL.bos_id, 2))
    space = SequenceSpace.of(MODEL, 3)
    with jax.enable_x64(True):
        log_a = exact_log_prob(MODEL, PARAMS, 3, prompt_P=list(lm.prompt))
    d = draw(jax.random.PRNGKey(5), lm, 20_000, max_new_tokens=3, batch_size=4096, progress=False)
    index = space.index(d.tokens_NT)
    _chi_square_ok(index, np.exp(log_a))
    np.testing.assert_allclose(d.logp_N, log_a[index], atol=1e-5)
    # teacher-forced scores agree with the sampler's, in padded batches of another size
    np.testing.assert_allclose(score(lm, d.tokens_NT[:100], d.lengths_N[:100], batch_size=48), d.logp_N[:100], atol=1e-5)


def test_score_left_pads_a_shorter_prompt_to_its_own_length():
    """score uses lm's own prompt: equal to log_prob on that prompt, whatever the batch size."""
    lm = LM.of(MODEL, PARAMS).with_prompt((MODEL.bos_id, 1))
    s = sample(jax.random.PRNGKey(6), MODEL, PARAMS, *lm.prompt_arrays(10), 3)
    ref = np.asarray(log_prob(MODEL, PARAMS, *lm.prompt_arrays(10), s.tokens_BT, s.lengths_B)[0])
    for batch_size in (3, 10, 64):
        np.testing.assert_allclose(score(lm, s.tokens_BT, s.lengths_B, batch_size=batch_size), ref, atol=1e-6)
    assert score(lm, np.zeros((0, 3), np.int32), np.zeros((0,), np.int32)).shape == (0,)


@pytest.mark.parametrize("call,name", [
    (lambda lm: draw(jax.random.PRNGKey(0), lm, 0, max_new_tokens=3), "n must be > 0"),
    (lambda lm: draw(jax.random.PRNGKey(0), lm, 5, max_new_tokens=3, batch_size=0), "batch_size must be > 0"),
    (lambda lm: draw_batches(jax.random.PRNGKey(0), lm, 4, 0), "max_new_tokens must be > 0"),
    (lambda lm: score(lm, np.zeros((4, 3)), np.zeros(5)), "tokens_NT must be"),
])
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises(ValueError, match=name):
        call(LM.of(MODEL, PARAMS))
