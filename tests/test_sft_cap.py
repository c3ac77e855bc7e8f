"""SFT and CAP on tabular toy ARMs behave as the exact quantities predict."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guard_jax import constraints as C
from guard_jax.evaluate import LM, monte_carlo
from guard_jax.exact import SequenceSpace, arm_from_law, exact_constraint, exact_log_prob, exact_quantities, log_gold
from guard_jax.models.toy import TabularARM
from guard_jax.sampling import bos_prompt, sample
from guard_jax.train.cap import cap_context
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.sft import SFT

B = C.contains_ngram([1, 2])


def test_sft_on_many_gold_samples_approaches_g(x64):
    model = TabularARM(3, 3)
    space = SequenceSpace.of(model, 3)
    a = model.init(jax.random.PRNGKey(0))
    b = exact_constraint(space, B)
    log_a = exact_log_prob(model, a, 3)
    gold, gold_params = arm_from_law(space, log_gold(log_a, b))
    n = 4000
    s = sample(jax.random.PRNGKey(1), gold, gold_params, *bos_prompt(model, n), 3)
    index_N = space.index(np.asarray(s.tokens_BT))
    assert b[index_N].all()
    trainer = SFT(model, s.tokens_BT, s.lengths_B, batch_size=500, learning_rate=0.1)
    state, history = run(trainer, trainer.init_state(a), LoopConfig(steps=400, progress=False))
    assert history[-1]["loss"] < history[0]["loss"]
    log_pi = exact_log_prob(model, state.params, 3)
    # SFT is maximum likelihood: the tabular ARM reaches the empirical law of its data ...
    emp = np.bincount(index_N, minlength=space.size) / n
    seen = emp > 0
    assert np.sum(emp[seen] * (np.log(emp[seen]) - log_pi[seen])) < 0.01
    # ... which is close to g, so KL(g||a') falls from KL(g||a) = -log Z to near 0 and AR_a' near 1
    q = exact_quantities(log_a, log_pi, b)
    assert q.kl_g_a > 1.0 and q.kl_g_a2 < 0.02 and q.ar > 0.98
    # Theorem 2 holds for the trained proposal
    np.testing.assert_allclose(q.kl_g_a2, -q.log_ar + q.kl_g_g2, atol=1e-9)


def test_cap_scores_a_without_and_a2_with_the_prompt(x64):
    """a' = a(. | BOS, c): its exact law is a's conditional given the first token c; the Monte-Carlo pipeline
    (sampling a' with the prompt, scoring a without it) agrees with the exact quantities within its CIs."""
    model = TabularARM(3, 4)
    params = model.init(jax.random.PRNGKey(4), scale=1.5)
    T = 3
    space = SequenceSpace(3, T)
    b = exact_constraint(space, B)
    log_a = exact_log_prob(model, params, T)  # marginal law of the first 3 tokens
    full = exact_log_prob(model, params, T + 1).reshape(3, -1)
    # the CAP "prompt" is the first token that most raises AR (a constraint-aware prompt)
    laws = {c: exact_log_prob(model, params, T, prompt_P=cap_context(model.bos_id, [c])) for c in range(3)}
    c = max(laws, key=lambda c: exact_quantities(log_a, laws[c], b).ar)
    prompt, log_a2 = cap_context(model.bos_id, [c]), laws[c]
    np.testing.assert_allclose(log_a2, full[c] - np.logaddexp.reduce(full[c]), atol=1e-9)  # a' = a(. | c)
    exact = exact_quantities(log_a, log_a2, b)
    assert exact.ar > 5 * exact.z  # the prompt helps this constraint

    prompt_1P = jnp.asarray([prompt], jnp.int32)
    a, a2 = LM.unconditional(model, params), LM(model, params, prompt_1P, jnp.ones_like(prompt_1P))
    est = monte_carlo(jax.random.PRNGKey(4), a, a2, B, T, n_a=20000, n_a2=20000, level=0.999, progress=False)
    truth = {"Z": exact.z, "AR_a2": exact.ar, "AR_gain": exact.ar / exact.z, "KL(g||a)": exact.kl_g_a,
             "KL(g||a2)": exact.kl_g_a2, "KL(g||g2)": exact.kl_g_g2, "KL(g2||g)": exact.kl_g2_g}
    for name, value in truth.items():
        assert est[name].contains(value), (name, value, est[name])


def test_cap_needs_a_prompt():
    with pytest.raises(ValueError, match="cap_tokens"):
        cap_context(0, [])
