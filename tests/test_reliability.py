"""Bad input is caught where it arises: non-finite logits and weights, broken checkpoint files."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from guard_jax import constraints as C
from guard_jax.evaluate import LM, draw, score
from guard_jax.lm import EMBEDDED
from guard_jax.models import hf
from guard_jax.models.toy import TabularARM
from guard_jax.rejection import guard_sample
from guard_jax.sampling import NonFiniteError, categorical, check_finite_logp

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
    with pytest.raises(NonFiniteError, match="GUARD sampler, proposal TabularARM .*no sample is returned"):
        guard_sample(jax.random.PRNGKey(0), TOY, params, C.contains_token(1), 100, max_new_tokens=3, batch_size=64, progress=False)


def test_draw_and_score_refuse_non_finite_models():
    good, bad = TOY.init(jax.random.PRNGKey(0)), _nan_at_root(TOY.init(jax.random.PRNGKey(0)))
    with pytest.raises(NonFiniteError, match="sampling a: TabularARM"):
        draw(jax.random.PRNGKey(0), LM.unconditional(TOY, bad), 10, 3, batch_size=8, progress=False, desc="sampling a")
    d = draw(jax.random.PRNGKey(0), LM.unconditional(TOY, good), 10, 3, batch_size=8, progress=False)
    with pytest.raises(NonFiniteError, match="scoring with TabularARM"):
        score(LM.unconditional(TOY, bad), d.tokens_NT, d.lengths_N, batch_size=8)


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
