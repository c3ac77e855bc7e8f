"""Auxiliary prefix-value model: exact values give g exactly; a learned head moves the proposal toward g."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_prefix_values, exact_quantities, log_gold
from guard_jax.models.toy import TabularARM, TinyTransformerARM
from guard_jax.sampling import bos_prompt, sample
from guard_jax.train.aux import AuxProposal, token_kl_loss, value_bce_loss

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


def test_learned_head_moves_the_proposal_toward_g(x64):
    a = TabularARM(3, 4, eos_id=0)
    a_params = a.init(jax.random.PRNGKey(1), scale=1.0)
    space = SequenceSpace.of(a, 4)
    log_a = exact_log_prob(a, a_params, 4)
    b = exact_constraint(space, B)
    head = TinyTransformerARM(3, 4, eos_id=0, d_model=16)
    head_params = head.init(jax.random.PRNGKey(2))
    head_params["head"]["kernel"] = jnp.zeros_like(head_params["head"]["kernel"])  # R = 0: q = a at the start
    q = AuxProposal(a, head)
    prompt, mask = bos_prompt(a, 512)
    opt = optax.adam(3e-2)
    state = opt.init(head_params)

    @jax.jit
    def step(head_params, state, key):
        s = sample(key, a, a_params, prompt, mask, 4)
        labels = B.fn(s.tokens_BT, s.lengths_B)
        loss, grads = jax.value_and_grad(value_bce_loss, argnums=1)(head, head_params, prompt, mask, s.tokens_BT, s.lengths_B, labels)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(head_params, updates), state, loss

    def kl():
        return exact_quantities(log_a, exact_log_prob(q, {"base": a_params, "head": head_params}, 4), b).kl_g_a2

    history = [kl()]
    for i in range(150):
        head_params, state, _ = step(head_params, state, jax.random.PRNGKey(100 + i))
        if i % 50 == 49:
            history.append(kl())
    assert abs(history[0] - exact_quantities(log_a, log_a, b).kl_g_a2) < 1e-5  # starts at a
    assert history[-1] < 0.5 * history[0], history
    assert all(later < earlier + 0.05 for earlier, later in zip(history, history[1:])), history


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


def test_head_vocabulary_must_match():
    with pytest.raises(ValueError, match="one value logit per token"):
        AuxProposal(TabularARM(3, 3), TabularARM(4, 3))
