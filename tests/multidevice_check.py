"""Run in a subprocess with 8 forced host devices: sharded and pmapped sampling/scoring equal one device."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from guard_jax.models.toy import TinyTransformerARM  # noqa: E402
from guard_jax.parallel import data_mesh, log_prob_sharded, sample_pmap, sample_sharded, shard_batch  # noqa: E402
from guard_jax.sampling import bos_prompt, log_prob, sample  # noqa: E402


def main() -> int:
    assert jax.device_count() == 8, jax.devices()
    model = TinyTransformerARM(6, 5, eos_id=0)
    params = model.init(jax.random.PRNGKey(0))
    prompt, mask = bos_prompt(model, 32)
    key = jax.random.PRNGKey(42)
    one = sample(key, model, params, prompt, mask, 5)
    mesh = data_mesh()
    sharded = sample_sharded(key, model, params, prompt, mask, 5, mesh)
    assert len(sharded.tokens_BT.sharding.device_set) == 8
    pmapped = sample_pmap(key, model, params, prompt, mask, 5)
    for other in (sharded, pmapped):
        np.testing.assert_array_equal(np.asarray(other.tokens_BT), np.asarray(one.tokens_BT))
        np.testing.assert_array_equal(np.asarray(other.lengths_B), np.asarray(one.lengths_B))
        np.testing.assert_allclose(np.asarray(other.logp_B), np.asarray(one.logp_B), atol=1e-5)
    ref, _ = log_prob(model, params, prompt, mask, one.tokens_BT, one.lengths_B)
    got, _ = log_prob_sharded(model, params, prompt, mask, one.tokens_BT, one.lengths_B, mesh)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    try:
        shard_batch(mesh, prompt[:3])
        raise AssertionError("a batch of 3 over 8 devices must be refused")
    except ValueError as e:
        assert "divisible" in str(e)
    print("multidevice ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
