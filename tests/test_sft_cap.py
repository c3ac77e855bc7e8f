"""SFT and CAP on tabular toy ARMs behave as the exact quantities predict."""

import jax
import numpy as np
import pytest

from guard_jax import constraints as C
from guard_jax import estimators as E
from guard_jax.exact import SequenceSpace, arm_from_law, exact_constraint, exact_log_prob, exact_quantities, log_gold
from guard_jax.lm import LM
from guard_jax.models.toy import TabularARM
from guard_jax.sampling import bos_prompt, draw, sample, score
from guard_jax.train.cap import cap_context
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.sft import SFT, SFTConfig

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
    trainer = SFT(LM.of(model, a), s.tokens_BT, s.lengths_B, SFTConfig(batch_size=500, learning_rate=0.1))
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

    a = LM.of(model, params)
    a2 = a.with_prompt(prompt)
    ka, ka2 = jax.random.split(jax.random.PRNGKey(4))
    da = draw(ka, a, 20000, max_new_tokens=T, progress=False)
    da2 = draw(ka2, a2, 20000, max_new_tokens=T, progress=False)
    ba, ba2 = np.asarray(B(da.tokens_NT, da.lengths_N)), np.asarray(B(da2.tokens_NT, da2.lengths_N))
    k_a, k_a2, n, level = int(ba.sum()), int(ba2.sum()), 20000, 0.999
    logp_a2_G = score(a2, da.tokens_NT[ba], da.lengths_N[ba])
    logp_a_G2 = score(a, da2.tokens_NT[ba2], da2.lengths_N[ba2])
    z = E.estimate_ar(k_a, n, level)
    est = {"Z": z, "AR_a2": E.estimate_ar(k_a2, n, level), "AR_gain": E.estimate_ar_gain(k_a, n, k_a2, n, level),
           "KL(g||a)": E.estimate_kl_g_a(z), "KL(g||a2)": E.estimate_kl_g_a2(da.logp_N[ba], logp_a2_G, k_a, n, level),
           "KL(g||g2)": E.estimate_kl_g_g2(da.logp_N[ba], logp_a2_G, k_a, n, k_a2, n, level),
           "KL(g2||g)": E.estimate_kl_g2_g(da2.logp_N[ba2], logp_a_G2, k_a2, n, k_a, n, level)}
    truth = {"Z": exact.z, "AR_a2": exact.ar, "AR_gain": exact.ar / exact.z, "KL(g||a)": exact.kl_g_a,
             "KL(g||a2)": exact.kl_g_a2, "KL(g||g2)": exact.kl_g_g2, "KL(g2||g)": exact.kl_g2_g}
    for name, value in truth.items():
        assert est[name].contains(value), (name, value, est[name])


def test_sft_conditions_on_the_lm_prompt(x64):
    """The SFT loss of a prompted LM is the NLL per token of its data under a(. | prompt)."""
    model = TabularARM(3, 4)
    params = model.init(jax.random.PRNGKey(5), scale=1.5)
    lm = LM.of(model, params).with_prompt(cap_context(model.bos_id, [2]))
    s = sample(jax.random.PRNGKey(6), model, params, *lm.prompt_arrays(64), 3)
    trainer = SFT(lm, s.tokens_BT, s.lengths_B, SFTConfig(batch_size=64, learning_rate=0.1))
    _, metrics = trainer.step(trainer.init_state(params), jax.random.PRNGKey(0))
    log_a = exact_log_prob(model, params, 3, prompt_P=list(lm.prompt))
    nll = -log_a[SequenceSpace(3, 3).index(np.asarray(s.tokens_BT))].sum() / float(np.sum(s.lengths_B))
    np.testing.assert_allclose(float(metrics["loss"]), nll, rtol=1e-5)


@pytest.mark.parametrize("kwargs,name", [(dict(batch_size=0), "batch_size"), (dict(learning_rate=0.0), "learning_rate"),
                                         (dict(warmup_steps=-1), "warmup_steps")])
def test_bad_sft_configs_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SFTConfig(**kwargs)


def test_sft_refuses_a_batch_larger_than_its_data():
    model = TabularARM(3, 3)
    with pytest.raises(ValueError, match="config.batch_size"):
        SFT(LM.of(model, model.init(jax.random.PRNGKey(0))), np.zeros((4, 3)), np.ones(4), SFTConfig(batch_size=8))


def test_cap_needs_a_prompt():
    with pytest.raises(ValueError, match="cap_tokens"):
        cap_context(0, [])
