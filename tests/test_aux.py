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


def _grid_corpus(space):
    """Every valid grid sequence once: the corpus law D is uniform on them and visits every valid prefix."""
    tokens_NT = space.tokens(np.arange(space.size))
    lengths_N, valid_N = space.lengths_and_valid(tokens_NT)
    valid_N = np.asarray(valid_N)
    return np.asarray(tokens_NT)[valid_N], np.asarray(lengths_N)[valid_N]


@pytest.mark.parametrize("lam", [0.0, 0.5, 4.0])
def test_corpus_objective_is_minimised_by_the_mixture_of_corpus_and_q(lam, x64):
    """For a tabular policy the corpus NLL + lam · token KL(q || p) is stationary exactly at
    p(.|u) = (D(.|u) + lam q(.|u)) / (1 + lam) on every corpus prefix u (D: the corpus's conditionals)."""
    from guard_jax.exact import arm_from_law
    from guard_jax.train.aux import corpus_objective

    a = TabularARM(3, 3, eos_id=0)
    a_params = a.init(jax.random.PRNGKey(0), scale=1.5)
    space = SequenceSpace.of(a, 3)
    log_a = exact_log_prob(a, a_params, 3)
    head, head_params = exact_prefix_values(space, log_a, exact_constraint(space, B))
    aux = AuxProposal(a, head)
    tokens, lengths = _grid_corpus(space)
    idx = space.index(tokens)
    log_d = np.full(space.size, -np.inf)
    log_d[idx] = -np.log(len(idx))
    _, d_params = arm_from_law(space, log_d)
    q_rows = jnp.exp(AuxProposal.combine(a_params["logits_NV"], head_params["logits_NV"]))
    p_rows = (jax.nn.softmax(d_params["logits_NV"]) + lam * q_rows) / (1 + lam)
    star = {"logits_NV": jnp.log(jnp.maximum(p_rows, 1e-300))}  # finite: rows after EOS put 0 mass on non-pad tokens
    prompt, mask = bos_prompt(a, len(tokens))
    aux_params = {"base": a_params, "head": head_params}

    def loss(p):
        return corpus_objective(a, p, aux, aux_params, prompt, mask, jnp.asarray(tokens), jnp.asarray(lengths), lam)[0]

    grad = jax.grad(loss)(star)["logits_NV"]
    assert float(jnp.max(jnp.abs(grad))) < 1e-10
    off = {"logits_NV": star["logits_NV"] + 0.3 * jax.random.normal(jax.random.PRNGKey(1), star["logits_NV"].shape)}
    assert float(jnp.max(jnp.abs(jax.grad(loss)(off)["logits_NV"]))) > 1e-3  # the check can fail
    assert float(loss(off)) > float(loss(star))


def test_the_corpus_objective_optimum_tends_to_g_as_lambda_grows(x64):
    """With the exact prefix values, the stationary policy's KL(g || p_lambda) decreases to 0 as lambda grows
    (p_lambda -> q = g); at lambda = 0 it is the corpus law (the SFT optimum)."""
    from guard_jax.exact import arm_from_law

    a = TabularARM(3, 3, eos_id=0)
    a_params = a.init(jax.random.PRNGKey(0), scale=1.5)
    space = SequenceSpace.of(a, 3)
    log_a = exact_log_prob(a, a_params, 3)
    b = exact_constraint(space, B)
    head, head_params = exact_prefix_values(space, log_a, b)
    tokens, _ = _grid_corpus(space)
    log_d = np.full(space.size, -np.inf)
    log_d[space.index(tokens)] = -np.log(len(tokens))
    _, d_params = arm_from_law(space, log_d)
    q_rows = jnp.exp(AuxProposal.combine(a_params["logits_NV"], head_params["logits_NV"]))
    kls = []
    for lam in (0.0, 1.0, 10.0, 100.0, 1e4):
        p_rows = (jax.nn.softmax(d_params["logits_NV"]) + lam * q_rows) / (1 + lam)
        log_p = exact_log_prob(a, {"logits_NV": jnp.log(p_rows)}, 3)
        if lam == 0:
            np.testing.assert_allclose(np.exp(log_p), np.exp(log_d), atol=1e-12)
        kls.append(exact_quantities(log_a, log_p, b).kl_g_a2)
    assert all(y < x for x, y in zip(kls, kls[1:])), kls
    assert kls[-1] < 1e-3 < kls[0], kls


