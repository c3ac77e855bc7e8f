"""GPT-2 against transformers' PyTorch GPT2LMHeadModel; Hugging Face folders; the sampler's exact law on GPT-2."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from guard_jax import constraints as C
from guard_jax.cli import main
from guard_jax.exact import SequenceSpace, exact_constraint, exact_log_prob
from guard_jax.lm import LM
from guard_jax.models import hf
from guard_jax.models.gpt2 import GPT2
from guard_jax.rejection import guard_sample
from guard_jax.sampling import bos_prompt, log_prob, sample
from tests.test_exact import chi_square_bins, chi_square_p

V = 64  # 62 words + <unk> + <|endoftext|>
WORDS = [f"w{i}" for i in range(60)] + ["apple", "pear"]


def _tokenizer(vocab_words):
    vocab = {w: i for i, w in enumerate(vocab_words + ["<unk>", "<|endoftext|>"])}
    t = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _hf_gpt2(seed, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=V - 1, eos_token_id=V - 1,
               initializer_range=0.2)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **kw})).eval()


@pytest.fixture(scope="session")
def ref(tmp_path_factory):
    """A small random GPT2LMHeadModel with a word-level tokenizer, saved by transformers -> (torch model, folder)."""
    path = tmp_path_factory.mktemp("gpt2") / "tiny"
    torch_model = _hf_gpt2(0)
    torch_model.save_pretrained(path)
    _tokenizer(WORDS).save_pretrained(path)
    return torch_model, path


@pytest.fixture(scope="session")
def loaded(ref):
    return hf.load(ref[1])


def _torch_logits(torch_model, tokens_BT, mask_BT=None):
    kw = {}
    if mask_BT is not None:
        kw = dict(attention_mask=torch.tensor(mask_BT), position_ids=torch.tensor(np.maximum(mask_BT.cumsum(1) - 1, 0)))
    with torch.no_grad():
        return torch_model(torch.tensor(tokens_BT), **kw).logits.numpy()


def _left_padded(rng, B, T, vocab_size):
    tokens_BT = rng.integers(0, vocab_size, (B, T))
    pads_B = rng.integers(0, T - 1, B)
    pads_B[0] = 0
    mask_BT = (np.arange(T)[None] >= pads_B[:, None]).astype(np.int32)
    return np.where(mask_BT > 0, tokens_BT, 0), mask_BT


def test_logits_match_transformers(ref, loaded):
    torch_model, _ = ref
    model, params, tok = loaded
    assert len(tok) == V and model.bos_id == model.eos_id == V - 1
    tokens_BT = np.random.default_rng(0).integers(0, V, (3, 32))  # the full n_positions
    got = np.asarray(model.apply(params, jnp.asarray(tokens_BT)))
    want = _torch_logits(torch_model, tokens_BT)
    assert np.abs(want).max() > 1.0  # non-trivial logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(params, jnp.asarray(tokens_BT))), want, atol=1e-4, rtol=0)


def test_left_padded_logits_match_transformers(ref, loaded):
    torch_model, _ = ref
    model, params, _ = loaded
    tokens_BT, mask_BT = _left_padded(np.random.default_rng(1), 6, 12, V)
    got = np.asarray(model.apply(params, jnp.asarray(tokens_BT), jnp.asarray(mask_BT)))
    want = _torch_logits(torch_model, tokens_BT, mask_BT)
    real = mask_BT.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    assert np.isfinite(got).all()


def test_kv_cache_step_by_step_equals_teacher_forced(loaded):
    model, params, _ = loaded
    rng = np.random.default_rng(2)
    prompt_BP, mask_BP = _left_padded(rng, 5, 7, V)
    cont_BT = rng.integers(0, V, (5, 6))
    full = np.asarray(model.apply(params, jnp.asarray(np.concatenate([prompt_BP, cont_BT], 1)),
                                  jnp.asarray(np.concatenate([mask_BP, np.ones_like(cont_BT)], 1))))
    prefill, decode = jax.jit(model.prefill), jax.jit(model.decode)
    cache = model.init_cache(5, 7 + 6 + 2)  # spare slots at the end are never attended
    logits_BV, cache = prefill(params, jnp.asarray(prompt_BP), jnp.asarray(mask_BP), cache)
    steps = [logits_BV]
    for t in range(6):
        logits_BV, cache = decode(params, jnp.asarray(cont_BT[:, t]), cache)
        steps.append(logits_BV)
    np.testing.assert_allclose(np.stack(steps, 1), full[:, 6:], atol=1e-5, rtol=0)
    assert int(cache["index"]) == 13
    np.testing.assert_array_equal(np.asarray(cache["pos_B"]), mask_BP.sum(1) + 6)


def test_round_trip_is_exact_and_transformers_loads_the_export(ref, loaded, tmp_path):
    torch_model, _ = ref
    model, params, tok = loaded
    out = hf.export(tmp_path / "exported", model, params, tok)
    model2, params2, tok2 = hf.load(out)
    assert model2 == model and len(tok2) == len(tok)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    tokens_BT = np.random.default_rng(3).integers(0, V, (2, 16))
    np.testing.assert_array_equal(_torch_logits(reloaded, tokens_BT), _torch_logits(torch_model, tokens_BT))
    # sharded export (one shard per tensor or so) loads back identically, and overwrites the folder atomically
    hf.export(out, model, params, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    _, params3, tok3 = hf.load(out)
    assert tok3 is None
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params3)
    np.testing.assert_array_equal(_torch_logits(GPT2LMHeadModel.from_pretrained(out).eval(), tokens_BT),
                                  _torch_logits(torch_model, tokens_BT))
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temporary folders left behind


def test_untied_head_and_bare_gpt2model_names(tmp_path):
    torch_model = _hf_gpt2(1, tie_word_embeddings=False, activation_function="gelu", scale_attn_by_inverse_layer_idx=True)
    torch_model.save_pretrained(tmp_path / "untied")
    model, params, _ = hf.load(tmp_path / "untied")
    assert not model.tie_word_embeddings and "lm_head" in params
    tokens_BT = np.random.default_rng(4).integers(0, V, (2, 9))
    np.testing.assert_allclose(np.asarray(model.apply(params, jnp.asarray(tokens_BT))), _torch_logits(torch_model, tokens_BT), atol=1e-4, rtol=0)
    # the original `gpt2` checkpoint stores GPT2Model names ("h.0...", no "transformer.") and attn.bias buffers
    from safetensors.numpy import save_file
    from safetensors import safe_open

    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "untied", bare)
    with safe_open(bare / "model.safetensors", "np") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    tensors["h.0.attn.bias"] = np.ones((1, 1, 32, 32), np.float32)
    save_file(tensors, str(bare / "model.safetensors"))
    _, params2, _ = hf.load(bare)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_sampler_log_probs_equal_log_prob(loaded):
    model, params, _ = loaded
    prompt_BP, mask_BP = _left_padded(np.random.default_rng(5), 16, 5, V)
    s = sample(jax.random.PRNGKey(0), model, params, jnp.asarray(prompt_BP), jnp.asarray(mask_BP), 10)
    assert int(s.lengths_B.min()) >= 1 and int(s.lengths_B.max()) <= 10
    logp_B, logp_BT = log_prob(model, params, jnp.asarray(prompt_BP), jnp.asarray(mask_BP), s.tokens_BT, s.lengths_B)
    np.testing.assert_allclose(np.asarray(logp_BT), np.asarray(s.logp_BT), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logp_B), np.asarray(s.logp_B), atol=1e-5, rtol=0)
    again = sample(jax.random.PRNGKey(0), model, params, jnp.asarray(prompt_BP), jnp.asarray(mask_BP), 10)
    np.testing.assert_array_equal(np.asarray(again.tokens_BT), np.asarray(s.tokens_BT))


def _chi_square_p(index_N, probs):
    """Chi-square p-value of grid indices against a law (rare cells pooled), with enough bins to mean something."""
    bins_o, bins_e = chi_square_bins(index_N, probs)
    assert len(bins_o) > 20
    return chi_square_p(bins_o, bins_e)


@pytest.fixture(scope="module")
def tiny_law(tmp_path_factory):
    """GPT-2 over V=5 tokens (EOS = BOS = 4), peaked random weights, and its exact law over 3 new tokens."""
    path = tmp_path_factory.mktemp("gpt2v5")
    _hf_gpt2(2, vocab_size=5, n_embd=16, n_head=2, bos_token_id=4, eos_token_id=4, initializer_range=0.6).save_pretrained(path)
    model, params, _ = hf.load(path)
    space = SequenceSpace.of(model, 3)
    log_a = exact_log_prob(model, params, 3)
    return model, params, space, log_a


def test_sampler_law_is_exact_on_tiny_gpt2(tiny_law):
    model, params, space, log_a = tiny_law
    probs = np.exp(log_a.astype(np.float64))
    assert abs(probs.sum() - 1) < 1e-5 and probs.max() > 3 * probs[probs > 0].mean()  # a peaked, valid law
    prompt, mask = bos_prompt(model, 50_000)
    s = sample(jax.random.PRNGKey(7), model, params, prompt, mask, 3)
    index_N = space.index(s.tokens_BT)
    assert np.all(probs[index_N] > 0)  # only valid sequences (pad after EOS)
    np.testing.assert_allclose(np.asarray(s.logp_B), log_a[index_N], atol=1e-5)
    assert _chi_square_p(index_N, probs) > 1e-3


def test_guard_sampler_on_tiny_gpt2(tiny_law):
    model, params, space, log_a = tiny_law
    constraint = C.contains_token(2)
    b = exact_constraint(space, constraint)
    z = float(np.exp(log_a.astype(np.float64))[b].sum())
    r = guard_sample(jax.random.PRNGKey(1), LM.of(model, params), constraint, 20_000, max_new_tokens=3, batch_size=8192, progress=False)
    assert np.all(b[space.index(r.tokens_NT)])
    assert r.ar.contains(z), (r.ar, z)
    g = np.where(b, np.exp(log_a.astype(np.float64)), 0.0) / z
    assert _chi_square_p(space.index(r.tokens_NT), g) > 1e-3


def test_bfloat16_apply_runs_and_is_close(ref, loaded):
    model, params, _ = loaded
    model16, params16, _ = hf.load(ref[1], dtype=jnp.bfloat16)
    assert model16.dtype == jnp.bfloat16 and jax.tree.leaves(params16)[0].dtype == jnp.bfloat16
    tokens_BT, mask_BT = _left_padded(np.random.default_rng(6), 4, 12, V)
    want = np.asarray(model.apply(params, jnp.asarray(tokens_BT), jnp.asarray(mask_BT)))
    got = np.asarray(model16.apply(params16, jnp.asarray(tokens_BT), jnp.asarray(mask_BT)))
    assert got.dtype == np.float32
    real = mask_BT.astype(bool)
    err = np.abs(got - want)[real].max()
    assert err < 0.05 * np.abs(want[real]).max(), err
    p16, p32 = jax.nn.softmax(got[real]), jax.nn.softmax(want[real])
    assert float(0.5 * np.abs(p16 - p32).sum(-1).max()) < 0.02  # total variation of the next-token laws
    s = sample(jax.random.PRNGKey(0), model16, params16, *bos_prompt(model16, 4), 5)
    assert np.isfinite(np.asarray(s.logp_B)).all()


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def test_load_errors(ref, tmp_path):
    _, path = ref
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"unknown model_type 'falcon'.*supported: .*gpt2"):
        hf.load(_copy_with_config(path, tmp_path / "falcon", model_type="falcon"))
    nofile = _copy_with_config(path, tmp_path / "nofile")
    (nofile / "model.safetensors").rename(nofile / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin.*safetensors"):
        hf.load(nofile)
    with pytest.raises(ValueError, match=r"tensor 'transformer.wpe.weight' has shape \(32, 32\), expected \(16, 32\)"):
        hf.load(_copy_with_config(path, tmp_path / "short", n_positions=16))
    with pytest.raises(ValueError, match=r"no tensor 'transformer.h.2.ln_1.weight'"):
        hf.load(_copy_with_config(path, tmp_path / "deep", n_layer=3))
    sharded = _copy_with_config(path, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"transformer.wte.weight": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard 'gone.safetensors'"):
        hf.load(sharded)
    with pytest.raises(ValueError, match="activation_function 'swiglu' is not supported"):
        hf.load(_copy_with_config(path, tmp_path / "act", activation_function="swiglu"))


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    _hf_gpt2(3, vocab_size=40, bos_token_id=39, eos_token_id=39, n_embd=8, n_head=2, n_layer=1).save_pretrained(tmp_path)
    _tokenizer(WORDS).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer .* has 64 tokens but .* vocab_size=40"):
        hf.load(tmp_path)


def test_model_errors(loaded):
    model, params, _ = loaded
    with pytest.raises(ValueError, match="n_positions=32"):
        model.apply(params, jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="n_positions=32"):
        sample(jax.random.PRNGKey(0), model, params, *bos_prompt(model, 2), 32)
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPT2(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=r"eos_id=70 must be a token id in \[0, vocab_size=64\)"):
        GPT2(vocab_size=64, bos_id=0, eos_id=70)
    with pytest.raises(TypeError, match="cannot export a TabularARM"):
        from guard_jax.models.toy import TabularARM

        hf.export("/nonexistent", TabularARM(3, 2), {})


def test_cli_sample_and_estimate(ref, tmp_path, capsys):
    _, path = ref
    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--model", str(path), "--constraint", "keyword:apple", "--num", "8", "--max-new-tokens", "6",
                 "--batch-size", "64", "--prompt", "w1 w2", "--quiet", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all("apple" in r["text"].split() and r["logp"] < 0 for r in rows)
    assert "samples satisfying" in capsys.readouterr().err
    res = tmp_path / "estimate.json"
    assert main(["estimate", "--model", str(path), "--constraint", "keyword:pear", "--cap-prompt", "pear pear",
                 "--max-new-tokens", "5", "--n-a", "512", "--n-a2", "256", "--batch-size", "128", "--quiet", "--out", str(res)]) == 0
    est = json.loads(res.read_text())
    assert {"Z", "AR_a2"} <= set(est) and 0 < est["Z"]["value"] < 1
    no_tok = tmp_path / "no_tokenizer"
    hf.export(no_tok, *hf.load(path, tokenizer=False)[:2])
    capsys.readouterr()
    assert main(["sample", "--model", str(no_tok), "--constraint", "keyword:apple", "--quiet"]) == 2
    assert "--model" in (err := capsys.readouterr().err) and "no tokenizer" in err and err.count("\n") == 1
