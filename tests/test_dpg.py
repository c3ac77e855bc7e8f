"""DPG on toy neural ARMs: unbiased gradients (vs exact enumeration), convergence to g, warm starts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guard_jax import constraints as C
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, exact_quantities, grid_log_prob, log_gold
from guard_jax.lm import LM
from guard_jax.models.gpt2 import GPT2
from guard_jax.models.toy import TinyTransformerARM
from guard_jax.sampling import bos_prompt, log_prob, sample
from guard_jax.train import dpg
from guard_jax.train.common import sample_many, trainable
from guard_jax.train.dpg import DPG, DPGConfig, dpg_loss, score_batches
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.sft import SFT, SFTConfig
from guard_jax.train.warm import load_params

MODEL = TinyTransformerARM(4, 4, eos_id=0, d_model=32)
B = C.contains_ngram([2, 3])
SPACE = SequenceSpace.of(MODEL, 4)


@pytest.fixture(scope="module")
def toy():
    a_params = MODEL.init(jax.random.PRNGKey(0))
    b = exact_constraint(SPACE, B)
    with jax.enable_x64(True):
        log_a = exact_log_prob(MODEL, a_params, 4)
    return a_params, b, log_a


def exact_kl(params, log_a, b):
    with jax.enable_x64(True):
        return exact_quantities(log_a, exact_log_prob(MODEL, params, 4), b)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("on_policy", [True, False])
def test_gradient_is_unbiased(toy, on_policy):
    a_params, b, log_a = toy
    pi_params = MODEL.init(jax.random.PRNGKey(1))  # a policy different from a
    q_params = pi_params if on_policy else a_params
    log_g = jnp.asarray(log_gold(log_a, b), jnp.float32)
    exact = _flat(jax.grad(lambda p: -jnp.sum(jnp.where(jnp.isfinite(log_g), jnp.exp(log_g) * grid_log_prob(MODEL, p, 4), 0.0)))(pi_params))
    log_z = jnp.asarray(np.log(np.exp(log_a[b]).sum()), jnp.float32)
    prompt, mask = bos_prompt(MODEL, 2000)

    @jax.jit
    def estimate(key):
        s = sample(key, MODEL, q_params, prompt, mask, 4)
        log_a_B = log_prob(MODEL, a_params, prompt, mask, s.tokens_BT, s.lengths_B)[0]
        logP = jnp.where(B.fn(s.tokens_BT, s.lengths_B), log_a_B, -jnp.inf)
        return jax.grad(lambda p: dpg_loss(p, MODEL, prompt, mask, s.tokens_BT, s.lengths_B, s.logp_B, logP, log_z)[0])(pi_params)

    grads = np.stack([_flat(estimate(jax.random.PRNGKey(100 + i))) for i in range(60)])
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(len(grads))
    # unbiased: the squared error matches the estimated variance (E||mean - exact||^2 = sum se^2) ...
    ratio = np.sum((mean - exact) ** 2) / np.sum(se**2)
    assert 0.5 < ratio < 2.0, ratio
    # ... no coordinate is off by more than its CI allows (se floored at float32 round-off) ...
    z = (mean - exact) / np.maximum(se, 1e-3 * np.median(se))
    assert np.all(np.abs(z) < 6), np.abs(z).max()
    # ... and the signal is real
    assert np.linalg.norm(mean - exact) < 0.2 * np.linalg.norm(exact)


def test_dpg_converges_to_g_and_theorem2_holds(toy):
    a_params, b, log_a = toy
    start = exact_kl(a_params, log_a, b)
    assert start.kl_g_a2 >= 1.0
    trainer = DPG(LM.of(MODEL, a_params), B, DPGConfig(n_samples=512, minibatch=128, max_new_tokens=4, learning_rate=3e-3))
    state, history = run(trainer, trainer.init_state(a_params), LoopConfig(steps=150, progress=False))
    end = exact_kl(state.params, log_a, b)
    assert end.kl_g_a2 < 0.05, end
    assert end.ar > 0.9 > start.ar
    assert abs(end.kl_g_a2 - (-end.log_ar + end.kl_g_g2)) < 1e-9
    assert abs(history[-1]["z"] - start.z) < 0.1 * start.z  # the running Z-hat estimates Z
    assert history[-1]["ar_pi"] > 0.9


def test_off_policy_dpg_swaps_the_proposal_and_converges(toy):
    a_params, b, log_a = toy
    cfg = DPGConfig(n_samples=512, minibatch=128, max_new_tokens=4, learning_rate=3e-3, on_policy=False, swap_every=5)
    trainer = DPG(LM.of(MODEL, a_params), B, cfg)
    state, history = run(trainer, trainer.init_state(a_params), LoopConfig(steps=150, progress=False))
    assert sum(h["swapped"] for h in history) >= 2
    assert exact_kl(state.params, log_a, b).kl_g_a2 < 0.1


def test_off_policy_dpg_samples_the_proposal_prompt_and_scores_a_on_its_own():
    """q = a(. | BOS, 2), a CAP-like proposal with a longer prompt: one step's acceptance rate is AR_q and
    its Z-hat (the mean of a·b / q over the samples of q, a scored on [BOS] left-padded) is Z, each within
    5 standard errors computed exactly by enumeration."""
    model = TinyTransformerARM(4, 4, eos_id=0, d_model=32, context_len=2)
    a = LM.of(model, model.init(jax.random.PRNGKey(3)))
    q = a.with_prompt((model.bos_id, 2))
    b = exact_constraint(SPACE, B)
    with jax.enable_x64(True):
        log_a, log_q = (exact_log_prob(model, a.params, 4, prompt_P=list(lm.prompt)) for lm in (a, q))
    ar_q, z = np.exp(log_q[b]).sum(), np.exp(log_a[b]).sum()
    n = 2048
    se_ar = np.sqrt(ar_q * (1 - ar_q) / n)
    w = np.exp(np.subtract(log_a, log_q, out=np.full_like(log_a, -np.inf), where=b))  # a·b / q
    se_z = np.sqrt((np.sum(np.exp(log_q) * w**2) - z**2) / n)
    assert abs(ar_q - np.exp(log_a[b]).sum()) > 10 * se_ar  # the prompt changes the law
    trainer = DPG(a, B, DPGConfig(n_samples=n, minibatch=512, max_new_tokens=4, learning_rate=1e-3, on_policy=False), proposal=q)
    state = trainer.init_state(a.params)
    _, metrics = trainer.step(state, jax.random.PRNGKey(11))
    assert abs(float(metrics["ar"]) - ar_q) < 5 * se_ar, (float(metrics["ar"]), ar_q)
    assert abs(float(metrics["z"]) - z) < 5 * se_z, (float(metrics["z"]), z, se_z)


def test_warm_start_from_sft_needs_fewer_steps(toy, tmp_path):
    a_params, b, log_a = toy
    prompt, mask = bos_prompt(MODEL, 4096)
    s = sample(jax.random.PRNGKey(7), MODEL, a_params, prompt, mask, 4)
    keep = np.asarray(B(s.tokens_BT, s.lengths_B))
    sft = SFT(LM.of(MODEL, a_params), np.asarray(s.tokens_BT)[keep], np.asarray(s.lengths_B)[keep], SFTConfig(batch_size=64, learning_rate=3e-3))
    sft_state, _ = run(sft, sft.init_state(a_params), LoopConfig(steps=2 * sft.steps_per_epoch, out_dir=tmp_path, progress=False, tensorboard=False))
    warm_params = load_params(tmp_path, like=a_params)  # SFT -> DPG through the Orbax checkpoint
    jax.tree.map(np.testing.assert_array_equal, warm_params, sft_state.params)
    cfg = DPGConfig(n_samples=256, minibatch=128, max_new_tokens=4, learning_rate=3e-3)

    def steps_to(params, target=0.1, max_steps=200):
        trainer = DPG(LM.of(MODEL, a_params), B, cfg)
        state = trainer.init_state(params)
        for k in range(10, max_steps + 1, 10):
            state, _ = run(trainer, state, LoopConfig(steps=k, progress=False))
            if exact_kl(state.params, log_a, b).kl_g_a2 < target:
                return k
        return max_steps + 1

    cold, warm = steps_to(a_params), steps_to(warm_params)
    assert exact_kl(sft_state.params, log_a, b).kl_g_a2 < exact_kl(a_params, log_a, b).kl_g_a2
    assert warm < cold, (warm, cold)


def test_bad_configs_are_refused(toy):
    a_params = toy[0]
    with pytest.raises(ValueError, match="divisible by minibatch"):
        DPGConfig(n_samples=100, minibatch=30)
    with pytest.raises(ValueError, match="learning_rate"):
        DPGConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="off-policy"):
        DPG(LM.of(MODEL, a_params), B, DPGConfig(), proposal=LM.of(MODEL, a_params))
    with pytest.raises(ValueError, match="model of base"):
        other = TinyTransformerARM(4, 4, eos_id=0, d_model=16)
        DPG(LM.of(MODEL, a_params), B, DPGConfig(on_policy=False), proposal=LM.of(other, other.init(jax.random.PRNGKey(0))))
    never = C.predicate(lambda t, n: np.zeros(len(n), bool), "never")
    trainer = DPG(LM.of(MODEL, a_params), never, DPGConfig(n_samples=64, minibatch=32, max_new_tokens=4, learning_rate=1e-3))
    with pytest.raises(ValueError, match="no sample of the proposal satisfied the constraint"):
        run(trainer, trainer.init_state(a_params), LoopConfig(steps=1, progress=False))


@pytest.mark.parametrize("accepted", ["none", "few", "more_than_a_minibatch", "all"])
def test_log_P_scores_only_accepted_rows_and_equals_scoring_every_row(accepted):
    """DPG.log_P (a scored on the rows with b = 1 only, in power-of-two batches) equals a's teacher-forced
    log-prob of every row under the trainer's padded prompt, masked by b, to float rounding; -inf exactly where
    b = 0. Covers a prompt longer than a's (q = a(. | BOS, 2): the step pads a's prompt), no, few and many
    accepted rows."""
    model = TinyTransformerARM(4, 4, eos_id=0, d_model=32, context_len=2)
    a = LM.of(model, model.init(jax.random.PRNGKey(3)))
    q = a.with_prompt((model.bos_id, 2))
    n, mb = 256, 64
    trainer = DPG(a, B, DPGConfig(n_samples=n, minibatch=mb, max_new_tokens=4, learning_rate=1e-3, on_policy=False), proposal=q)
    s = sample(jax.random.PRNGKey(5), model, a.params, *q.prompt_arrays(n), 4)
    tokens_NT, lengths_N = np.asarray(s.tokens_BT), np.asarray(s.lengths_B)
    b_N = {"none": np.zeros(n, bool), "few": np.arange(n) % 37 == 3, "more_than_a_minibatch": np.arange(n) % 3 > 0,
           "all": np.ones(n, bool)}[accepted]
    got_N = trainer.log_P(tokens_NT, lengths_N, b_N)
    prompt_NP, mask_NP = jnp.repeat(trainer.prompt, n, 0), jnp.repeat(trainer.mask, n, 0)
    assert trainer.prompt.shape[1] == 2  # a's [BOS] left-padded to q's prompt length
    want_N = np.where(b_N, np.asarray(log_prob(model, a.params, prompt_NP, mask_NP, tokens_NT, lengths_N)[0]), -np.inf)
    assert got_N.dtype == np.float32 and np.array_equal(np.isinf(got_N), ~b_N)
    np.testing.assert_allclose(got_N[b_N], want_N[b_N], rtol=1e-6, atol=1e-6)


def test_score_batches_pad_only_the_last_batch_to_a_power_of_two():
    assert score_batches(0, 256) == [] and score_batches(1, 256) == [32] and score_batches(20, 16) == [16, 16]
    assert score_batches(300, 256) == [256, 64] and score_batches(512, 256) == [256, 256] and score_batches(257, 256) == [256, 32]
    assert score_batches(100, 256) == [128] and score_batches(100, 256, multiple=3) == [129] and score_batches(40, 48) == [48]
    for n in range(0, 700, 7):
        sizes = score_batches(n, 96, 8)
        assert sum(sizes) >= n and sum(sizes[:-1]) < max(n, 1) and all(s % 8 == 0 for s in sizes)
        assert len(set(sizes)) <= 2 and (not sizes or sizes[-1] < 2 * max(n - sum(sizes[:-1]), 32))


def test_minibatch_is_gradient_accumulation(toy):
    """`DPGConfig.minibatch` is the memory knob of an update: the same samples in M = 4 minibatches of 16
    give the gradient and the metrics of one minibatch of 64 (gradients averaged over minibatches, one
    optimizer step), up to float rounding; only the per-minibatch activations shrink."""
    a_params, _, _ = toy
    pi_params = MODEL.init(jax.random.PRNGKey(1))
    prompt, mask = bos_prompt(MODEL, 64)
    s = sample(jax.random.PRNGKey(3), MODEL, pi_params, prompt, mask, 4)
    b = jnp.asarray(B(s.tokens_BT, s.lengths_B))
    assert 0 < int(b.sum()) < 64
    log_a = log_prob(MODEL, a_params, prompt, mask, s.tokens_BT, s.lengths_B)[0]
    logP = jnp.where(b, log_a, -jnp.inf)
    log_z = jax.scipy.special.logsumexp(logP - s.logp_B) - jnp.log(64.0)
    out = {}
    for M in (1, 4):
        trainer = DPG(LM.of(MODEL, a_params), B, DPGConfig(n_samples=64, minibatch=64 // M, max_new_tokens=4, learning_rate=1e-2))
        split = lambda x: x.reshape(M, 64 // M, *x.shape[1:])
        grads, _, _ = dpg.dpg_gradient(pi_params, MODEL, trainer.prompt, trainer.mask, split(s.tokens_BT), split(s.lengths_B),
                                       split(s.logp_B), split(logP), jnp.full((M,), log_z))
        _, metrics = dpg._update(trainer.init_state(pi_params), trainer.prompt, trainer.mask, split(s.tokens_BT),
                                 split(s.lengths_B), split(s.logp_B), split(logP), split(b), model=MODEL, optimizer=trainer.optimizer)
        out[M] = (_flat(grads), metrics)
    (g1, m1), (g4, m4) = out[1], out[4]
    assert np.abs(g1).max() > 1e-2  # a real gradient
    np.testing.assert_allclose(g4, g1, atol=1e-6 * np.abs(g1).max())
    for key in ("loss", "log_z", "grad_norm", "kl_g_pi"):
        np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5, err_msg=key)


GPT = GPT2(vocab_size=40, n_positions=40, n_embd=16, n_layer=1, n_head=2, bos_id=0, eos_id=1)


def _gpt_samples(params, M: int, minibatch: int, T: int, seed: int):
    prompt, mask = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)
    tokens, lengths, logq = sample_many(jax.random.PRNGKey(seed), GPT, params, prompt, mask, M, minibatch, T)
    split = lambda x: x.reshape(M, minibatch, *x.shape[1:])
    return prompt, mask, split(tokens), split(lengths), split(logq)


@pytest.mark.parametrize("on_policy", [False, True])
def test_sorted_truncated_groups_give_the_gradient_of_full_width_minibatches(on_policy, monkeypatch):
    """dpg_gradient sorts the rows by length into groups cut to a few widths, and on-policy takes log pi's value
    from the sampler: the gradient, loss and log pi of the plain mean over minibatches of full-width dpg_loss
    gradients (each minibatch with its own log Z-hat), to float rounding."""
    monkeypatch.setattr(dpg, "GROUP_ROWS", 8)
    params = GPT.init(jax.random.PRNGKey(0))
    M, mb, T = 3, 32, 30
    prompt, mask, tok, lengths, logq = _gpt_samples(params, M, mb, T, seed=2)
    g = dpg.group_rows(mb)
    group_max = np.sort(np.asarray(lengths).reshape(-1)).reshape(-1, g).max(1)
    widths = dpg.truncation_widths(T)
    assert g < mb and len({min(w for w in widths if w >= m) for m in group_max}) >= 3  # several groups, three widths used
    logP = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(5), 0.4, (M, mb)), logq + jax.random.normal(jax.random.PRNGKey(6), (M, mb)), -jnp.inf)
    log_z_M = jnp.array([-0.7, -0.9, -1.2])
    prompt_B, mask_B = jnp.repeat(prompt, mb, 0), jnp.repeat(mask, mb, 0)
    ref = [jax.value_and_grad(dpg_loss, has_aux=True)(params, GPT, prompt_B, mask_B, tok[m], lengths[m], logq[m], logP[m], log_z_M[m])
           for m in range(M)]
    want = _flat(jax.tree.map(lambda *x: sum(x) / M, *[r[1] for r in ref]))
    grads, loss_M, logpi_MB = jax.jit(dpg.dpg_gradient, static_argnames=("model", "mesh", "on_policy"))(
        params, GPT, prompt, mask, tok, lengths, logq, logP, log_z_M, on_policy=on_policy)
    assert np.abs(want).max() > 1e-2
    # float rounding of the regrouped sums: 1.2e-6 of the largest entry off-policy on an AVX-512 CPU (one entry of 4,592)
    np.testing.assert_allclose(_flat(grads), want, atol=(3e-5 if on_policy else 5e-6) * np.abs(want).max())
    np.testing.assert_allclose(float(loss_M.mean()), np.mean([float(r[0][0]) for r in ref]), rtol=1e-5)
    np.testing.assert_allclose(logpi_MB, jnp.stack([r[0][1] for r in ref]), rtol=1e-5)


def test_dpg_steps_compile_the_update_once_whatever_the_lengths(monkeypatch):
    """The update holds every truncation width in one program: steps whose samples have other lengths (so other
    groups and widths) reuse it, on- and off-policy (the general update: q never taken for pi)."""
    params = GPT.init(jax.random.PRNGKey(0))
    b = lambda tokens_NT, lengths_N: np.asarray(tokens_NT)[:, 0] % 2 == 0
    for on_policy in (True, False):
        if not on_policy:
            monkeypatch.setattr(DPG, "q_is_policy", lambda self, state: False)
        trainer = DPG(LM.of(GPT, params), b, DPGConfig(n_samples=64, minibatch=32, max_new_tokens=30, learning_rate=1e-2,
                                                       on_policy=on_policy))
        state = trainer.init_state(params)
        state, _ = trainer.step(state, jax.random.PRNGKey(0))
        compiled = dpg._update.jitted._cache_size()
        for i in range(1, 4):
            state, metrics = trainer.step(state, jax.random.PRNGKey(i))
            assert np.isfinite(float(metrics["loss"]))
        assert dpg._update.jitted._cache_size() == compiled


def test_a_step_whose_q_is_the_policy_takes_the_on_policy_update_with_the_same_result(monkeypatch):
    """Off-policy, the step right after a swap samples pi itself: it takes the on-policy update (no head forward),
    which gives the general update's metrics and params to float rounding, equal KL estimates (so no swap), and
    compiles nothing new next to an on-policy trainer's update; off-policy DPGs whose q prompts differ share one
    program too."""
    params = GPT.init(jax.random.PRNGKey(0))
    b = lambda tokens_NT, lengths_N: np.asarray(tokens_NT)[:, 0] % 2 == 0
    cfg = dict(n_samples=64, minibatch=32, max_new_tokens=30, learning_rate=1e-2)
    a = LM.of(GPT, params)
    on = DPG(a, b, DPGConfig(**cfg))
    on.step(on.init_state(params), jax.random.PRNGKey(0))
    off = DPG(a, b, DPGConfig(**cfg, on_policy=False, swap_every=1), proposal=a.with_prompt((GPT.bos_id, 5, 7)))
    off.optimizer = on.optimizer
    state = off.init_state(params)
    assert not off.q_is_policy(state)
    compiled = dpg._update.jitted._cache_size()
    state, m = off.step(state, jax.random.PRNGKey(1))
    assert dpg._update.jitted._cache_size() == compiled + 1  # the off-policy update
    assert off.q_is_policy(state) == bool(m["swapped"])  # after a swap q is pi, else still the first proposal
    swapped = state._replace(extra=state.extra | {"proposal": trainable(state.params), "q_prompt": off.prompt, "q_mask": off.mask})
    assert off.q_is_policy(swapped)
    routed, m_on = off.step(swapped, jax.random.PRNGKey(2))
    assert dpg._update.jitted._cache_size() == compiled + 1  # the on-policy trainer's program
    assert float(m_on["kl_g_pi"]) == float(m_on["kl_g_q"]) and m_on["swapped"] == 0.0
    monkeypatch.setattr(DPG, "q_is_policy", lambda self, state: False)
    general, m_off = off.step(swapped, jax.random.PRNGKey(2))
    for k in ("loss", "log_z", "ar", "ar_pi", "kl_g_pi", "grad_norm"):
        np.testing.assert_allclose(float(m_on[k]), float(m_off[k]), rtol=1e-4, err_msg=k)
    for x, y in zip(jax.tree.leaves(routed.params), jax.tree.leaves(general.params)):
        np.testing.assert_allclose(x, y, atol=1e-2 * cfg["learning_rate"])  # one Adam step moves each weight ~lr
    default_q = DPG(a, b, DPGConfig(**cfg, on_policy=False, swap_every=1))
    default_q.optimizer = on.optimizer
    monkeypatch.undo()
    s = default_q.init_state(params)
    assert default_q.q_is_policy(s)  # q = the initial policy: on-policy from the first step
    monkeypatch.setattr(DPG, "q_is_policy", lambda self, state: False)
    default_q.step(s, jax.random.PRNGKey(3))
    assert dpg._update.jitted._cache_size() == compiled + 1  # the off-policy program of the longer-prompt q