def test_with_a_corpus_lambda_zero_is_the_sft_update(x64):
    """kl_weight = 0 with a corpus: the policy's update is exactly SFT's on the same corpus batch (same
    Adam, same (seed, step) rows), while the head still learns (concurrently, in the same step). In float64:
    Adam turns float32 round-off on near-zero gradients into full-size steps."""
    from guard_jax.train.sft import SFT, SFTConfig

    a = TabularARM(5, 4, eos_id=0)
    a_params = a.init(jax.random.PRNGKey(0))
    base = LM.of(a, a_params)
    s = sample(jax.random.PRNGKey(1), a, a_params, *bos_prompt(a, 40), 4)
    corpus = (np.asarray(s.tokens_BT), np.asarray(s.lengths_B))
    cfg = AuxConfig(n_samples=32, max_new_tokens=4, learning_rate=1e-2, kl_weight=0.0, corpus_batch=8, seed=3)
    trainer = AuxTrainer(base, a, B, cfg, corpus=corpus)
    head0 = a.init(jax.random.PRNGKey(2))
    state = trainer.init_state({"head": head0, "policy": a_params})
    sft = SFT(base, *corpus, SFTConfig(batch_size=8, learning_rate=1e-2, seed=3))
    sft_state = sft.init_state(a_params)
    for i in range(3):
        state, m = trainer.step(state, jax.random.PRNGKey(10 + i))
        sft_state, sm = sft.step(sft_state, jax.random.PRNGKey(10 + i))
        np.testing.assert_allclose(float(m["nll"]), float(sm["loss"]), rtol=1e-5)
    for u, v in zip(jax.tree.leaves(state.params["policy"]), jax.tree.leaves(sft_state.params)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-10)
    moved = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(state.params["head"]), jax.tree.leaves(head0)))
    assert moved > 1e-3
    assert float(m["token_kl"]) > 0 and {"nll", "bce", "token_kl", "loss"} <= set(m)
    # lambda > 0 changes the policy's update (the regulariser is live)
    t2 = AuxTrainer(base, a, B, AuxConfig(n_samples=32, max_new_tokens=4, learning_rate=1e-2, kl_weight=5.0, corpus_batch=8, seed=3),
                    corpus=corpus)
    s2, _ = t2.step(t2.init_state({"head": head0, "policy": a_params}), jax.random.PRNGKey(10))
    s1, _ = trainer.step(trainer.init_state({"head": head0, "policy": a_params}), jax.random.PRNGKey(10))
    assert max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(s1.params["policy"]), jax.tree.leaves(s2.params["policy"]))) > 1e-4
    with pytest.raises(ValueError, match="params must be"):
        trainer.init_state({"head": head0})
    with pytest.raises(ValueError, match="corpus_batch"):
        AuxTrainer(base, a, B, AuxConfig(corpus_batch=64), corpus=corpus)


@pytest.mark.slow
def test_large_lambda_fine_tuning_moves_the_policy_toward_g():
    """The trainer end to end on a tabular ARM with a corpus of a's samples: at large lambda the policy's exact
    KL(g || p) falls well below the SFT (lambda = 0) policy's, and its AR rises."""
    a = TabularARM(3, 4, eos_id=0)
    a_params = a.init(jax.random.PRNGKey(1), scale=1.0)
    space = SequenceSpace.of(a, 4)
    with jax.enable_x64(True):
        log_a = exact_log_prob(a, a_params, 4)
    b = exact_constraint(space, B)
    s = sample(jax.random.PRNGKey(7), a, a_params, *bos_prompt(a, 512), 4)
    corpus = (np.asarray(s.tokens_BT), np.asarray(s.lengths_B))
    out = {}
    for lam in (0.0, 20.0):
        head = TabularARM(3, 4, eos_id=0)
        cfg = AuxConfig(n_samples=512, max_new_tokens=4, learning_rate=3e-2, kl_weight=lam, corpus_batch=128)
        trainer = AuxTrainer(LM.of(a, a_params), head, B, cfg, corpus=corpus)
        state = trainer.init_state({"head": {"logits_NV": jnp.zeros_like(a_params["logits_NV"])}, "policy": a_params})
        state, _ = run(trainer, state, LoopConfig(steps=200, progress=False))
        p = trainer.policy_lm(state)
        with jax.enable_x64(True):
            out[lam] = exact_quantities(log_a, exact_log_prob(p.model, p.params, 4), b)
    assert out[20.0].kl_g_a2 < 0.5 * out[0.0].kl_g_a2, out
    assert out[20.0].ar > out[0.0].ar + 0.1, out
