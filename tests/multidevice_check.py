"""Run in a subprocess with 8 forced host devices: on meshes 8x1 (data), 4x2 and 2x4 (data x model), sharded
sampling, scoring, the GUARD sampler and one step of every trainer (SFT, DPG on/off-policy, L3M, aux, RL)
equal one device; params and Adam moments are sharded by the rules; pmapped sampling equals one device."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from guard_jax.lm import LM  # noqa: E402
from guard_jax.models.gpt2 import GPT2  # noqa: E402
from guard_jax.models.toy import TinyTransformerARM  # noqa: E402
from guard_jax.parallel import data_mesh, log_prob_sharded, make_mesh, sample_pmap, sample_sharded, shard_batch, tree_specs  # noqa: E402
from guard_jax.rejection import guard_sample  # noqa: E402
from guard_jax.sampling import bos_prompt, draw, log_prob, sample, score  # noqa: E402
from guard_jax import constraints as C  # noqa: E402
from guard_jax.train.aux import AuxConfig, AuxTrainer  # noqa: E402
from guard_jax.train.dpg import DPG, DPGConfig  # noqa: E402
from guard_jax.train.l3m import L3M, L3MConfig  # noqa: E402
from guard_jax.train.rl import RL, RLConfig  # noqa: E402
from guard_jax.train.sft import SFT, SFTConfig  # noqa: E402
from guard_jax.train.loop import step_key  # noqa: E402


def _gpt2_left_padded_prompts(model, batch_size: int, length: int):
    """Ragged prompts (BOS then random tokens), left-padded: (prompt_BP, mask_BP)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, (batch_size, length))
    tokens[:, 0] = model.bos_id
    pads = rng.integers(0, length, batch_size)
    mask = (np.arange(length)[None] >= pads[:, None]).astype(np.int32)
    tokens = np.where(mask > 0, tokens, model.pad_id)
    return tokens.astype(np.int32), mask


def _agree(model, params, prompt, mask, max_new_tokens: int, mesh) -> None:
    key = jax.random.PRNGKey(42)
    one = sample(key, model, params, prompt, mask, max_new_tokens)
    sharded = sample_sharded(key, model, params, prompt, mask, max_new_tokens, mesh)
    assert len(sharded.tokens_BT.sharding.device_set) == 8
    pmapped = sample_pmap(key, model, params, prompt, mask, max_new_tokens)
    for other in (sharded, pmapped):
        np.testing.assert_array_equal(np.asarray(other.tokens_BT), np.asarray(one.tokens_BT))
        np.testing.assert_array_equal(np.asarray(other.lengths_B), np.asarray(one.lengths_B))
        np.testing.assert_allclose(np.asarray(other.logp_B), np.asarray(one.logp_B), atol=1e-5)
    ref, _ = log_prob(model, params, prompt, mask, one.tokens_BT, one.lengths_B)
    got, _ = log_prob_sharded(model, params, prompt, mask, one.tokens_BT, one.lengths_B, mesh)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(one.logp_B), atol=1e-5)
    return one


def _dpg_agrees(mesh) -> None:
    """Two DPG updates with each minibatch split over the mesh equal the same updates on one device."""
    model = GPT2(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_id=49, eos_id=49)
    params = jax.tree.map(lambda x: 3 * x, model.init(jax.random.PRNGKey(2)))
    constraint = C.predicate(lambda t, n: np.any((t < 10) & (np.arange(t.shape[1])[None] < n[:, None]), axis=1), "any token < 10")
    cfg = DPGConfig(n_samples=32, minibatch=16, max_new_tokens=6, learning_rate=1e-2)
    a = LM.of(model, params)
    one, split = DPG(a, constraint, cfg), DPG(a.with_mesh(mesh), constraint, cfg)
    s1, s2 = one.init_state(params), split.init_state(params)
    for i in range(2):
        s1, m1 = one.step(s1, step_key(0, i))
        s2, m2 = split.step(s2, step_key(0, i))
        np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(m2["z"]), float(m1["z"]), rtol=1e-5)
    assert len(jax.tree.leaves(s2.params)[0].sharding.device_set) == 8
    # the same policy: equal log-probs (not equal params: Adam turns the rounding noise of gradients that are 0
    # in exact arithmetic, e.g. the key bias's, into steps of size lr)
    prompt, mask = bos_prompt(model, 32)
    ys = sample(jax.random.PRNGKey(7), model, s1.params, prompt, mask, 6)
    lp1 = log_prob(model, s1.params, prompt, mask, ys.tokens_BT, ys.lengths_B)[0]
    lp2 = log_prob(model, jax.device_get(s2.params), prompt, mask, ys.tokens_BT, ys.lengths_B)[0]
    np.testing.assert_allclose(np.asarray(lp2), np.asarray(lp1), atol=1e-4)
    lp0 = log_prob(model, params, prompt, mask, ys.tokens_BT, ys.lengths_B)[0]
    assert float(np.abs(np.asarray(lp1) - np.asarray(lp0)).max()) > 1e-2  # and the updates moved it
    try:
        DPG(a.with_mesh(mesh), constraint, DPGConfig(n_samples=12, minibatch=12, max_new_tokens=6, learning_rate=1e-2))
        raise AssertionError("a minibatch of 12 over 8 devices must be refused")
    except ValueError as e:
        assert "minibatch=12 must be divisible" in str(e), e


