"""ASAp on toy ARMs: the root bound starts at 1, never rises and stays >= Z; the exact law of the next sample
(computed from the trie) converges to g; every sample satisfies b; the sampler draws from that exact law."""

import jax
import numpy as np
import pytest

from guard_jax import constraints as C
from guard_jax.decoding import Asap, exact_masked_log_prob, reachability_automaton
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_quantities
from guard_jax.models.toy import TabularARM
from tests.test_exact import _chi_square_ok
from tests.masking_toy import MODEL, toy_problem


@pytest.fixture(scope="module")
def toy():
    params, space, log_a, b = toy_problem()
    return params, space, log_a, b, reachability_automaton(space, b)


def test_asap_converges_to_g(toy, x64):
    params, space, log_a, b, mask = toy
    log_z = exact_quantities(log_a, log_a, b).log_z
    asap = Asap(MODEL, params, mask, 3)
    kls, checkpoints = [], [0, 5, 20, 80, 300]
    for k0, k1 in zip([0] + checkpoints, checkpoints):
        if k1 > k0:
            s = asap.sample(jax.random.PRNGKey(k1), k1 - k0, batch_size=1)
            assert s.accepted_N.all() and b[space.index(s.tokens_NT)].all()
        log_q = exact_masked_log_prob(space, log_a, b, asap.log_theta_levels(space))
        assert np.isclose(np.exp(log_q).sum(), 1.0)
        kls.append(exact_quantities(log_a, log_q, b).kl_g_a2)
    masking_kl = exact_quantities(log_a, exact_masked_log_prob(space, log_a, b), b).kl_g_a2
    assert kls[0] == pytest.approx(masking_kl) and masking_kl > 1e-2  # ASAp starts as masking ...
    assert kls[-1] < 1e-3 * kls[0]  # ... and ends at g
    assert kls[-1] <= kls[-2] <= kls[1] < kls[0]
    hist = np.asarray(asap.history)
    assert hist[0] == 0.0 and np.all(np.diff(hist) <= 1e-12) and np.all(hist >= log_z - 1e-6)
    assert hist[-1] == pytest.approx(log_z, abs=1e-3)


def test_fully_explored_trie_gives_z_and_g_exactly(x64):
    model = TabularARM(3, 2)  # 9 sequences: every one is visited quickly
    params = model.init(jax.random.PRNGKey(1), scale=1.0)
    space = SequenceSpace.of(model, 2)
    with jax.enable_x64(True):
        log_a = np.asarray(exact_log_prob(model, params, 2), np.float64)
    b = exact_constraint(space, C.contains_token(1))
    asap = Asap(model, params, reachability_automaton(space, b), 2)
    asap.sample(jax.random.PRNGKey(0), 400, batch_size=8)
    assert len(asap.nodes) == 4  # the root and its 3 children: the whole tree
    q = exact_quantities(log_a, log_a, b)
    assert asap.root_log_theta == pytest.approx(q.log_z, abs=1e-6)
    log_q = exact_masked_log_prob(space, log_a, b, asap.log_theta_levels(space))
    assert exact_quantities(log_a, log_q, b).kl_g_a2 < 1e-10


def test_draw_samples_the_exact_law_of_its_trie_and_leaves_it_alone(toy):
    params, space, log_a, b, mask = toy
    asap = Asap(MODEL, params, mask, 3)
    asap.sample(jax.random.PRNGKey(1), 12)  # a partly explored trie
    log_q = exact_masked_log_prob(space, log_a, b, asap.log_theta_levels(space))
    history = list(asap.history)
    s = asap.draw(jax.random.PRNGKey(2), 4000, batch_size=1000)
    assert asap.history == history  # no bound moved
    np.testing.assert_allclose(exact_masked_log_prob(space, log_a, b, asap.log_theta_levels(space)), log_q)
    index = space.index(s.tokens_NT)
    np.testing.assert_allclose(s.logq_N, log_q[index], atol=1e-4)
    np.testing.assert_allclose(s.base_logp_N, log_a[index], atol=1e-4)
    np.testing.assert_allclose(asap.log_prob(s.tokens_NT[:200], s.lengths_N[:200]), log_q[index[:200]], atol=1e-4)
    _chi_square_ok(index, np.exp(log_q))


def test_batched_rounds_keep_the_guarantees(toy):
    params, space, log_a, b, mask = toy
    asap = Asap(MODEL, params, mask, 3)
    s = asap.sample(jax.random.PRNGKey(3), 256, batch_size=64)
    assert s.tokens_NT.shape == (256, 3) and b[space.index(s.tokens_NT)].all()
    assert asap.root_log_theta >= exact_quantities(log_a, log_a, b).log_z - 1e-6  # float32 logits
    with pytest.raises(ValueError, match="num_samples"):
        asap.sample(jax.random.PRNGKey(0), 0)
