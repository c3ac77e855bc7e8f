"""LoRA through qwix: a zero-initialised B leaves the model unchanged, merging gives the adapted model's
log-probs, the merged export loads in transformers with our logits, and the trainers update the adapters only."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from guard_jax import constraints as C
from guard_jax import lora
from guard_jax.lm import LM
from guard_jax.models import hf
from guard_jax.models import lora as lora_lib
from guard_jax.models.gpt2 import GPT2
from guard_jax.parallel import param_spec
from guard_jax.precision import with_precision, with_remat
from guard_jax.sampling import log_prob, sample
from guard_jax.train.aux import AuxConfig, AuxTrainer
from guard_jax.train.common import sample_many
from guard_jax.train.dpg import DPG, DPGConfig
from guard_jax.train.sft import SFT, SFTConfig, nll_per_token
from tests.hf_parity import make_case, random_tokens

CONFIGS = {
    "gpt2": transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                    bos_token_id=0, eos_token_id=0),
    "llama": transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def base(request, tmp_path_factory) -> LM:
    """A small random transformers checkpoint of each family, loaded as an unconditional LM."""
    case = make_case(request.param, CONFIGS[request.param], tmp_path_factory.mktemp(request.param) / "ckpt", std=0.2)
    return LM.of(case.model, case.params)


def perturbed(lm: LM, seed: int = 0, std: float = 0.2) -> LM:
    """The LoRA LM with random B (and A) so that the adapters change the model."""
    trainable, frozen = lora_lib.split(lm.params)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return lm.with_params(lora_lib.join(jax.tree.unflatten(treedef, noisy), frozen))


def scores(lm: LM, n=6, T=7, seed=1):
    prompt_BP, mask_BP = lm.prompt_arrays(n)
    tokens_BT = jnp.asarray(random_tokens(seed, (n, T), lm.model.vocab_size))
    lengths_B = jnp.asarray(np.arange(n) % T + 1, jnp.int32)
    return np.asarray(log_prob(lm.model, lm.params, prompt_BP, mask_BP, tokens_BT, lengths_B)[1])


def test_adapters_are_created_on_the_targets_only(base):
    pi = lora.with_lora(base, rank=3, alpha=6.0, targets=("q_proj", "v_proj", "c_attn"), key=jax.random.PRNGKey(0))
    adapters = lora_lib.adapters_of(pi.params)
    names = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    layers, modules = (("h_0", "h_1"), ("c_attn",)) if "h_0" in pi.params else (("layers_0", "layers_1"), ("q_proj", "v_proj"))
    assert names == {f"{l}/{m}/kernel_lora_{x}" for l in layers for m in modules for x in "ab"}
    for path, x in jax.tree_util.tree_leaves_with_path(adapters):
        assert (x.shape[-1] == 3) if path[-1].key.endswith("_lora_a") else (x.shape[0] == 3 and not np.asarray(x).any())
    # the base leaves are the base's arrays, untouched
    _, frozen = lora_lib.split(pi.params)
    assert all(a is b for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base.params)))
    assert pi.model.lora == lora_lib.LoraSpec(3, 6.0, ("q_proj", "v_proj", "c_attn"))


def test_zero_b_gives_the_base_log_probs_and_samples_exactly(base):
    pi = lora.with_lora(base, rank=4, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(scores(pi), scores(base), rtol=1e-6, atol=1e-6)  # the delta is exactly 0; XLA fuses differently
    prompt_BP, mask_BP = base.prompt_arrays(8)
    s_base = sample(jax.random.PRNGKey(2), base.model, base.params, prompt_BP, mask_BP, 6)
    s_pi = sample(jax.random.PRNGKey(2), pi.model, pi.params, prompt_BP, mask_BP, 6)
    np.testing.assert_array_equal(np.asarray(s_pi.tokens_BT), np.asarray(s_base.tokens_BT))
    np.testing.assert_allclose(np.asarray(s_pi.logp_B), np.asarray(s_base.logp_B), atol=1e-5, rtol=0)  # other fusions


def test_merge_gives_the_adapted_log_probs(base):
    pi = perturbed(lora.with_lora(base, rank=4, alpha=8.0, key=jax.random.PRNGKey(3)))
    adapted, merged = scores(pi), scores(lora.merge(pi))
    assert np.abs(adapted - scores(base)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(merged, adapted, atol=2e-5, rtol=0)
    assert lora.merge(pi).model == base.model
    # remat and the sampler's KV cache path run through the adapters too
    np.testing.assert_allclose(scores(with_remat(pi)), adapted, atol=1e-6, rtol=0)
    prompt_BP, mask_BP = pi.prompt_arrays(4)
    s = sample(jax.random.PRNGKey(4), pi.model, pi.params, prompt_BP, mask_BP, 5)
    tf = log_prob(pi.model, pi.params, prompt_BP, mask_BP, s.tokens_BT, s.lengths_B)[0]
    np.testing.assert_allclose(np.asarray(s.logp_B), np.asarray(tf), atol=2e-5, rtol=0)


def test_merged_export_loads_in_transformers_with_our_logits(base, tmp_path):
    pi = perturbed(lora.with_lora(base, rank=2, alpha=4.0, key=jax.random.PRNGKey(5)))
    with pytest.raises(ValueError, match="merge them first"):
        hf.export(tmp_path / "raw", pi.model, pi.params)
    path = lora.export(tmp_path / "merged", pi)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokens_BT = random_tokens(6, (3, 9), base.model.vocab_size)
    ours = np.asarray(pi.model.apply(pi.params, jnp.asarray(tokens_BT)))
    with torch.no_grad():
        theirs = ref(torch.tensor(tokens_BT)).logits.float().numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_with_lora_composes_with_precision_and_refuses_bad_input(base):
    pi = with_precision(lora.with_lora(base, rank=2, key=jax.random.PRNGKey(0)), "bf16_compute")
    assert {x.dtype for x in jax.tree.leaves(pi.params)} == {jnp.dtype(jnp.float32)} and pi.model.dtype == jnp.bfloat16
    np.testing.assert_allclose(scores(pi), scores(with_precision(base, "bf16_compute")), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.with_lora(pi, rank=2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="name no projection"):
        lora.with_lora(base, rank=2, targets=("nothing",), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.with_lora(base, rank=0, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs an LM with LoRA"):
        lora.merge(base)


# ---------------------------------------------------------------------------------------------- trainers
TINY = GPT2(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_id=0, eos_id=0)
HIT = C.contains_ngram([5])


@pytest.fixture(scope="module")
def tiny() -> LM:
    return LM.of(TINY, TINY.init(jax.random.PRNGKey(0)))


def _opt_size(opt_state) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0)


def _check_adapters_only(pi: LM, before, after, opt_state):
    """The frozen weights are the LM's own buffers after the step (no second copy), B moved away from 0, and Adam
    holds two moments per adapter."""
    (t0, f0), (t1, f1) = lora_lib.split(before), lora_lib.split(after)
    for x, y, z in zip(jax.tree.leaves(lora_lib.split(pi.params)[1]), jax.tree.leaves(f0), jax.tree.leaves(f1), strict=True):
        assert x.unsafe_buffer_pointer() == y.unsafe_buffer_pointer() == z.unsafe_buffer_pointer()
    assert any(np.asarray(b).any() for path, b in jax.tree_util.tree_leaves_with_path(t1) if path[-1].key.endswith("_lora_b"))
    assert _opt_size(opt_state) == 2 * lora.num_adapter_params(pi.params) < lora.num_adapter_params(pi.params) + sum(
        int(x.size) for x in jax.tree.leaves(f0))


def test_sft_step_lowers_the_loss_and_trains_the_adapters_only(tiny):
    pi = lora.with_lora(tiny, rank=2, key=jax.random.PRNGKey(1))
    tokens_NT = jnp.asarray(random_tokens(2, (8, 6), TINY.vocab_size))
    lengths_N = jnp.full((8,), 6, jnp.int32)
    trainer = SFT(pi, tokens_NT, lengths_N, SFTConfig(batch_size=8, learning_rate=1e-2))
    state0 = trainer.init_state(pi.params)
    prompt_BP, mask_BP = pi.prompt_arrays(8)
    nll = lambda params, model=pi.model: float(nll_per_token(model, params, prompt_BP, mask_BP, tokens_NT, lengths_N))
    np.testing.assert_allclose(nll(pi.params), nll(tiny.params, TINY), rtol=1e-6)  # B = 0: the base's loss
    state1, metrics = trainer.step(state0, jax.random.PRNGKey(2))
    assert nll(state1.params) < nll(state0.params)
    _check_adapters_only(pi, state0.params, state1.params, state1.opt_state)
    # bf16 compute with float32 adapters trains the same way
    half = with_precision(pi, "bf16_compute")
    t_half = SFT(half, tokens_NT, lengths_N, SFTConfig(batch_size=8, learning_rate=1e-2))
    s_half, _ = t_half.step(t_half.init_state(half.params), jax.random.PRNGKey(2))
    assert float(nll_per_token(half.model, s_half.params, prompt_BP, mask_BP, tokens_NT, lengths_N)) < nll(state0.params)


@pytest.mark.parametrize("on_policy", [True, False])
def test_dpg_step_matches_full_ft_at_step_0_and_lowers_its_surrogate(tiny, on_policy):
    pi = lora.with_lora(tiny, rank=2, alpha=4.0, key=jax.random.PRNGKey(3))
    cfg = DPGConfig(n_samples=32, minibatch=16, max_new_tokens=6, learning_rate=1e-2, on_policy=on_policy)
    lora_t, full_t = DPG(pi, HIT, cfg), DPG(tiny, HIT, cfg)
    key = jax.random.PRNGKey(4)
    s0 = lora_t.init_state(pi.params)
    s1, m = lora_t.step(s0, key)
    _, m_full = full_t.step(full_t.init_state(tiny.params), key)
    for name in ("loss", "log_z", "ar", "ar_pi", "kl_g_pi", "kl_g_q"):  # B = 0: the same samples, weights and loss
        # the loss is a mean of (8 b - 1) log pi, terms of about +-100 that cancel to 0.065: the LoRA matmuls'
        # rounding (log z within 1e-6) moves it by up to 2e-5 (measured on an AVX-512 CPU); a wrong weight or sample moves it by > 1
        np.testing.assert_allclose(m[name], m_full[name], rtol=1e-5, atol=1e-4 if name == "loss" else 1e-6, err_msg=name)
    _check_adapters_only(pi, s0.params, s1.params, s1.opt_state)
    if not on_policy:  # the frozen proposal keeps only adapters, the weights are the policy's
        assert lora_lib.has_adapters(s1.extra["proposal"]) and not lora_lib.split(s1.extra["proposal"])[1]
    # the update lowers the surrogate it descends: -mean[(P/(Z q) - pi_0/q) log pi] on the step's own samples
    tokens, lengths, logq = sample_many(key, pi.model, pi.params, *pi.prompt_arrays(1), 2, 16, 6)
    b = HIT(tokens, lengths)
    prompt_BP, mask_BP = pi.prompt_arrays(32)
    score_of = lambda params: log_prob(pi.model, params, prompt_BP, mask_BP, tokens, lengths)[0]
    logP, logpi0 = jnp.where(b, score_of(pi.params), -jnp.inf), score_of(pi.params)
    w, c = jnp.exp(logP - m["log_z"] - logq), jnp.exp(logpi0 - logq)
    surrogate = lambda params: float(-jnp.mean((w - c) * score_of(params)))
    assert surrogate(s1.params) < surrogate(s0.params)


def test_lora_refusals(tiny):
    pi = lora.with_lora(tiny, rank=2, key=jax.random.PRNGKey(0))
    other = lora.with_lora(LM.of(TINY, TINY.init(jax.random.PRNGKey(9))), rank=2, key=jax.random.PRNGKey(0))
    cfg = DPGConfig(n_samples=32, minibatch=16, max_new_tokens=6, learning_rate=1e-2)
    with pytest.raises(ValueError, match="frozen weights differ"):
        DPG(pi, HIT, cfg).init_state(other.params)
    with pytest.raises(ValueError, match="without LoRA adapters"):
        AuxTrainer(pi, TINY, HIT, AuxConfig(n_samples=16, max_new_tokens=4)).init_state({"head": pi.params})


def test_adapters_are_sharded_by_the_rules_large_dimension_over_model(tiny):
    """What the mesh check below runs on 8 devices, as specs: A [in, r] splits `in`, B [r, out] splits `out`."""
    pi = lora.with_lora(tiny, rank=4, key=jax.random.PRNGKey(0))
    specs = {"/".join(str(k.key) for k in path): param_spec("/".join(str(k.key) for k in path), x.shape, x.dtype, 4)
             for path, x in jax.tree_util.tree_leaves_with_path(lora_lib.adapters_of(pi.params))}
    assert specs["h_0/c_attn/kernel_lora_a"] == P("model", None) and specs["h_0/c_attn/kernel_lora_b"] == P(None, "model")
    assert specs["h_1/mlp_c_proj/kernel_lora_a"] == P("model", None) and specs["h_1/mlp_c_proj/kernel_lora_b"] == P(None, "model")


@pytest.mark.slow
def test_lora_training_on_a_2x4_mesh_matches_one_device():
    """tests/lora_mesh_check.py in a subprocess (8 forced host devices; about 80 s of CPU)."""
    script = pathlib.Path(__file__).parent / "lora_mesh_check.py"
    env = dict(os.environ, PYTHONPATH=str(script.parent.parent))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["dpg", "ok", "sft", "ok"]


@pytest.mark.slow
def test_bench_scale_lora_rows_hold_less_state_than_full_fine_tuning():
    """`bench_scale --quick --tuning full,lora`: the compiled LoRA steps train a fraction of the parameters and take
    smaller arguments (no weight-sized Adam moments, a's weights not held twice) than the same steps in full."""
    out = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--quick", "--tuning", "full,lora", "--cases", "dpg_update,sft_step"],
                         capture_output=True, text=True, timeout=1800, check=True,
                         env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent)))
    import json

    rows = {(r["case"], r["tuning"]): r for r in map(json.loads, out.stdout.splitlines())}
    assert sorted(rows) == [("dpg_update", "full"), ("dpg_update", "lora"), ("sft_step", "full"), ("sft_step", "lora")]
    for case in ("dpg_update", "sft_step"):
        full, lo = rows[case, "full"], rows[case, "lora"]
        assert 0 < lo["trained_params"] < full["params"] / 5 and lo["policy"] == "bf16"
        assert lo["argument_bytes"] < full["argument_bytes"] and lo["alias_bytes"] > 0
