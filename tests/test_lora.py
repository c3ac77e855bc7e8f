"""LoRA through qwix: a zero-initialised B leaves the model unchanged, merging gives the adapted model's
log-probs, the merged export loads in transformers with our logits, and the trainers update the adapters only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from guard_jax import lora
from guard_jax.lm import LM
from guard_jax.models import hf
from guard_jax.models import lora as lora_lib
from guard_jax.precision import with_precision, with_remat
from guard_jax.sampling import log_prob, sample
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
    np.testing.assert_array_equal(scores(pi), scores(base))
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
    np.testing.assert_array_equal(scores(pi), scores(with_precision(base, "bf16_compute")))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.with_lora(pi, rank=2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="name no projection"):
        lora.with_lora(base, rank=2, targets=("nothing",), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.with_lora(base, rank=0, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs an LM with LoRA"):
        lora.merge(base)
