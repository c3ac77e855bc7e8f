"""Llama, Mistral, Qwen2 and Qwen3 against transformers' PyTorch models on small random checkpoints.

Each case is saved by transformers (random weights, std 0.3 everywhere so attention is far from uniform),
loaded through `hf.load`, and compared: logits on random tokens and on a left-padded batch, prefill + decode
through the KV cache against the full forward, load -> export -> load exact, transformers reloading the
export, and the sampler's log-probs against teacher forcing. The cases cover: Llama 3.1 RoPE scaling with
biases and an untied head; a tied Llama with linear RoPE and multi-query attention; Mistral's sliding window
(4, shorter than the sequences); Qwen2's q/k/v biases, tied head and one sliding layer; Qwen3's q/k norms
with attention biases and a head_dim that is not hidden_size / heads.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from guard_jax.models import hf, llama  # noqa: E402
from guard_jax.models.decoder import RoPE  # noqa: E402
from tests.hf_parity import (  # noqa: E402
    apply, case_fixture, check_sampler_matches_log_prob, decode, left_pad_mask, prefill, random_tokens,
)

V = 128
COMMON = dict(
    vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)  # wavelengths of head_dim 24 fall in all three bands
CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(
        COMMON, head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, rope_parameters=LLAMA3)),
    "llama_tied": (transformers.LlamaConfig, dict(
        COMMON, num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    "mistral": (transformers.MistralConfig, dict(COMMON, sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, dict(
        COMMON, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(COMMON, head_dim=32, attention_bias=True)),
}


case = case_fixture(CONFIGS, llama.Llama)


def test_architecture_read_from_config(case):
    m = case.model
    expected = {
        "llama": dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=False, head_dim=24),
        "llama_tied": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=RoPE(500.0, "linear", factor=2.0)),
        "mistral": dict(sliding_window=4, layer_types=None, qkv_bias=False),
        "qwen2": dict(qkv_bias=True, o_bias=False, tie_word_embeddings=True, sliding_window=4,
                      layer_types=("full_attention", "sliding_attention")),
        "qwen3": dict(qk_norm=True, qkv_bias=True, o_bias=True, head_dim=32, sliding_window=None),
    }[case.name]
    assert {k: getattr(m, k) for k in expected} == expected


def test_logits_match_transformers(case):
    """One left-padded batch (one compile): rows padded by 0, 3 and 4 match transformers on their real tokens,
    the last row (row 2's tokens unpadded, then others) shows that padding changes nothing, and prefill +
    decode through the KV cache give the same logits as the full forward."""
    tokens_BT, mask_BT = random_tokens(2, (4, 12)), left_pad_mask([0, 3, 4, 0], 12)
    tokens_BT[3, :8] = tokens_BT[2, 4:]
    ours = np.asarray(apply(case.model, case.params, tokens_BT, mask_BT))
    real = mask_BT > 0
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[real], case.hf_logits(tokens_BT, mask_BT)[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[2, 4:], ours[3, :8], atol=1e-5, rtol=0)

    P = 5  # then decode 7 tokens one by one, past the sliding window of 4
    logits_BV, cache = prefill(case.model, case.params, tokens_BT[:, :P], mask_BT[:, :P], 12)
    np.testing.assert_allclose(np.asarray(logits_BV), ours[:, P - 1], atol=1e-5, rtol=0)
    for s in range(12 - P):
        logits_BV, cache = decode(case.model, case.params, jnp.asarray(tokens_BT[:, P + s]), cache)
        np.testing.assert_allclose(np.asarray(logits_BV), ours[:, P + s], atol=1e-5, rtol=0, err_msg=f"step {s}")


@pytest.mark.parametrize(("case", "change"), [
    ("llama", dict(rope_parameters=RoPE(10000.0))),
    ("llama_tied", dict(rope_parameters=RoPE(500.0))),
    ("mistral", dict(sliding_window=None)),
    ("qwen2", dict(layer_types=("full_attention", "full_attention"))),
], indirect=["case"])
def test_rope_scaling_and_windows_change_the_logits(case, change):
    """The parity test above would catch a missing RoPE scaling or sliding window: each changes the logits."""
    tokens_BT = random_tokens(5, (4, 12))
    ones = np.ones_like(tokens_BT)
    base = np.asarray(apply(case.model, case.params, tokens_BT, ones))
    other = np.asarray(apply(dataclasses.replace(case.model, **change), case.params, tokens_BT, ones))
    assert np.abs(other - base).max() > 1e-2


def test_export_round_trip_is_exact_and_transformers_reloads_it(case, tmp_path):
    hf.export(tmp_path, case.model, case.params)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as mine, safe_open(str(case.path / "model.safetensors"), "np") as ref:
        assert set(mine.keys()) == set(ref.keys())
        for name in ref.keys():
            np.testing.assert_array_equal(mine.get_tensor(name), ref.get_tensor(name), err_msg=name)
    model, params, _ = hf.load(tmp_path, tokenizer=False)
    assert model == case.model
    jax.tree.map(np.testing.assert_array_equal, params, case.params)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(again) is type(case.hf)
    tokens_BT, mask_BT = random_tokens(6, (2, 10)), left_pad_mask([0, 4], 10)
    np.testing.assert_array_equal(case.hf_logits(tokens_BT, mask_BT, hf=again), case.hf_logits(tokens_BT, mask_BT))


@pytest.mark.parametrize("case", ["mistral"], indirect=True)
def test_sampler_log_probs_equal_log_prob(case):
    """The sampler (prefill, decode and cache growth past the sliding window) against teacher-forced log_prob."""
    check_sampler_matches_log_prob(case.model, case.params, max_new_tokens=10)


@pytest.mark.parametrize("case", ["qwen3"], indirect=True)
def test_bfloat16_runs_and_is_close(case):
    model, params, _ = hf.load(case.path, dtype=jnp.bfloat16, tokenizer=False)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tokens_BT, mask_BT = random_tokens(8, (4, 12)), left_pad_mask([0, 2, 0, 5], 12)
    want = np.asarray(apply(case.model, case.params, tokens_BT, mask_BT))
    got = np.asarray(apply(model, params, tokens_BT, mask_BT))
    assert got.dtype == np.float32
    real = mask_BT > 0
    err = np.abs(got - want)[real]
    # no further from float32 than transformers' own bfloat16 model is
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(case.path, attn_implementation="eager", dtype=torch.bfloat16)
    hf_err = np.abs(case.hf_logits(tokens_BT, mask_BT, hf=hf16.eval()) - want)[real]
    assert err.mean() < 1.5 * hf_err.mean(), (err.mean(), hf_err.mean())
    _, cache = prefill(model, params, tokens_BT[:, :4], mask_BT[:, :4], 12)
    assert cache["k"][0].dtype == jnp.bfloat16


def test_clear_errors(tmp_path):
    config = llama.to_hf_config(llama.Llama(V, 16, 32, 1, 2, 1, 8))
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="falcon")))
    with pytest.raises(ValueError, match=r"unknown model_type 'falcon'.*supported: gemma, gemma2, gemma3, gemma3_text, gpt2, llama, mistral, qwen2, qwen3"):
        hf.load(tmp_path)
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported; supported: default, linear, llama3"):
        llama.from_hf_config(dict(config, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))
    with pytest.raises(ValueError, match="llama3.*needs low_freq_factor"):
        llama.from_hf_config(dict(config, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0}))
    with pytest.raises(ValueError, match="no bos_token_id, eos_token_id or pad_token_id"):
        llama.from_hf_config(dict(config, model_type="qwen2", bos_token_id=None, eos_token_id=None, pad_token_id=None))
    with pytest.raises(ValueError, match="qwen2 model has qkv_bias=True"):
        llama.Llama(V, 16, 32, 1, 2, 1, 8, family="qwen2")
    with pytest.raises(ValueError, match="qkv_bias and o_bias must be equal"):
        llama.Llama(V, 16, 32, 1, 2, 1, 8, qkv_bias=True)
    with pytest.raises(ValueError, match="hidden_act 'relu2' is not supported"):
        llama.from_hf_config(dict(config, hidden_act="relu2"))
    with pytest.raises(ValueError, match="num_attention_heads=2 must be a multiple of num_key_value_heads=3"):
        llama.Llama(V, 16, 32, 1, 2, 3, 8)


# config.json in the shape of released checkpoints (older transformers: rope_theta + rope_scaling, eos lists)
RELEASED = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        max_position_embeddings=131072, bos_token_id=0, eos_token_id=[1, 2, 3], pretraining_tp=1),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, rope_scaling=None, sliding_window=32768,
        use_sliding_window=False, max_window_layers=1, tie_word_embeddings=True, bos_token_id=5, eos_token_id=5),
    "mistral-7b-v0.1": dict(
        model_type="mistral", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, sliding_window=4096),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_shapes_read_as_transformers_reads_them(name):
    """Older config.json keys give the RoPE, window and head transformers derives from the same dict."""
    config = RELEASED[name]
    model = llama.from_hf_config(config)
    theirs = transformers.AutoConfig.for_model(**config)
    assert model.rope_parameters.to_hf() == {k: v for k, v in theirs.rope_parameters.items() if v is not None}
    assert model.tie_word_embeddings == theirs.tie_word_embeddings
    assert [model.window(i) for i in range(model.num_hidden_layers)] == [
        theirs.sliding_window if t == "sliding_attention" or name.startswith("mistral") else None
        for t in getattr(theirs, "layer_types", None) or ["full_attention"] * model.num_hidden_layers
    ]
    eos = theirs.eos_token_id
    assert (model.bos_id, model.eos_id) == (theirs.bos_token_id, eos[0] if isinstance(eos, list) else eos)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    inv_freq = LlamaRotaryEmbedding(theirs).inv_freq.numpy()
    np.testing.assert_allclose(model.rope(0).inv_freq(model.head_dim), inv_freq, rtol=1e-6, atol=0)
