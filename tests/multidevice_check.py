"""Run in a subprocess with 8 forced host devices: on each given data x model mesh, the batch-drawing driver
(draw, score, the GUARD sampler) and one training step of every trainer (SFT, DPG on- and off-policy, L3M,
aux, RL) equal one device, and the params and Adam moments are sharded by the rules on 2-D meshes.

    python tests/multidevice_check.py 2x4            # one 2-D mesh, a tiny GPT-2: the driver and every trainer
    python tests/multidevice_check.py 2x4 --only driver,sft
                                                     # a part of it (the default tests run it in three parts)
    python tests/multidevice_check.py 8x1,4x2,2x4 --full
                                                     # the slow test: every mesh, plus sample_sharded /
                                                     # sample_pmap on the 1-D data mesh and two DPG steps

Tolerances. Sharded matmuls and per-device batches sum in another order, so float32 values differ in their
last bits. Losses: rtol 1e-4. Measured on 2x4 (three runs): <= 2e-7 relative, except DPG's loss
-mean((w - pi/q) log pi), a mean of signed terms of size |log pi| that cancel, 1.0e-5 to 1.4e-5 relative
(on- and off-policy). Policy log-probs after one step: atol 2e-5. Adam's first step is lr * sign(g) per
parameter, so a gradient component whose exact value is within rounding of 0 can take the other sign and move
by 2 lr; at lr 1e-3 the measured differences are <= 3e-6 on sequence log-probs of a few nats, and the check
asserts that the step itself moved them by more than 50x the tolerance (1e-3).
"""

import os
import sys
import time

# 8 host devices; LLVM's cheap pipeline (compiling is most of this check's time; one device and the mesh use it alike)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from guard_jax import constraints as C  # noqa: E402
from guard_jax.lm import LM  # noqa: E402
from guard_jax.models.gpt2 import GPT2  # noqa: E402
from guard_jax.models.toy import TinyTransformerARM  # noqa: E402
from guard_jax.parallel import data_mesh, log_prob_sharded, make_mesh, sample_pmap, sample_sharded, shard_batch, tree_specs  # noqa: E402
from guard_jax.rejection import guard_sample  # noqa: E402
from guard_jax.sampling import bos_prompt, draw, log_prob, sample, score  # noqa: E402
from guard_jax.train.aux import AuxConfig, AuxTrainer  # noqa: E402
from guard_jax.train.dpg import DPG, DPGConfig  # noqa: E402
from guard_jax.train.l3m import L3M, L3MConfig  # noqa: E402
from guard_jax.train.loop import step_key  # noqa: E402
from guard_jax.train.rl import RL, RLConfig  # noqa: E402
from guard_jax.train.sft import SFT, SFTConfig  # noqa: E402

LOSS_RTOL = 1e-4
LOGP_ATOL = 2e-5
LR = 1e-3
N, T = 8, 4  # samples per step (one per device) and new tokens: every trainer samples (1 minibatch, 8, 4)
B_CONSTRAINT = C.predicate(lambda t, n: np.any((t < 10) & (np.arange(t.shape[1])[None] < n[:, None]), axis=1), "any token < 10")


def tiny_gpt2() -> tuple[GPT2, dict]:
    """A 1-layer GPT-2 (V 32, D 16) with scaled-up weights, so its laws are far from uniform."""
    model = GPT2(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_id=31, eos_id=31)
    return model, jax.tree.map(lambda x: 3 * x, model.init(jax.random.PRNGKey(1)))


def _refused(fn, needle: str) -> None:
    try:
        fn()
    except ValueError as e:
        assert needle in str(e), e
        return
    raise AssertionError(f"expected a ValueError containing {needle!r}")


def driver_agrees(model, params, mesh) -> None:
    """draw, score and the GUARD sampler on an LM with a mesh give one device's samples and scores."""
    one = LM.of(model, params)
    split = one.with_mesh(mesh)
    key = jax.random.PRNGKey(3)
    d1 = draw(key, one, 16, max_new_tokens=T, batch_size=8, progress=False)
    d8 = draw(key, split, 16, max_new_tokens=T, batch_size=8, progress=False)
    np.testing.assert_array_equal(d8.tokens_NT, d1.tokens_NT)
    np.testing.assert_array_equal(d8.lengths_N, d1.lengths_N)
    np.testing.assert_allclose(d8.logp_N, d1.logp_N, atol=1e-5)
    np.testing.assert_allclose(score(split, d1.tokens_NT, d1.lengths_N, batch_size=8), d1.logp_N, atol=1e-5)
    g1 = guard_sample(key, one, B_CONSTRAINT, 8, max_new_tokens=T, batch_size=8, progress=False)
    g8 = guard_sample(key, split, B_CONSTRAINT, 8, max_new_tokens=T, batch_size=8, progress=False)
    np.testing.assert_array_equal(g8.tokens_NT, g1.tokens_NT)
    assert g8.draws == g1.draws
    _refused(lambda: draw(key, split, 12, max_new_tokens=T, batch_size=12, progress=False), "batch_size=12 must be divisible")


