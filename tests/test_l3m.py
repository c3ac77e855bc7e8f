"""L3M: the barrier's shape, and on a toy ARM the exact and Monte-Carlo optima against the closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, grid_log_prob
from guard_jax.models.toy import TabularARM
from guard_jax.sampling import bos_prompt, log_prob, sample
from guard_jax.train.l3m import barrier_slope, exact_objective, mu_schedule, relaxed_log_barrier, sampled_loss

CONSTRAINT = C.token_at(1, 2)
TARGET = 0.6


def test_barrier_is_c1_and_tends_to_the_indicator():
    for mu in (1.0, 0.1, 0.01):
        s = mu * mu
        left, right = relaxed_log_barrier(-s - 1e-9, mu), relaxed_log_barrier(-s + 1e-9, mu)
        assert abs(float(left - right)) < 1e-6
        assert abs(float(barrier_slope(-s, mu)) - 1 / mu) < 1e-6
        g = jax.grad(lambda z: relaxed_log_barrier(z, mu))
        assert abs(float(g(-0.5)) - float(barrier_slope(-0.5, mu))) < 1e-5
    assert float(relaxed_log_barrier(-0.5, 0.01)) < 0.01 and float(relaxed_log_barrier(0.1, 0.01)) > 5
    assert mu_schedule(0, 10) == 1.0 and abs(mu_schedule(9, 10) - 0.01) < 1e-12
    with pytest.raises(ValueError, match="mu"):
        relaxed_log_barrier(-1.0, 0.0)


@pytest.fixture(scope="module")
def toy():
    model = TabularARM(3, 3, eos_id=0)
    space = SequenceSpace.of(model, 3)
    b = exact_constraint(space, CONSTRAINT)
    data_params = model.init(jax.random.PRNGKey(0))  # float32, as training uses
    with jax.enable_x64(True):
        log_d = exact_log_prob(model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), data_params), 3)
    d1 = np.exp(log_d[b]).sum()
    assert d1 < TARGET - 0.1  # the constraint binds
    pi_star = np.where(b, np.exp(log_d) * TARGET / d1, np.exp(log_d) * (1 - TARGET) / (1 - d1))
    lam_star = (1 - d1) / (1 - TARGET) - d1 / TARGET
    return model, space, b, data_params, log_d, pi_star, lam_star


def test_exact_optimum_satisfies_the_constraint_with_the_kkt_multiplier(toy, x64):
    model, space, b, data_params, log_d, pi_star, lam_star = toy
    r_KN = jnp.asarray(b, jnp.float64)[None]
    anneal, hold = 3000, 3000  # mu from 1 to 0.01, then held at 0.01 while the step size decays 100x
    opt = optax.adam(optax.exponential_decay(0.02, anneal + hold, 0.01))

    @jax.jit
    def step(params, state, mu):
        def objective(p):
            return exact_objective(grid_log_prob(model, p, 3), jnp.asarray(log_d), r_KN, [TARGET], mu)

        (value, c_K), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, c_K

    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), data_params)
    state = opt.init(params)
    for i in range(anneal + hold):
        params, state, c_K = step(params, state, mu_schedule(min(i, anneal - 1), anneal))
    pi = np.exp(np.asarray(grid_log_prob(model, params, 3)))
    assert pi[b].sum() >= TARGET - 1e-3  # the constrained optimum satisfies the constraint
    assert 0.5 * np.abs(pi - pi_star).sum() < 0.02
    lam = float(barrier_slope(c_K, 0.01)[0])  # lambda = mu / (-C) at the end of the schedule
    assert abs(lam - lam_star) < 0.05 * lam_star, (lam, lam_star)


def test_monte_carlo_l3m_reaches_the_exact_optimum(toy):
    model, space, b, data_params, log_d, pi_star, _ = toy
    opt = optax.adam(0.05)
    prompt, mask = bos_prompt(model, 1024)

    @jax.jit
    def step(params, state, key, mu):
        k_data, k_pi = jax.random.split(key)
        data = sample(k_data, model, data_params, prompt, mask, 3)
        pol = jax.lax.stop_gradient(sample(k_pi, model, params, prompt, mask, 3))
        rewards = CONSTRAINT.fn(pol.tokens_BT, pol.lengths_B).astype(jnp.float32)[None]

        def loss(p):
            lp_sft, _ = log_prob(model, p, prompt, mask, data.tokens_BT, data.lengths_B)
            lp_pi, _ = log_prob(model, p, prompt, mask, pol.tokens_BT, pol.lengths_B)
            return sampled_loss(lp_sft, lp_pi, rewards, [TARGET], mu)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, aux

    params = data_params
    state = opt.init(params)
    steps = 600
    for i in range(steps):
        params, state, aux = step(params, state, jax.random.PRNGKey(i), mu_schedule(i, steps, 1.0, 0.05))
    with jax.enable_x64(True):
        pi = np.exp(exact_log_prob(model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params), 3))
    assert pi[b].sum() >= TARGET - 0.03
    assert 0.5 * np.abs(pi - pi_star).sum() < 0.08
    assert np.all(np.isfinite(np.asarray(aux["lambda"])))
