"""KL-regularized RL on toy ARMs: exact training and the RL trainer (shared loop) reach a·exp(b/beta)/Z, which keeps
mass on b = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_quantities, grid_log_prob, log_rl_ideal
from guard_jax.lm import LM
from guard_jax.models.toy import TabularARM, TinyTransformerARM
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.rl import RL, RLConfig, exact_objective, sampled_loss

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


def test_rl_trainer_approaches_the_ideal_distribution(toy):
    model, params, b, log_a = toy
    trainer = RL(LM.of(model, params), CONSTRAINT, RLConfig(beta=BETA, n_samples=1024, max_new_tokens=3, learning_rate=0.05))
    state, history = run(trainer, trainer.init_state(params), LoopConfig(steps=400, progress=False))
    with jax.enable_x64(True):
        ideal = np.exp(log_rl_ideal(log_a, b, BETA))
        start = 0.5 * np.abs(np.exp(log_a) - ideal).sum()
        pi = np.exp(exact_log_prob(model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), state.params), 3))
    tv = 0.5 * np.abs(pi - ideal).sum()
    assert tv < 0.05 and tv < 0.2 * start, (tv, start)
    assert abs(history[-1]["reward"] - ideal[b].sum()) < 0.05  # E_pi[b] on the last samples ~ the ideal's AR
    assert {"loss", "reward", "kl_pi_a", "objective", "grad_norm", "samples"} <= set(history[-1])


def test_rl_trainer_on_a_tiny_transformer_moves_toward_its_ideal():
    model = TinyTransformerARM(4, 4, eos_id=0, d_model=16)
    constraint = C.contains_ngram([2, 3])
    params = model.init(jax.random.PRNGKey(0))
    b = exact_constraint(SequenceSpace.of(model, 4), constraint)
    with jax.enable_x64(True):
        log_a = exact_log_prob(model, params, 4)
        log_ideal = log_rl_ideal(log_a, b, 0.25)

    def kl_to_ideal(p):  # J(pi) = beta log Z_beta - beta KL(pi || pi_beta): the RL objective, exactly
        with jax.enable_x64(True):
            log_pi = exact_log_prob(model, p, 4)
        support = np.isfinite(log_pi)
        return float(np.sum(np.where(support, np.exp(log_pi) * (np.where(support, log_pi, 0.0) - np.where(support, log_ideal, 0.0)), 0.0)))

    trainer = RL(LM.of(model, params), constraint, RLConfig(beta=0.25, n_samples=256, max_new_tokens=4, learning_rate=1e-2))
    state, _ = run(trainer, trainer.init_state(params), LoopConfig(steps=40, progress=False))
    before, after = kl_to_ideal(params), kl_to_ideal(state.params)
    assert after < 0.5 * before, (before, after)


def test_rl_samples_and_scores_on_the_lm_prompt():
    """With a prompted base and pi = a, a step's reward is E_{a(.|prompt)}[r] (within 5 standard errors) and
    its KL(pi || a) estimate is 0: pi's samples and a's scores share the prompt."""
    model = TinyTransformerARM(4, 4, eos_id=0, d_model=16, context_len=2)
    constraint = C.contains_token(1)
    base = LM.of(model, model.init(jax.random.PRNGKey(2))).with_prompt((model.bos_id, 2))
    b = exact_constraint(SequenceSpace.of(model, 4), constraint)
    with jax.enable_x64(True):
        ar = np.exp(exact_log_prob(model, base.params, 4, prompt_P=list(base.prompt))[b]).sum()
        ar_unprompted = np.exp(exact_log_prob(model, base.params, 4)[b]).sum()
    n = 512
    assert abs(ar - ar_unprompted) > 10 * np.sqrt(ar * (1 - ar) / n)  # the prompt matters
    trainer = RL(base, constraint, RLConfig(beta=0.5, n_samples=n, max_new_tokens=4, learning_rate=1e-3))
    _, metrics = trainer.step(trainer.init_state(base.params), jax.random.PRNGKey(4))
    assert abs(float(metrics["reward"]) - ar) < 5 * np.sqrt(ar * (1 - ar) / n), (float(metrics["reward"]), ar)
    assert abs(float(metrics["kl_pi_a"])) < 1e-5


def test_rl_config_errors():
    with pytest.raises(ValueError, match="beta"):
        RLConfig(beta=0.0)
    with pytest.raises(ValueError, match="n_samples"):
        RLConfig(beta=1.0, n_samples=1)


def test_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        sampled_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 0.0)


def test_minibatched_update_equals_the_whole_batch():
    """n_samples in 4 minibatches (gradient accumulation) gives the same update as all at once."""
    model = TinyTransformerARM(vocab_size=4, max_len=4, eos_id=0)
    params = model.init(jax.random.PRNGKey(0))
    whole = RL(LM.of(model, params), C.contains_token(2), RLConfig(beta=0.3, n_samples=64, max_new_tokens=4, learning_rate=1e-2))
    from guard_jax.sampling import sample
    from guard_jax.train.rl import _rl_update

    s = sample(jax.random.PRNGKey(1), model, params, jnp.tile(whole.prompt, (64, 1)), jnp.tile(whole.mask, (64, 1)), 4)
    r = jnp.asarray(np.asarray(C.contains_token(2)(np.asarray(s.tokens_BT), np.asarray(s.lengths_B)), np.float32))
    SGD = optax.sgd(1.0)  # the update is the gradient itself (Adam would amplify round-off near 0)
    state = whole.init_state(params)._replace(opt_state=SGD.init(params))
    outs = [_rl_update(state, params, whole.prompt, whole.mask, s.tokens_BT.reshape(m, 64 // m, 4), s.lengths_B.reshape(m, 64 // m),
                       s.logp_B.reshape(m, 64 // m), r.reshape(m, 64 // m), jnp.float32(0.3), model=model, optimizer=SGD) for m in (1, 4)]
    (a, ma), (b, mb) = outs
    assert float(ma["grad_norm"]) > 1e-4
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    for k in ("loss", "grad_norm", "reward", "kl_pi_a"):
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        RLConfig(beta=1.0, n_samples=64, minibatch=24)
