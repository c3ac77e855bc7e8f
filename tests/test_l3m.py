"""L3M: the barrier's shape, and on toy ARMs the exact optimum and the L3M trainer (through the shared loop)
against the closed form."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, grid_log_prob
from guard_jax.lm import LM
from guard_jax.models.toy import TabularARM, TinyTransformerARM
from guard_jax.sampling import bos_prompt, sample
from guard_jax.train.l3m import L3M, L3MConfig, barrier_slope, exact_objective, mu_schedule, relaxed_log_barrier
from guard_jax.train.loop import LoopConfig, run

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


def _optimum(log_d, b, target, mu):
    """The exact minimiser of G_mu = -E_D[log pi] + B_mu(target - pi(b)) over all laws pi, for data law D.

    Such a minimiser rescales D on b = 1 and on b = 0 separately, pi(b) = p, with p minimising a 1-D function.
    """
    d = np.exp(log_d)
    d1 = d[b].sum()

    def g(p):
        return -d1 * np.log(p / d1) - (1 - d1) * np.log((1 - p) / (1 - d1)) + float(relaxed_log_barrier(target - p, mu))

    p = scipy.optimize.minimize_scalar(g, bounds=(1e-9, 1 - 1e-9), method="bounded", options={"xatol": 1e-12}).x
    return np.where(b, d * p / d1, d * (1 - p) / (1 - d1))


def _empirical_log_law(space, tokens_NT):
    counts = np.bincount(space.index(tokens_NT), minlength=space.size)
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def test_monte_carlo_l3m_trainer_reaches_the_exact_optimum(toy, tmp_path):
    model, space, b, data_params, log_d, pi_star, _ = toy
    prompt, mask = bos_prompt(model, 16384)
    data = sample(jax.random.PRNGKey(99), model, data_params, prompt, mask, 3)
    tokens, lengths = np.asarray(data.tokens_BT), np.asarray(data.lengths_B)
    # mu anneals 1 -> 0.05 over 300 steps and is then held: the trainer minimises G_0.05 of the empirical data law
    mu_end, anneal, steps = 0.05, 300, 900
    log_hat = _empirical_log_law(space, tokens)
    pi_mu = _optimum(log_hat, b, TARGET, mu_end)
    assert 0.5 * np.abs(_optimum(log_hat, b, TARGET, 1e-7) - pi_star).sum() < 0.02  # the data are close to D
    cfg = L3MConfig(thresholds=[TARGET], total_steps=anneal, n_samples=1024, batch_size=1024, max_new_tokens=3,
                    learning_rate=0.02, mu_end=mu_end)
    trainer = L3M(LM.of(model, data_params), tokens, lengths, [CONSTRAINT], cfg)
    state, history = run(trainer, trainer.init_state(data_params), LoopConfig(steps=steps, out_dir=tmp_path, progress=False))
    with jax.enable_x64(True):
        pi = np.exp(exact_log_prob(model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), state.params), 3))
    assert pi[b].sum() >= TARGET - 0.01  # the constraint holds
    assert 0.5 * np.abs(pi - pi_mu).sum() < 0.05  # the exact optimum of the objective it minimises
    assert 0.5 * np.abs(pi - pi_star).sum() < 0.08  # ... which is near the constrained optimum of D
    # the logged multipliers are the barrier's slope mu / (-C) (1/mu on the linear branch) at the logged mu
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == steps and logged[0]["mu"] == 1.0 and abs(logged[-1]["mu"] - mu_end) < 1e-12
    for row in logged:
        mu, c = row["mu"], row["C_0"]
        expected = mu / -c if c <= -mu * mu else 1 / mu
        assert abs(row["lambda_0"] - expected) < 1e-4 * expected, row
        assert abs(row["C_0"] - (TARGET - row["reward_0"])) < 1e-5


def test_l3m_trainer_on_a_tiny_transformer_lowers_its_exact_objective():
    model = TinyTransformerARM(4, 4, eos_id=0, d_model=16)
    space = SequenceSpace.of(model, 4)
    constraint = C.contains_ngram([2, 3])
    a_params = model.init(jax.random.PRNGKey(0))
    b = exact_constraint(space, constraint)
    prompt, mask = bos_prompt(model, 2048)
    s = sample(jax.random.PRNGKey(1), model, a_params, prompt, mask, 4)
    keep = np.asarray(constraint(s.tokens_BT, s.lengths_B))
    tokens, lengths = np.asarray(s.tokens_BT)[keep], np.asarray(s.lengths_B)[keep]  # b-filtered samples of a
    log_data = jnp.asarray(_empirical_log_law(space, tokens), jnp.float32)
    steps = 40
    trainer = L3M(LM.of(model, a_params), tokens, lengths, constraint, L3MConfig(thresholds=[0.9], total_steps=steps, n_samples=256, batch_size=32,
                                                               max_new_tokens=4, learning_rate=1e-2))
    mu_end = trainer.mu(steps - 1)

    def objective(params):
        value, c_K = exact_objective(grid_log_prob(model, params, 4), log_data, jnp.asarray(b, jnp.float32)[None], [0.9], mu_end)
        return float(value), float(c_K[0])

    state, history = run(trainer, trainer.init_state(a_params), LoopConfig(steps=steps, progress=False))
    (before, c_before), (after, c_after) = objective(a_params), objective(state.params)
    assert after < before - 0.5, (before, after)
    assert c_after < c_before  # E_pi[b] rose toward its threshold
    assert {"loss", "nll", "mu", "lambda_0", "C_0", "reward_0", "samples"} <= set(history[-1])


def test_l3m_conditions_on_the_lm_prompt():
    """With a prompted LM, a step's reward is E_{a(.|prompt)}[b] (within 5 standard errors) and its NLL the
    exact NLL of the SFT rows under a(. | prompt)."""
    model = TinyTransformerARM(4, 4, eos_id=0, d_model=16, context_len=2)
    space = SequenceSpace.of(model, 4)
    constraint = C.contains_token(1)
    lm = LM.of(model, model.init(jax.random.PRNGKey(2))).with_prompt((model.bos_id, 2))
    b = exact_constraint(space, constraint)
    with jax.enable_x64(True):
        log_a = exact_log_prob(model, lm.params, 4, prompt_P=list(lm.prompt))
        ar, ar_unprompted = np.exp(log_a[b]).sum(), np.exp(exact_log_prob(model, lm.params, 4)[b]).sum()
    rows = sample(jax.random.PRNGKey(3), model, lm.params, *lm.prompt_arrays(16), 4)
    n = 512
    assert abs(ar - ar_unprompted) > 10 * np.sqrt(ar * (1 - ar) / n)  # the prompt matters
    cfg = L3MConfig(thresholds=[0.9], total_steps=10, n_samples=n, batch_size=16, max_new_tokens=4, learning_rate=1e-3)
    trainer = L3M(lm, rows.tokens_BT, rows.lengths_B, constraint, cfg)
    _, metrics = trainer.step(trainer.init_state(lm.params), jax.random.PRNGKey(4))
    assert abs(float(metrics["reward_0"]) - ar) < 5 * np.sqrt(ar * (1 - ar) / n), (float(metrics["reward_0"]), ar)
    np.testing.assert_allclose(float(metrics["nll"]), -log_a[space.index(np.asarray(rows.tokens_BT))].mean(), rtol=1e-4)


def test_l3m_config_errors():
    with pytest.raises(ValueError, match="thresholds"):
        L3MConfig(thresholds=[], total_steps=10)
    with pytest.raises(ValueError, match="mu_end"):
        L3MConfig(thresholds=[0.5], total_steps=10, mu_end=2.0)
    model = TabularARM(3, 3, eos_id=0)
    with pytest.raises(ValueError, match="one per threshold"):
        L3M(LM.of(model, model.init(jax.random.PRNGKey(0))), np.zeros((4, 3)), np.ones(4), [CONSTRAINT, CONSTRAINT], L3MConfig(thresholds=[0.5], total_steps=10, batch_size=2))