PARTS = ("driver", "sft", "dpg", "dpg_off", "l3m", "aux", "rl")  # what --only selects: the driver and each trainer


def trainers(model, params, mesh, names=PARTS):
    """(name, trainer, initial params) for every trainer in `names`, on an LM with `mesh` (None: one device)."""
    a = LM.of(model, params).with_mesh(mesh)
    rows = sample(jax.random.PRNGKey(11), model, params, *bos_prompt(model, N), T)
    tokens, lengths = np.asarray(rows.tokens_BT), np.asarray(rows.lengths_B)
    head = GPT2(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_id=31, eos_id=31)
    q_params = jax.tree.map(lambda x: 0.8 * x, params)  # the off-policy proposal: a flatter GPT-2 on the same prompt
    dpg = DPGConfig(n_samples=N, minibatch=N, max_new_tokens=T, learning_rate=LR)
    make = {
        "sft": lambda: (SFT(a, tokens, lengths, SFTConfig(batch_size=N, learning_rate=LR)), params),
        "dpg": lambda: (DPG(a, B_CONSTRAINT, dpg), params),
        "dpg_off": lambda: (DPG(a, B_CONSTRAINT, DPGConfig(**{**dpg.__dict__, "on_policy": False}), proposal=a.with_params(q_params)),
                            params),
        "l3m": lambda: (L3M(a, tokens, lengths, [B_CONSTRAINT], L3MConfig(thresholds=[0.9], total_steps=2, n_samples=N, batch_size=N,
                                                                         max_new_tokens=T, learning_rate=LR)), params),
        "aux": lambda: (AuxTrainer(a, head, B_CONSTRAINT, AuxConfig(n_samples=N, max_new_tokens=T, learning_rate=LR)),
                        {"head": head.init(jax.random.PRNGKey(5)), "policy": params}),
        "rl": lambda: (RL(a, B_CONSTRAINT, RLConfig(beta=0.5, n_samples=N, max_new_tokens=T, learning_rate=LR)), params),
    }
    return [(name, *make[name]()) for name in make if name in names]


def _policy_logp(model, params, ys):
    prompt, mask = bos_prompt(model, ys.tokens_BT.shape[0])
    return np.asarray(log_prob(model, jax.device_get(params), prompt, mask, ys.tokens_BT, ys.lengths_B)[0])


def _check_sharded(name, state, mesh) -> None:
    """On a 2-D mesh: the MLP kernel is split over "model" by the rules, and Adam's moments like the params."""
    model_axis = mesh.shape["model"]
    kernel = (state.params["policy"] if name == "aux" else state.params)["h_0"]["c_fc"]["kernel"]
    assert kernel.sharding.spec == P(None, "model"), (name, kernel.sharding.spec)
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // model_axis), name
    mu = state.opt_state[0][0].mu if isinstance(state.opt_state[0], tuple) else state.opt_state[0].mu
    mu_specs = [x.sharding.spec for x in jax.tree.leaves(mu)]
    assert mu_specs == [x.sharding.spec for x in jax.tree.leaves(state.params)], f"{name}: Adam's mu is not sharded like the params"


def meshes_agree(model, params, meshes, names=PARTS) -> None:
    """On each (data, model) of `meshes`: the driver and one step of every trainer in `names` (loss, policy
    log-probs) equal one device; on 2-D meshes the params and Adam moments are sharded over the model axis."""
    ys = sample(jax.random.PRNGKey(7), model, params, *bos_prompt(model, N), T)
    lp0 = _policy_logp(model, params, ys)
    ref = {}
    for name, trainer, p0 in trainers(model, params, None, names):
        state, metrics = trainer.step(trainer.init_state(p0), step_key(0, 0))
        lp = _policy_logp(model, state.params["policy"] if name == "aux" else state.params, ys)
        moved = float(np.abs(lp - lp0).max())
        assert moved > 50 * LOGP_ATOL, f"{name}: one step moved the policy's log-probs by only {moved:.2e}"
        ref[name] = (float(metrics["loss"]), lp)
    for data, model_axis in meshes:
        mesh = make_mesh(data, model_axis)
        if "driver" in names:
            driver_agrees(model, params, mesh)
        for name, trainer, p0 in trainers(model, params, mesh, names):
            state, metrics = trainer.step(trainer.init_state(p0), step_key(0, 0))
            loss, lp = float(metrics["loss"]), _policy_logp(model, state.params["policy"] if name == "aux" else state.params, ys)
            print(f"{data}x{model_axis} {name}: loss rel diff {abs(loss - ref[name][0]) / max(abs(ref[name][0]), 1e-30):.1e}, "
                  f"log-prob max abs diff {float(np.abs(lp - ref[name][1]).max()):.1e}", flush=True)
            np.testing.assert_allclose(loss, ref[name][0], rtol=LOSS_RTOL, err_msg=f"{name} {data}x{model_axis} loss")
            np.testing.assert_allclose(lp, ref[name][1], atol=LOGP_ATOL, err_msg=f"{name} {data}x{model_axis} policy log-probs")
            if model_axis > 1:
                _check_sharded(name, state, mesh)
        if "dpg" in names:
            _refused(lambda: DPG(LM.of(model, params).with_mesh(mesh), B_CONSTRAINT, DPGConfig(n_samples=12, minibatch=12)),
                     "minibatch=12 must be divisible")
        print(f"mesh {data}x{model_axis} ok", flush=True)