def _driver_agrees(model, params, mesh) -> None:
    """draw, score and the GUARD sampler on an LM with a mesh give one device's samples and scores."""
    one = LM.of(model, params).with_prompt((model.bos_id, 3, 4))
    split = one.with_mesh(mesh)
    key = jax.random.PRNGKey(3)
    d1 = draw(key, one, 40, max_new_tokens=8, batch_size=16, progress=False)
    d8 = draw(key, split, 40, max_new_tokens=8, batch_size=16, progress=False)
    np.testing.assert_array_equal(d8.tokens_NT, d1.tokens_NT)
    np.testing.assert_array_equal(d8.lengths_N, d1.lengths_N)
    np.testing.assert_allclose(d8.logp_N, d1.logp_N, atol=1e-5)
    np.testing.assert_allclose(score(split, d1.tokens_NT, d1.lengths_N, batch_size=24), d1.logp_N, atol=1e-5)
    b = C.predicate(lambda t, n: np.any((t < 10) & (np.arange(t.shape[1])[None] < n[:, None]), axis=1), "any token < 10")
    g1 = guard_sample(key, one, b, 20, max_new_tokens=8, batch_size=16, progress=False)
    g8 = guard_sample(key, split, b, 20, max_new_tokens=8, batch_size=16, progress=False)
    np.testing.assert_array_equal(g8.tokens_NT, g1.tokens_NT)
    assert g8.draws == g1.draws
    try:
        draw(key, split, 10, max_new_tokens=8, batch_size=12, progress=False)
        raise AssertionError("a batch of 12 over 8 devices must be refused")
    except ValueError as e:
        assert "batch_size=12 must be divisible" in str(e), e


def _policy_logp(model, params, ys):
    prompt, mask = bos_prompt(model, ys.tokens_BT.shape[0])
    return np.asarray(log_prob(model, jax.device_get(params), prompt, mask, ys.tokens_BT, ys.lengths_B)[0])


def _trainers(gpt2, params, mesh):
    """(name, trainer, initial params) for every trainer, on an LM with `mesh` (None: one device)."""
    b = C.predicate(lambda t, n: np.any((t < 10) & (np.arange(t.shape[1])[None] < n[:, None]), axis=1), "any token < 10")
    a = LM.of(gpt2, params).with_mesh(mesh)
    rows = sample(jax.random.PRNGKey(11), gpt2, params, *bos_prompt(gpt2, 32), 6)
    tokens, lengths = np.asarray(rows.tokens_BT), np.asarray(rows.lengths_B)
    head = GPT2(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_id=49, eos_id=49)
    dpg = DPGConfig(n_samples=32, minibatch=16, max_new_tokens=6, learning_rate=1e-2)
    return [
        ("sft", SFT(a, tokens, lengths, SFTConfig(batch_size=16, learning_rate=1e-2)), params),
        ("dpg", DPG(a, b, dpg), params),
        ("dpg_off", DPG(a, b, DPGConfig(**{**dpg.__dict__, "on_policy": False}), proposal=a.with_prompt((gpt2.bos_id, 3))), params),
        ("l3m", L3M(a, tokens, lengths, [b], L3MConfig(thresholds=[0.9], total_steps=2, n_samples=16, batch_size=16,
                                                       max_new_tokens=6, learning_rate=1e-2)), params),
        ("aux", AuxTrainer(a, head, b, AuxConfig(n_samples=32, minibatch=16, max_new_tokens=6, learning_rate=1e-2)),
         {"head": head.init(jax.random.PRNGKey(5)), "policy": params}),
        ("rl", RL(a, b, RLConfig(beta=0.5, n_samples=32, minibatch=16, max_new_tokens=6, learning_rate=1e-2)), params),
    ]


