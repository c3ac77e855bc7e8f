"""MaskedARM: masked decoding with the model contract. Its samples are `masked_sample`'s (same uniforms), and
its teacher-forced scores are the exact masked law on a toy ARM, also on sequences it would never draw."""

import jax
import numpy as np
import pytest

from guard_jax.decoding import exact_masked_log_prob, masked_sample, reachability_automaton
from guard_jax.decoding.masked_arm import MaskedARM
from guard_jax.exact import enumerate_sequences
from guard_jax.sampling import bos_prompt, log_prob, sample
from tests.masking_toy import MODEL, toy_problem


@pytest.fixture(scope="module")
def toy():
    return toy_problem()


def test_masked_arm_samples_like_masked_sample_and_scores_the_exact_masked_law(toy):
    params, space, log_a, b = toy
    mask = reachability_automaton(space, b)
    wrapped, wparams = MaskedARM(MODEL, 1, 3), MaskedARM.params_of(params, mask)
    prompt, pmask = bos_prompt(MODEL, 512)
    key = jax.random.PRNGKey(3)
    ref = masked_sample(key, MODEL, params, prompt, pmask, mask, 3)
    got = sample(key, wrapped, wparams, prompt, pmask, 3)
    np.testing.assert_array_equal(np.asarray(got.tokens_BT), np.asarray(ref.tokens_BT))
    np.testing.assert_array_equal(np.asarray(got.lengths_B), np.asarray(ref.lengths_B))
    np.testing.assert_allclose(np.asarray(got.logp_B), np.asarray(ref.logp_B), atol=1e-5)
    # teacher-forced scores of every grid point with b = 1: the exact masked law (b = 0 points are off the mask)
    log_q = exact_masked_log_prob(space, log_a, b)
    tokens_NT, lengths_N, _ = (np.asarray(x) for x in enumerate_sequences(4, 3, eos_id=0))
    keep = np.flatnonzero(b)
    p, m = bos_prompt(MODEL, len(keep))
    logq_N, _ = log_prob(wrapped, wparams, p, m, tokens_NT[keep], lengths_N[keep])
    np.testing.assert_allclose(np.asarray(logq_N), log_q[keep], atol=1e-4)
    assert np.isclose(np.exp(log_q[keep]).sum(), 1.0) and not np.allclose(log_q[keep], log_a[keep])  # masking reweights


def test_masked_arm_refuses_other_prompt_widths(toy):
    params, space, _, b = toy
    wrapped = MaskedARM(MODEL, 2, 3)
    prompt, pmask = bos_prompt(MODEL, 4)
    with pytest.raises(ValueError, match="prompts of width 2"):
        sample(jax.random.PRNGKey(0), wrapped, MaskedARM.params_of(params, reachability_automaton(space, b)), prompt, pmask, 3)