def sampler_agrees(model, params, prompt, mask, max_new_tokens: int, mesh):
    """sample_sharded, sample_pmap and log_prob_sharded on the 1-D data mesh equal one device -> its samples."""
    key = jax.random.PRNGKey(42)
    one = sample(key, model, params, prompt, mask, max_new_tokens)
    sharded = sample_sharded(key, model, params, prompt, mask, max_new_tokens, mesh)
    assert len(sharded.tokens_BT.sharding.device_set) == 8
    pmapped = sample_pmap(key, model, params, prompt, mask, max_new_tokens)
    for other in (sharded, pmapped):
        np.testing.assert_array_equal(np.asarray(other.tokens_BT), np.asarray(one.tokens_BT))
        np.testing.assert_array_equal(np.asarray(other.lengths_B), np.asarray(one.lengths_B))
        np.testing.assert_allclose(np.asarray(other.logp_B), np.asarray(one.logp_B), atol=1e-5)
    got, _ = log_prob_sharded(model, params, prompt, mask, one.tokens_BT, one.lengths_B, mesh)
    np.testing.assert_allclose(np.asarray(got), np.asarray(one.logp_B), atol=1e-5)
    return one


def left_padded_prompts(model, batch_size: int, length: int):
    """Ragged prompts (BOS then random tokens), left-padded: (prompt_BP, mask_BP)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, (batch_size, length))
    tokens[:, 0] = model.bos_id
    pads = rng.integers(0, length, batch_size)
    mask = (np.arange(length)[None] >= pads[:, None]).astype(np.int32)
    return np.where(mask > 0, tokens, model.pad_id).astype(np.int32), mask


def dpg_two_steps_agree(model, params, mesh) -> None:
    """Two DPG updates (two minibatches each) with the batch split over the mesh equal the same on one device."""
    cfg = DPGConfig(n_samples=32, minibatch=16, max_new_tokens=6, learning_rate=LR)
    a = LM.of(model, params)
    one, split = DPG(a, B_CONSTRAINT, cfg), DPG(a.with_mesh(mesh), B_CONSTRAINT, cfg)
    s1, s2 = one.init_state(params), split.init_state(params)
    for i in range(2):
        s1, m1 = one.step(s1, step_key(0, i))
        s2, m2 = split.step(s2, step_key(0, i))
        np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=LOSS_RTOL)
        np.testing.assert_allclose(float(m2["z"]), float(m1["z"]), rtol=1e-5)
    ys = sample(jax.random.PRNGKey(7), model, s1.params, *bos_prompt(model, 32), 6)
    np.testing.assert_allclose(_policy_logp(model, s2.params, ys), _policy_logp(model, s1.params, ys), atol=2 * LOGP_ATOL)


def main(argv) -> int:
    """argv: comma-separated meshes DATAxMODEL (default 2x4), --full for the 1-D data-mesh checks, --only NAMES
    (comma-separated PARTS; default all)."""
    start = time.perf_counter()
    full = "--full" in argv
    names = PARTS
    if "--only" in argv:
        i = argv.index("--only")
        names = tuple(argv[i + 1].split(","))
        assert names and set(names) <= set(PARTS), f"--only takes some of {PARTS}, got {names}"
        argv = argv[:i] + argv[i + 2:]
    args = [a for a in argv if a != "--full"]
    meshes = [tuple(int(n) for n in m.split("x")) for m in (args[0] if args else "2x4").split(",")]
    assert jax.device_count() == 8, jax.devices()
    model, params = tiny_gpt2()
    _refused(lambda: shard_batch(data_mesh(), np.zeros((3, 2))), "divisible")
    meshes_agree(model, params, meshes, names)
    if full:
        mesh = data_mesh()
        toy = TinyTransformerARM(6, 5, eos_id=0)
        sampler_agrees(toy, toy.init(jax.random.PRNGKey(0)), *bos_prompt(toy, 32), 5, mesh)
        one = sampler_agrees(model, params, *left_padded_prompts(model, 32, 6), 8, mesh)
        assert 1 <= int(one.lengths_B.min()) < 8 == int(one.lengths_B.max()), one.lengths_B  # some rows stop at EOS
        dpg_two_steps_agree(model, params, mesh)
    print(f"multidevice ok ({time.perf_counter() - start:.0f} s, {time.process_time():.0f} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