def _one_step(name, trainer, params):
    state, metrics = trainer.step(trainer.init_state(params), step_key(0, 0))
    return state, float(metrics["loss"])


def _sharded_leaf_count(mesh, tree) -> int:
    """How many leaves of `tree` are split over the model axis (their device shard smaller than the array)."""
    return sum(x.addressable_shards[0].data.size < x.size for x in jax.tree.leaves(tree))


def _meshes_agree(gpt2, params, meshes) -> None:
    """On each (data, model) of `meshes`: draw/score/guard_sample and one step of each trainer (loss, policy log-probs) equal
    one device; on 2-D meshes the params and the Adam moments are sharded over the model axis."""
    ys = sample(jax.random.PRNGKey(7), gpt2, params, *bos_prompt(gpt2, 32), 6)
    ref = {}
    for name, trainer, p0 in _trainers(gpt2, params, None):
        state, loss = _one_step(name, trainer, p0)
        pol = state.params["policy"] if name == "aux" else state.params
        ref[name] = (loss, _policy_logp(gpt2, pol, ys))
    for data, model in meshes:
        mesh = make_mesh(data, model)
        _driver_agrees(gpt2, params, mesh)
        for name, trainer, p0 in _trainers(gpt2, params, mesh):
            state, loss = _one_step(name, trainer, p0)
            np.testing.assert_allclose(loss, ref[name][0], rtol=1e-4, atol=1e-6, err_msg=f"{name} {data}x{model} loss")
            pol = state.params["policy"] if name == "aux" else state.params
            # sequence log-probs of ~-30: a sharded matmul sums in another order, and Adam turns that rounding
            # into steps of size lr (aux on 2x4: 1.1e-4 absolute, 7e-6 relative, measured)
            np.testing.assert_allclose(_policy_logp(gpt2, pol, ys), ref[name][1], rtol=2e-5, atol=1e-4,
                                       err_msg=f"{name} {data}x{model}")
            if model > 1:
                n_params = len(jax.tree.leaves(state.params))
                assert _sharded_leaf_count(mesh, state.params) > 0, f"{name}: no parameter sharded on {data}x{model}"
                assert _sharded_leaf_count(mesh, state.opt_state) >= _sharded_leaf_count(mesh, state.params), name
                specs, opt_specs = tree_specs(mesh, state.params), tree_specs(mesh, state.opt_state)
                mu = jax.tree.leaves(opt_specs[0][0].mu) if isinstance(opt_specs, tuple) else None
                assert mu is None or mu == jax.tree.leaves(specs), f"{name}: Adam's mu is not sharded like the params"
                assert n_params == len(jax.tree.leaves(specs))
        print(f"mesh {data}x{model} ok", flush=True)


def main(argv) -> int:
    """argv: optional comma-separated meshes DATAxMODEL for the trainers' check (default 8x1,4x2,2x4)."""
    meshes = [tuple(int(n) for n in m.split("x")) for m in (argv[0] if argv else "8x1,4x2,2x4").split(",")]
    assert jax.device_count() == 8, jax.devices()
    mesh = data_mesh()
    model = TinyTransformerARM(6, 5, eos_id=0)
    params = model.init(jax.random.PRNGKey(0))
    prompt, mask = bos_prompt(model, 32)
    _agree(model, params, prompt, mask, 5, mesh)
    gpt2 = GPT2(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_id=49, eos_id=49)
    gpt2_params = jax.tree.map(lambda x: 3 * x, gpt2.init(jax.random.PRNGKey(1)))  # less flat laws
    one = _agree(gpt2, gpt2_params, *_gpt2_left_padded_prompts(gpt2, 32, 6), 8, mesh)
    assert 1 <= int(one.lengths_B.min()) < 8 == int(one.lengths_B.max()), one.lengths_B  # some rows stop at EOS
    try:
        shard_batch(mesh, prompt[:3])
        raise AssertionError("a batch of 3 over 8 devices must be refused")
    except ValueError as e:
        assert "divisible" in str(e)
    _dpg_agrees(mesh)
    _meshes_agree(gpt2, gpt2_params, meshes)
    print("multidevice ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
