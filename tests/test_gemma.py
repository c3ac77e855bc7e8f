"""Gemma 1 / 2 / 3 (text) against transformers' PyTorch models on small random checkpoints.

The reference models get large random weights (std 0.3, norm weights too) so that attention is far from
uniform and both soft-caps bite; Gemma 2 and 3 have a sliding window (4) shorter than the test sequences,
Gemma 3 q/k norms and two RoPE bases (linear scaling on the global layer).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from guard_jax.constraints import contains_token  # noqa: E402
from guard_jax.lm import LM  # noqa: E402
from guard_jax.models import gemma, hf  # noqa: E402
from guard_jax.rejection import guard_sample  # noqa: E402
from guard_jax.sampling import bos_prompt, log_prob  # noqa: E402
from tests.hf_parity import (  # noqa: E402
    apply, case_fixture, check_sampler_matches_log_prob, decode, left_pad_mask, make_case, prefill, random_tokens,
)

V = 128
COMMON = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=8,
    max_position_embeddings=64, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)
CONFIGS = {
    # multi-query attention and a head_dim that is not hidden_size / heads
    "gemma": (transformers.GemmaConfig, dict(COMMON, num_hidden_layers=2, num_key_value_heads=1, head_dim=16)),
    # grouped-query attention, sliding / global alternation, soft-caps that bite, query_pre_attn_scalar != head_dim
    "gemma2": (transformers.Gemma2Config, dict(
        COMMON, num_hidden_layers=2, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    )),
    # q/k norms, a sliding and a global layer with their own RoPE bases, linear scaling on the global one
    "gemma3_text": (transformers.Gemma3TextConfig, dict(
        COMMON, num_hidden_layers=2, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0}},
    )),
}


def load_local(path, dtype=jnp.float32):
    """Through the general loader (registry by model_type): -> (model, params)."""
    model, params, _ = hf.load(path, dtype=dtype, tokenizer=False)
    assert isinstance(model, gemma.Gemma)
    return model, params


case = case_fixture(CONFIGS, gemma.Gemma)


def test_logits_match_transformers(case):
    tokens_BT = random_tokens(1, (2, 12))
    ours = np.asarray(apply(case.model, case.params, tokens_BT, np.ones_like(tokens_BT)))
    np.testing.assert_allclose(ours, case.hf_logits(tokens_BT), atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers_and_unpadded_rows(case):
    tokens_BT, mask_BT = random_tokens(2, (3, 12)), left_pad_mask([0, 3, 7], 12)
    ours = np.asarray(apply(case.model, case.params, tokens_BT, mask_BT))
    assert np.isfinite(ours).all()
    real = mask_BT > 0
    np.testing.assert_allclose(ours[real], case.hf_logits(tokens_BT, mask_BT)[real], atol=1e-4, rtol=0)
    # padding changes nothing: the padded row equals the same tokens alone
    alone = np.asarray(apply(case.model, case.params, tokens_BT[2:, 7:], np.ones((1, 5), np.int32)))
    np.testing.assert_allclose(ours[2, 7:], alone[0], atol=1e-5, rtol=0)


def test_kv_cache_decode_equals_teacher_forced(case):
    """Prefill a left-padded prompt, then decode 9 tokens one by one (past the sliding window of 4)."""
    P, S = 5, 9
    prompt_BP, mask_BP = random_tokens(3, (3, P)), left_pad_mask([0, 2, 4], P)
    new_BS = random_tokens(4, (3, S))
    full_BT = np.concatenate([prompt_BP, new_BS], axis=1)
    full_mask_BT = np.concatenate([mask_BP, np.ones_like(new_BS)], axis=1)
    want_BTV = np.asarray(apply(case.model, case.params, full_BT, full_mask_BT))
    logits_BV, cache = prefill(case.model, case.params, prompt_BP, mask_BP, P + S)
    np.testing.assert_allclose(np.asarray(logits_BV), want_BTV[:, P - 1], atol=1e-5, rtol=0)
    for s in range(S):
        logits_BV, cache = decode(case.model, case.params, jnp.asarray(new_BS[:, s]), cache)
        np.testing.assert_allclose(np.asarray(logits_BV), want_BTV[:, P + s], atol=1e-5, rtol=0, err_msg=f"step {s}")


@pytest.mark.parametrize(("case", "changes"), [
    ("gemma2", (dict(sliding_window=64), dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None))),
    ("gemma3_text", (dict(sliding_window=64), dict(rope_local_theta=None), dict(rope_linear_factor=None))),
], indirect=["case"])
def test_windows_soft_caps_and_rope_bases_change_the_logits(case, changes):
    """The parity tests above would catch a missing sliding window, soft-cap or RoPE base: each changes the logits."""
    tokens_BT = random_tokens(5, (2, 12))
    ones = np.ones_like(tokens_BT)
    base = np.asarray(apply(case.model, case.params, tokens_BT, ones))
    for change in changes:
        other = np.asarray(apply(dataclasses.replace(case.model, **change), case.params, tokens_BT, ones))
        assert np.abs(other - base).max() > 1e-2, change


def test_round_trip_is_exact(case):
    exported = dict(gemma.params_to_hf(case.model, case.params))
    with safe_open(str(case.path / "model.safetensors"), "np") as f:
        assert set(exported) == set(f.keys())
        for name in f.keys():
            np.testing.assert_array_equal(exported[name], f.get_tensor(name), err_msg=name)
    again = gemma.params_from_hf(case.model, exported.__getitem__, set(exported))
    jax.tree.map(np.testing.assert_array_equal, again, case.params)
    assert gemma.from_hf_config(gemma.to_hf_config(case.model)) == case.model


def test_export_loads_in_transformers_with_identical_logits(case, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(gemma.to_hf_config(case.model)))
    save_file(dict(gemma.params_to_hf(case.model, case.params)), str(tmp_path / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf) is type(case.hf)
    tokens_BT, mask_BT = random_tokens(6, (2, 10)), left_pad_mask([0, 4], 10)
    np.testing.assert_array_equal(case.hf_logits(tokens_BT, mask_BT, hf=hf), case.hf_logits(tokens_BT, mask_BT))


def test_sampler_log_probs_equal_log_prob(case):
    check_sampler_matches_log_prob(case.model, case.params, max_new_tokens=8)


@pytest.mark.parametrize("case", ["gemma2"], indirect=True)
def test_guard_sampler_runs_unchanged(case):
    """GUARD's rejection sampler on a Gemma: every sample satisfies b, and its log-probs are the model's."""
    bos_B1, ones_B1 = bos_prompt(case.model, 1)
    likely = int(jnp.argmax(apply(case.model, case.params, bos_B1, ones_B1)[0, 0]))
    b = contains_token(likely)
    out = guard_sample(
        jax.random.PRNGKey(3), LM.of(case.model, case.params), b, 8, max_new_tokens=6, batch_size=16, progress=False
    )
    assert out.tokens_NT.shape == (8, 6) and np.all(b(out.tokens_NT, out.lengths_N))
    prompt_BP, mask_BP = bos_prompt(case.model, 8)
    logp_B, _ = log_prob(case.model, case.params, prompt_BP, mask_BP, jnp.asarray(out.tokens_NT), jnp.asarray(out.lengths_N))
    np.testing.assert_allclose(np.asarray(logp_B), out.logp_N, atol=1e-5, rtol=0)


def test_bfloat16_runs_and_is_close(case):
    model, params = load_local(case.path, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    P, S = 6, 6
    tokens_BT, mask_BT = random_tokens(8, (2, P + S)), left_pad_mask([0, 2], P + S)
    want = np.asarray(apply(case.model, case.params, tokens_BT, mask_BT))
    got = np.asarray(apply(model, params, tokens_BT, mask_BT))
    assert got.dtype == np.float32
    real = mask_BT > 0
    err = np.abs(got - want)[real]
    assert err.max() < 0.3 and err.mean() < 0.05, (err.max(), err.mean())
    # no further from float32 than transformers' own bfloat16 model is (typical logit ~1.3, errors ~0.02)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(case.path, attn_implementation="eager", dtype=torch.bfloat16)
    hf_err = np.abs(case.hf_logits(tokens_BT, mask_BT, hf=hf16.eval()).astype(np.float32) - want)[real]
    assert err.mean() < 1.5 * hf_err.mean(), (err.mean(), hf_err.mean())
    logits_BV, cache = prefill(model, params, tokens_BT[:, :P], mask_BT[:, :P], P + S)
    assert cache["k"][0].dtype == jnp.bfloat16
    for s in range(S):
        np.testing.assert_allclose(np.asarray(logits_BV), got[:, P - 1 + s], atol=0.1, rtol=0, err_msg=f"step {s}")
        logits_BV, cache = decode(model, params, jnp.asarray(tokens_BT[:, P + s]), cache)


def test_bfloat16_checkpoint_round_trip(case, tmp_path):
    """bfloat16 params -> safetensors -> bfloat16 params is exact; into float32 it is the exact upcast."""
    model16 = dataclasses.replace(case.model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), case.params)
    save_file(dict(gemma.params_to_hf(model16, params16)), str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert f.get_tensor("model.norm.weight").dtype.name == "bfloat16"
        again16 = gemma.params_from_hf(model16, f.get_tensor, set(f.keys()))
        again32 = gemma.params_from_hf(case.model, f.get_tensor, set(f.keys()))
    jax.tree.map(np.testing.assert_array_equal, again16, params16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.float32)), again32, params16)
    assert {x.dtype for x in jax.tree.leaves(again32)} == {jnp.dtype(jnp.float32)}


def test_clear_errors(case):
    names = {name for name, _ in gemma.params_to_hf(case.model, case.params)}
    tensors = dict(gemma.params_to_hf(case.model, case.params))
    missing = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        gemma.params_from_hf(case.model, tensors.__getitem__, names - {missing})
    wrong = dict(tensors, **{missing: tensors[missing][:, :-1]})
    with pytest.raises(ValueError, match="k_proj.*shape"):
        gemma.params_from_hf(case.model, wrong.__getitem__, names)
    with pytest.raises(ValueError, match="model.extra.weight"):
        gemma.params_from_hf(case.model, tensors.__getitem__, names | {"model.extra.weight"})
    config = gemma.to_hf_config(case.model)
    with pytest.raises(ValueError, match="gemma2"):
        gemma.from_hf_config(dict(config, model_type="llama"))
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        gemma.from_hf_config(dict(config, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}))
    if case.model.version < 3:
        with pytest.raises(ValueError, match="'linear' is not supported"):
            gemma.from_hf_config(dict(config, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match="max_len=3"):
        case.model.prefill(case.params, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32), case.model.init_cache(1, 3))
    with pytest.raises(ValueError, match="param_dtype"):
        gemma.from_hf_config(config, param_dtype=jnp.float16)


@pytest.mark.parametrize("rope_scaling", [None, {"factor": 8.0, "rope_type": "linear"}])
def test_gemma3_released_config_shape_reads_as_transformers_reads_it(rope_scaling):
    """A config.json in the shape of gemma-3-1b / 4b (rope_theta, rope_local_base_freq, sliding_window_pattern,
    rope_scaling for the global layers) gives the layer types and per-layer RoPE transformers derives."""
    config = dict(
        model_type="gemma3_text", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling=rope_scaling, sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=16,
    )
    model = gemma.from_hf_config(config)
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in config.items() if k != "model_type"})
    assert list(model.layer_types) == theirs.layer_types
    for i, layer_type in enumerate(theirs.layer_types):
        want = {k: v for k, v in theirs.rope_parameters[layer_type].items() if v is not None}
        assert model.rope(i).to_hf() == want, (i, layer_type)
    assert model.final_logit_softcapping is None and model.attn_logit_softcapping is None


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (model_type "gemma3", tensors under language_model.model.) loads as
    its text model: the same logits as transformers' multimodal model on text, exported as gemma3_text."""
    text = dict(CONFIGS["gemma3_text"][1], vocab_size=V + 4)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=V + 1, eoi_token_index=V + 2, image_token_index=V + 3)
    case = make_case("gemma3", config, tmp_path / "mm")
    assert json.loads((case.path / "config.json").read_text())["model_type"] == "gemma3"
    assert case.model == gemma.from_hf_config(dict(text, model_type="gemma3_text"))
    tokens_BT, mask_BT = random_tokens(9, (2, 12)), left_pad_mask([0, 3], 12)
    real = mask_BT > 0
    ours = np.asarray(apply(case.model, case.params, tokens_BT, mask_BT))
    np.testing.assert_allclose(ours[real], case.hf_logits(tokens_BT, mask_BT)[real], atol=1e-4, rtol=0)
    hf.export(tmp_path / "text", case.model, case.params)
    text_only = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager").eval()
    assert type(text_only) is transformers.Gemma3ForCausalLM
    np.testing.assert_allclose(case.hf_logits(tokens_BT, mask_BT, hf=text_only)[real], ours[real], atol=1e-4, rtol=0)


def test_gemma3_sparse_text_config_gets_transformers_defaults():
    """Released multimodal configs list only what differs from Gemma3TextConfig's defaults."""
    sparse = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
              "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    model = gemma.from_hf_config({"model_type": "gemma3", "eos_token_id": [1, 106], "text_config": sparse})
    theirs = transformers.Gemma3Config(text_config=sparse).text_config
    for field in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "query_pre_attn_scalar", "sliding_window", "max_position_embeddings"):
        assert getattr(model, field) == getattr(theirs, field), field
    assert list(model.layer_types) == theirs.layer_types
    assert (model.bos_id, model.eos_id) == (2, 1)
    for i, layer_type in enumerate(theirs.layer_types):
        assert model.rope(i).to_hf() == {k: v for k, v in theirs.rope_parameters[layer_type].items() if v is not None}
