"""Auxiliary prefix-value model: exact values give g exactly; the AuxTrainer (shared loop) moves the proposal and the
distilled policy toward g."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_prefix_values, exact_quantities, log_gold
from guard_jax.lm import LM
from guard_jax.models.toy import TabularARM, TinyTransformerARM
from guard_jax.sampling import bos_prompt, sample
from guard_jax.train.aux import AuxConfig, AuxProposal, AuxTrainer, token_kl_loss
from guard_jax.train.loop import LoopConfig, run

B = C.contains_token(2) & ~C.token_at(0, 1)


@pytest.mark.parametrize("eos", [None, 0])
def test_exact_prefix_values_give_g_exactly(eos, x64):
    a = TabularARM(3, 4, eos_id=eos)
    a_params = a.init(jax.random.PRNGKey(0), scale=1.5)
    space = SequenceSpace.of(a, 4)
    log_a = exact_log_prob(a, a_params, 4)
    b = exact_constraint(space, B)
    head, head_params = exact_prefix_values(space, log_a, b)
    q = AuxProposal(a, head)
    log_q = exact_log_prob(q, {"base": a_params, "head": head_params}, 4)
    np.testing.assert_allclose(np.exp(log_q), np.exp(log_gold(log_a, b)), atol=1e-12)


def test_aux_trainer_moves_the_proposal_and_the_policy_toward_g():
    a = TabularARM(3, 4, eos_id=0)
    a_params = a.init(jax.random.PRNGKey(1), scale=1.0)
    space = SequenceSpace.of(a, 4)
    with jax.enable_x64(True):
        log_a = exact_log_prob(a, a_params, 4)
    b = exact_constraint(space, B)
    head = TinyTransformerARM(3, 4, eos_id=0, d_model=16)
    head_params = head.init(jax.random.PRNGKey(2))
    head_params["head"]["kernel"] = jnp.zeros_like(head_params["head"]["kernel"])  # R = 0: q = a at the start
    trainer = AuxTrainer(LM.of(a, a_params), head, B, AuxConfig(n_samples=512, max_new_tokens=4, learning_rate=3e-2, kl_weight=1.0))
    state = trainer.init_state({"head": head_params, "policy": a_params})

    def kls():
        q, policy = trainer.proposal(state), trainer.policy_lm(state)
        with jax.enable_x64(True):
            return tuple(exact_quantities(log_a, exact_log_prob(lm.model, lm.params, 4), b).kl_g_a2 for lm in (q, policy))

    history = [kls()]
    for steps in (50, 100, 150):
        state, metrics = run(trainer, state, LoopConfig(steps=steps, progress=False))
        history.append(kls())
    q_kl, policy_kl = np.array(history).T
    assert abs(q_kl[0] - exact_quantities(log_a, log_a, b).kl_g_a2) < 1e-5  # starts at a
    assert q_kl[-1] < 0.5 * q_kl[0], q_kl
    assert all(later < earlier + 0.05 for earlier, later in zip(q_kl, q_kl[1:])), q_kl  # decreases as training proceeds
    assert policy_kl[-1] < 0.7 * policy_kl[0], policy_kl  # the policy distilled from q by the token KL follows
    assert {"loss", "bce", "token_kl", "ar", "samples"} <= set(metrics[-1])


def test_aux_trainer_checks_its_params():
    a = TabularARM(3, 3, eos_id=0)
    trainer = AuxTrainer(LM.of(a, a.init(jax.random.PRNGKey(0))), TabularARM(3, 3, eos_id=0), B, AuxConfig(kl_weight=0.0))
    with pytest.raises(ValueError, match="params must be"):
        trainer.init_state({"head": {}, "policy": {}})
    with pytest.raises(ValueError, match="trains no policy"):
        trainer.policy_lm(trainer.init_state({"head": {}}))


def test_token_kl_is_zero_at_q_and_positive_elsewhere():
    a = TabularARM(3, 3, eos_id=0)
    a_params = a.init(jax.random.PRNGKey(3))
    head = TabularARM(3, 3, eos_id=0)
    head_params = head.init(jax.random.PRNGKey(4))
    aux, aux_params = AuxProposal(a, head), {"base": a_params, "head": head_params}
    prompt, mask = bos_prompt(a, 64)
    s = sample(jax.random.PRNGKey(5), a, a_params, prompt, mask, 3)
    # a tabular policy whose logits are q's log-probs is q itself
    policy_params = {"logits_NV": jax.nn.log_softmax(a_params["logits_NV"]) + jax.nn.log_sigmoid(head_params["logits_NV"])}
    at_q = token_kl_loss(a, policy_params, aux, aux_params, prompt, mask, s.tokens_BT, s.lengths_B)
    at_a = token_kl_loss(a, a_params, aux, aux_params, prompt, mask, s.tokens_BT, s.lengths_B)
    assert abs(float(at_q)) < 1e-5 and float(at_a) > 1e-3
    g = jax.grad(lambda p: token_kl_loss(a, p, aux, aux_params, prompt, mask, s.tokens_BT, s.lengths_B))(a_params)
    assert jnp.isfinite(g["logits_NV"]).all()


def test_the_trainer_samples_a_on_the_lm_prompt_and_q_keeps_it():
    """With a prompted base, the step's labels are b on samples of a(. | prompt) (their AR within 5 standard
    errors) and the proposal q is an LM on that prompt (R = 0: q = a(. | prompt) exactly)."""
    a = TinyTransformerARM(4, 4, eos_id=0, d_model=16, context_len=2)
    space, constraint = SequenceSpace.of(a, 4), C.contains_token(1)
    base = LM.of(a, a.init(jax.random.PRNGKey(2))).with_prompt((a.bos_id, 2))
    b = exact_constraint(space, constraint)
    with jax.enable_x64(True):
        log_a = exact_log_prob(a, base.params, 4, prompt_P=list(base.prompt))
        ar, ar_unprompted = np.exp(log_a[b]).sum(), np.exp(exact_log_prob(a, base.params, 4)[b]).sum()
    n = 512
    assert abs(ar - ar_unprompted) > 10 * np.sqrt(ar * (1 - ar) / n)  # the prompt matters
    head_params = a.init(jax.random.PRNGKey(3))
    head_params["head"] = jax.tree.map(jnp.zeros_like, head_params["head"])  # R = 0
    trainer = AuxTrainer(base, a, constraint, AuxConfig(n_samples=n, max_new_tokens=4, learning_rate=1e-3, kl_weight=0.0))
    state = trainer.init_state({"head": head_params})
    q = trainer.proposal(state)
    assert q.prompt == base.prompt and isinstance(q.model, AuxProposal)
    with jax.enable_x64(True):
        np.testing.assert_allclose(exact_log_prob(q.model, q.params, 4, prompt_P=list(q.prompt)), log_a, atol=1e-5)
    _, metrics = trainer.step(state, jax.random.PRNGKey(4))
    assert abs(float(metrics["ar"]) - ar) < 5 * np.sqrt(ar * (1 - ar) / n), (float(metrics["ar"]), ar)


def test_head_vocabulary_must_match():
    with pytest.raises(ValueError, match="one value logit per token"):
        AuxProposal(TabularARM(3, 3), TabularARM(4, 3))


def test_minibatched_update_equals_the_whole_batch():
    """n_samples in 4 minibatches (gradient accumulation, losses normalised by the whole batch's positions)
    gives the same update as all at once."""
    from guard_jax.train.aux import _aux_update

    a = TinyTransformerARM(vocab_size=4, max_len=4, eos_id=0)
    a_params = a.init(jax.random.PRNGKey(0))
    trainer = AuxTrainer(LM.of(a, a_params), a, B, AuxConfig(n_samples=64, max_new_tokens=4, learning_rate=1e-2, minibatch=16))
    SGD = optax.sgd(1.0)  # the update is the gradient itself (Adam would amplify round-off near 0)
    state = trainer.init_state({"head": a.init(jax.random.PRNGKey(1)), "policy": a_params})
    state = state._replace(opt_state=SGD.init(state.params))
    s = sample(jax.random.PRNGKey(2), a, a_params, *bos_prompt(a, 64), 4)
    labels = jnp.asarray(np.asarray(B(np.asarray(s.tokens_BT), np.asarray(s.lengths_B))))
    outs = [_aux_update(state, a_params, trainer.prompt, trainer.mask, s.tokens_BT.reshape(m, 64 // m, 4), s.lengths_B.reshape(m, 64 // m),
                        labels.reshape(m, 64 // m), jnp.float32(1.0), aux=trainer.aux, policy=trainer.policy, optimizer=SGD)
            for m in (1, 4)]
    (x, mx), (y, my) = outs
    assert float(mx["grad_norm"]) > 1e-4 and float(mx["token_kl"]) > 0
    for u, v in zip(jax.tree.leaves(x.params), jax.tree.leaves(y.params)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-6)
    for k in ("loss", "bce", "token_kl", "grad_norm"):
        np.testing.assert_allclose(float(mx[k]), float(my[k]), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        AuxConfig(n_samples=64, minibatch=24)
