"""Smoke test: every GUARD proposal runs end to end on a tiny random GPT-2 (a few steps each) and the
GUARD sampler, the batch-drawing driver and the Monte-Carlo estimators work unchanged on it."""

import dataclasses

import jax
import numpy as np
import pytest

from guard_jax import constraints as C
from guard_jax import estimators as E
from guard_jax.lm import LM
from guard_jax.models.gpt2 import GPT2
from guard_jax.rejection import guard_sample
from guard_jax.sampling import bos_prompt, draw, sample, score
from guard_jax.train.cap import cap_context
from guard_jax.train.dpg import DPG, DPGConfig
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.sft import SFT, SFTConfig
from guard_jax.train.warm import load_params

MODEL = GPT2(vocab_size=24, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_id=0, eos_id=1)
B = C.contains_token(5) | C.contains_token(6)
T = 6
CFG = DPGConfig(n_samples=32, minibatch=16, max_new_tokens=T, learning_rate=1e-2)


@pytest.fixture(scope="module")
def base():
    return MODEL.init(jax.random.PRNGKey(0))


def _finite(history):
    assert history and all(np.isfinite(h["loss"]) for h in history)


def test_sft_then_dpg_warm_start_through_a_checkpoint(base, tmp_path):
    s = sample(jax.random.PRNGKey(1), MODEL, base, *bos_prompt(MODEL, 256), T)
    keep = np.asarray(B(s.tokens_BT, s.lengths_B))
    assert keep.sum() >= 8
    sft = SFT(LM.of(MODEL, base), np.asarray(s.tokens_BT)[keep], np.asarray(s.lengths_B)[keep], SFTConfig(batch_size=8, learning_rate=1e-2))
    _, hist = run(sft, sft.init_state(base), LoopConfig(steps=3, out_dir=tmp_path / "sft", progress=False, tensorboard=False))
    _finite(hist)
    warm = load_params(tmp_path / "sft", like=base)
    dpg = DPG(LM.of(MODEL, base), B, CFG)
    state, hist = run(dpg, dpg.init_state(warm), LoopConfig(steps=3, out_dir=tmp_path / "dpg", progress=False, tensorboard=False))
    _finite(hist)
    assert {"kl_g_pi", "ar_pi", "z", "grad_norm", "samples_per_s"} <= set(hist[-1])


def test_cap_then_off_policy_dpg(base):
    a = LM.of(MODEL, base)
    dpg = DPG(a, B, dataclasses.replace(CFG, on_policy=False, swap_every=1), proposal=a.with_prompt(cap_context(MODEL.bos_id, [5, 6])))
    state, hist = run(dpg, dpg.init_state(base), LoopConfig(steps=3, progress=False))
    _finite(hist)
    assert "swapped" in hist[-1]


def test_guard_sampler_and_estimators_on_gpt2(base):
    result = guard_sample(jax.random.PRNGKey(2), LM.of(MODEL, base), B, 20, max_new_tokens=T, batch_size=64, progress=False)
    assert len(result.tokens_NT) == 20 and np.asarray(B(result.tokens_NT, result.lengths_N)).all()
    a = LM.of(MODEL, base)
    da, da2 = (draw(k, a, 512, max_new_tokens=T, batch_size=256, progress=False) for k in jax.random.split(jax.random.PRNGKey(3)))
    ba, ba2 = np.asarray(B(da.tokens_NT, da.lengths_N)), np.asarray(B(da2.tokens_NT, da2.lengths_N))
    logp_a2_G = score(a, da.tokens_NT[ba], da.lengths_N[ba], batch_size=256)
    np.testing.assert_allclose(logp_a2_G, da.logp_N[ba], atol=1e-5)
    gain = E.estimate_ar_gain(int(ba.sum()), 512, int(ba2.sum()), 512)
    kl_g_g2 = E.estimate_kl_g_g2(da.logp_N[ba], logp_a2_G, int(ba.sum()), 512, int(ba2.sum()), 512)
    assert gain.contains(1.0) and kl_g_g2.contains(0.0)  # a' = a, so g' = g
