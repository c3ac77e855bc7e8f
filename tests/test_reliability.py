"""Bad input is caught where it arises: non-finite logits and weights, broken checkpoint files."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from guard_jax import constraints as C
from guard_jax.lm import EMBEDDED, LM
from guard_jax.models import hf
from guard_jax.models.toy import TabularARM
from guard_jax.rejection import guard_sample
from guard_jax.sampling import NonFiniteError, categorical, check_finite_logp, draw, score

TOY = TabularARM(4, 3, eos_id=0)


def test_categorical_marks_rows_with_non_finite_logits():
    logits_BV = jnp.asarray([[0.0, 1.0, 2.0, -jnp.inf], [0.0, jnp.nan, 1.0, 2.0], [0.0, jnp.inf, 1.0, 2.0],
                             [-jnp.inf] * 4, [0.5, 0.5, 0.5, 0.5]])
    token_B, logp_B = categorical(jnp.full((5,), 0.7), logits_BV)
    logp_B = np.asarray(logp_B)
    assert np.isfinite(logp_B[[0, 4]]).all() and np.isnan(logp_B[1:4]).all()
    assert np.isclose(logp_B[4], np.log(0.25)) and int(token_B[0]) != 3  # the finite rows draw as before
    with pytest.raises(NonFiniteError, match="where: 3 of 5 sequence log-probs are NaN"):
        check_finite_logp(logp_B, "where")
    check_finite_logp(np.asarray([-np.inf, 0.0]), "a zero-probability score is not an error")


def _nan_at_root(params):
    return {"logits_NV": params["logits_NV"].at[0, 2].set(jnp.nan)}  # row 0: the first token's logits


def test_guard_sampler_refuses_samples_from_nan_logits():
    params = _nan_at_root(TOY.init(jax.random.PRNGKey(0)))
    with pytest.raises(NonFiniteError, match="sampling TabularARM .*no sample is returned"):
        guard_sample(jax.random.PRNGKey(0), LM.of(TOY, params), C.contains_token(1), 100, max_new_tokens=3, batch_size=64, progress=False)


def test_draw_and_score_refuse_non_finite_models():
    good, bad = TOY.init(jax.random.PRNGKey(0)), _nan_at_root(TOY.init(jax.random.PRNGKey(0)))
    with pytest.raises(NonFiniteError, match="sampling TabularARM"):
        draw(jax.random.PRNGKey(0), LM.of(TOY, bad), 10, max_new_tokens=3, batch_size=8, progress=False)
    d = draw(jax.random.PRNGKey(0), LM.of(TOY, good), 10, max_new_tokens=3, batch_size=8, progress=False)
    with pytest.raises(NonFiniteError, match="scoring with TabularARM"):
        score(LM.of(TOY, bad), d.tokens_NT, d.lengths_N, batch_size=8)


def test_loading_names_the_tensor_with_nan_and_the_broken_file(tmp_path):
    folder = tmp_path / "lm"
    shutil.copytree(EMBEDDED, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.1.attn.c_attn.weight"][0, 0] = np.inf
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors': tensor 'transformer.h.1.attn.c_attn.weight' holds 1 NaN/Inf"):
        hf.load(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors' is not a readable safetensors file.*truncated"):
        hf.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        hf.load(folder)


# ---- DPG: leave-one-batch-out Z-hat against the exact gradient; the no-b warning; NaN params ----

from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob, grid_log_prob, log_gold  # noqa: E402
from guard_jax.sampling import bos_prompt, log_prob, sample  # noqa: E402
from guard_jax.train.dpg import DPG, DPGConfig, dpg_gradient, minibatch_log_z  # noqa: E402

DPG_MODEL = TabularARM(4, 4, eos_id=0)
DPG_B = C.contains_ngram([2, 3])


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def dpg_toy():
    a, pi = DPG_MODEL.init(jax.random.PRNGKey(0)), DPG_MODEL.init(jax.random.PRNGKey(1))
    b = exact_constraint(SequenceSpace.of(DPG_MODEL, 4), DPG_B)
    with jax.enable_x64(True):
        log_a = exact_log_prob(DPG_MODEL, a, 4)
    log_g = jnp.asarray(log_gold(log_a, b), jnp.float32)
    exact = _flat(jax.grad(lambda p: -jnp.sum(jnp.where(jnp.isfinite(log_g), jnp.exp(log_g) * grid_log_prob(DPG_MODEL, p, 4), 0.0)))(pi))
    return a, pi, float(np.exp(log_a[b]).sum()), np.asarray(exact)


def _step_gradients(a, pi, trials, M, B, leave_one_out, log_z_sum=-np.inf, n_seen=0.0):
    """`trials` on-policy DPG step gradients from M minibatches of B samples of pi -> [trials, P]."""
    prompt_NP, mask_NP = bos_prompt(DPG_MODEL, M * B)
    prompt_1P, mask_1P = bos_prompt(DPG_MODEL, 1)

    def one(key):
        s = sample(key, DPG_MODEL, pi, prompt_NP, mask_NP, 4)
        log_a_N = log_prob(DPG_MODEL, a, prompt_NP, mask_NP, s.tokens_BT, s.lengths_B)[0]
        logP_MB = jnp.where(DPG_B.fn(s.tokens_BT, s.lengths_B), log_a_N, -jnp.inf).reshape(M, B)
        logq_MB = s.logp_B.reshape(M, B)
        log_z_M, _, _ = minibatch_log_z(jnp.float32(log_z_sum), jnp.float32(n_seen), logP_MB - logq_MB, leave_one_out)
        grads, _, _ = dpg_gradient(pi, DPG_MODEL, prompt_1P, mask_1P, s.tokens_BT.reshape(M, B, -1), s.lengths_B.reshape(M, B),
                                   logq_MB, logP_MB, log_z_M)
        return _flat(grads)

    f = jax.jit(jax.vmap(one))
    return np.concatenate([np.asarray(f(jax.random.split(jax.random.PRNGKey(7 + c), 200))) for c in range(trials // 200)])


def _bias(G_RP, exact_P):
    """(scale c fitted along the exact gradient, residual off that direction / its noise: ~1 when unbiased)."""
    mean, se = G_RP.mean(0), G_RP.std(0, ddof=1) / np.sqrt(len(G_RP))
    c = float(mean @ exact_P / (exact_P @ exact_P))
    return c, float(np.sum((mean - c * exact_P) ** 2) / np.sum(se**2))


def test_leave_one_batch_out_z_hat_gives_the_exact_gradient_direction(dpg_toy):
    """N = 128 samples per step in 4 minibatches, first step, on-policy with pi far from g (measured with 2,000
    trials: the running Z-hat's mean step gradient is 0.41 |exact| away from the exact gradient, 0.78 of it
    along it and a residual 175 times its noise; leave-one-batch-out: residual 0.2-0.8 times its noise, the
    scale Z E[1/Z-hat] = 3.0 at this first step)."""
    a, pi, z, exact = dpg_toy
    c_run, res_run = _bias(_step_gradients(a, pi, 400, 4, 32, False), exact)
    c_loo, res_loo = _bias(_step_gradients(a, pi, 400, 4, 32, True), exact)
    assert res_run > 10 and c_run < 1, (c_run, res_run)  # the running Z-hat is biased (the test can see it)
    assert res_loo < 3 and c_loo > 1, (c_loo, res_loo)  # leave-one-batch-out: only a positive scale remains


@pytest.mark.slow
def test_leave_one_batch_out_scale_is_one_after_many_samples(dpg_toy):
    """After 12,800 earlier samples (at the exact mean weight), Z-hat is close to Z: the scale is 1 within noise."""
    a, pi, z, exact = dpg_toy
    G = _step_gradients(a, pi, 1000, 4, 32, True, log_z_sum=math.log(z * 12_800), n_seen=12_800.0)
    c_late, res_late = _bias(G, exact)
    se_c = float(np.sqrt(np.sum((G.std(0, ddof=1) / np.sqrt(len(G)) * exact) ** 2)) / (exact @ exact))
    assert res_late < 3 and abs(c_late - 1) < 4 * se_c + 0.02, (c_late, se_c, res_late)


def test_minibatch_log_z_running_and_leave_one_out():
    logw_MB = jnp.log(jnp.asarray([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0]]))
    prev = jnp.log(jnp.float32(6.0))  # 6 earlier samples summing to 6
    run_M, total, n = minibatch_log_z(prev, jnp.float32(6.0), logw_MB, False)
    np.testing.assert_allclose(np.exp(run_M), np.full(3, 14 / 12), rtol=1e-6)
    loo_M, total2, n2 = minibatch_log_z(prev, jnp.float32(6.0), logw_MB, True)
    np.testing.assert_allclose(np.exp(loo_M), [10 / 10, 10 / 10, 14 / 10], rtol=1e-6)
    assert float(total) == float(total2) and float(n) == float(n2) == 12.0
    only_m = jnp.log(jnp.asarray([[1.0, 1.0], [0.0, 0.0]]))  # nothing but row 0 has weight: row 0 falls back
    loo_M, _, _ = minibatch_log_z(jnp.float32(-jnp.inf), jnp.float32(0.0), only_m, True)
    np.testing.assert_allclose(np.exp(loo_M), [0.5, 1.0], rtol=1e-6)  # row 0: running mean; row 1: row 0's mean
    with pytest.raises(ValueError, match="at least 2 minibatches"):
        DPGConfig(n_samples=64, minibatch=64, z_hat="leave_one_batch_out")
    with pytest.raises(ValueError, match="z_hat must be one of"):
        DPGConfig(z_hat="exact")


def test_dpg_warns_when_no_sample_satisfies_b_for_k_steps(dpg_toy):
    a, _, _, _ = dpg_toy
    calls = []

    def first_call_only(tokens_BT, lengths_B):  # b holds for one sample of the first step, then never
        out = np.zeros(len(tokens_BT), bool)
        out[0] = not calls
        calls.append(1)
        return out

    trainer = DPG(LM.of(DPG_MODEL, a), C.predicate(first_call_only), DPGConfig(n_samples=64, minibatch=32, max_new_tokens=4,
                                                                       learning_rate=1e-2, warn_after=3))
    state, seen = trainer.init_state(a), []
    with pytest.warns(RuntimeWarning, match="no sample satisfied the constraint in the last 3 steps"):
        for s in range(5):
            state, metrics = trainer.step(state, jax.random.PRNGKey(s))
            seen.append((metrics["steps_without_b"], metrics["no_b_warning"]))
    assert seen == [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (3.0, 1.0), (4.0, 1.0)]


def test_dpg_from_nan_params_names_the_samples_not_the_warm_start(dpg_toy):
    a, _, _, _ = dpg_toy
    bad = _nan_at_root(a)
    trainer = DPG(LM.of(DPG_MODEL, a), DPG_B, DPGConfig(n_samples=64, minibatch=32, max_new_tokens=4, learning_rate=1e-2))
    with pytest.raises(NonFiniteError, match="DPG step 0: samples of the policy"):
        trainer.step(trainer.init_state(bad), jax.random.PRNGKey(0))
