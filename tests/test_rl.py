"""KL-regularized RL on a toy ARM: exact and sampled training reach a·exp(b/beta)/Z, which keeps mass on b = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_quantities, grid_log_prob, log_rl_ideal
from guard_jax.models.toy import TabularARM
from guard_jax.sampling import bos_prompt, log_prob, sample
from guard_jax.train.rl import exact_objective, sampled_loss

CONSTRAINT = C.token_at(1, 2)
BETA = 0.5


@pytest.fixture(scope="module")
def toy():
    model = TabularARM(3, 3, eos_id=0)
    params = model.init(jax.random.PRNGKey(0))
    b = exact_constraint(SequenceSpace.of(model, 3), CONSTRAINT)
    with jax.enable_x64(True):
        log_a = exact_log_prob(model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params), 3)
    return model, params, b, log_a


def test_exact_training_reaches_the_ideal_distribution(toy, x64):
    model, params, b, log_a = toy
    opt = optax.adam(optax.exponential_decay(0.05, 3000, 0.01))

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: exact_objective(grid_log_prob(model, p, 3), jnp.asarray(log_a), jnp.asarray(b, jnp.float64), BETA))(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    s = opt.init(p)
    for _ in range(3000):
        p, s = step(p, s)
    pi = np.exp(np.asarray(grid_log_prob(model, p, 3)))
    ideal = np.exp(log_rl_ideal(log_a, b, BETA))
    assert 0.5 * np.abs(pi - ideal).sum() < 1e-3
    q = exact_quantities(log_a, np.log(np.maximum(pi, 1e-300)), b)
    assert 1 - q.ar > 0.05  # RL keeps real mass on b = 0; GUARD's g has none
    assert q.kl_g_g2 < 1e-3  # ... but rejection with it as proposal returns (almost) g


def test_sampled_training_approaches_the_ideal_distribution(toy):
    model, params, b, log_a = toy
    opt = optax.adam(0.05)
    prompt, mask = bos_prompt(model, 1024)

    @jax.jit
    def step(p, s, key):
        smp = sample(key, model, p, prompt, mask, 3)
        r = CONSTRAINT.fn(smp.tokens_BT, smp.lengths_B)
        lp_a, _ = log_prob(model, params, prompt, mask, smp.tokens_BT, smp.lengths_B)

        def loss(p):
            lp, _ = log_prob(model, p, prompt, mask, smp.tokens_BT, smp.lengths_B)
            return sampled_loss(lp, lp_a, r, BETA)

        (value, aux), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, aux

    p, s = params, opt.init(params)
    with jax.enable_x64(True):
        ideal = np.exp(log_rl_ideal(log_a, b, BETA))
        start = 0.5 * np.abs(np.exp(log_a) - ideal).sum()
    for i in range(400):
        p, s, aux = step(p, s, jax.random.PRNGKey(i))
    with jax.enable_x64(True):
        pi = np.exp(exact_log_prob(model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), p), 3))
    tv = 0.5 * np.abs(pi - ideal).sum()
    assert tv < 0.05 and tv < 0.2 * start, (tv, start)


def test_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        sampled_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 0.0)
