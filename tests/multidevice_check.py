"""Run in a subprocess with 8 forced host devices: sharded and pmapped sampling/scoring equal one device."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from guard_jax.models.gpt2 import GPT2  # noqa: E402
from guard_jax.models.toy import TinyTransformerARM  # noqa: E402
from guard_jax.parallel import data_mesh, log_prob_sharded, sample_pmap, sample_sharded, shard_batch  # noqa: E402
from guard_jax.sampling import bos_prompt, log_prob, sample  # noqa: E402


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


def main() -> int:
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
    print("multidevice ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
