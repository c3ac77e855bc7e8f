"""The best limited-context ARM: exact KL(g||pi) minimiser within its family, reaching g only with full context."""

import jax
import numpy as np

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_quantities, log_gold
from guard_jax.limited_context import best_limited_context_arm
from guard_jax.models.toy import TabularARM


def test_best_limited_context_arm(x64):
    model = TabularARM(3, 4, eos_id=0)
    space = SequenceSpace.of(model, 4)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), model.init(jax.random.PRNGKey(2), scale=1.5))
    log_a = np.asarray(exact_log_prob(model, params, 4))
    b = exact_constraint(space, C.contains_ngram([1, 2]))
    log_g = log_gold(log_a, b)
    kls = []
    for k in range(4):
        m, p = best_limited_context_arm(space, log_g, k)
        log_pi = np.asarray(exact_log_prob(m, p, 4))
        assert np.isclose(np.exp(log_pi).sum(), 1.0)
        kls.append(exact_quantities(log_a, log_pi, b).kl_g_a2)
        if k == 1:  # optimal within the family: moving any tied conditional raises KL(g||pi)
            V = 3
            logits = np.asarray(p["logits_NV"])
            rng = np.random.default_rng(0)
            for _ in range(5):
                t = 2  # rows of prefixes of length 2 share a context: tie the perturbation by last token
                rows = np.arange((V**t - 1) // (V - 1), (V ** (t + 1) - 1) // (V - 1))
                delta_CV = 0.1 * rng.normal(size=(V, V))
                moved = logits.copy()
                moved[rows] += delta_CV[(rows - rows[0]) % V]
                log_moved = np.asarray(exact_log_prob(m, {"logits_NV": moved}, 4))
                assert exact_quantities(log_a, log_moved, b).kl_g_a2 > kls[-1]
    assert kls[0] > kls[1] > kls[2] > 1e-3  # a limited context cannot reach g ...
    assert abs(kls[3]) < 1e-9  # ... the full context (T - 1 tokens) can
