"""Run in a subprocess with 8 forced host devices: a LoRA policy trained by DPG (and SFT) with its state sharded
over a 2x4 mesh takes the same step as on one device (loss, Z-hat, policy log-probs), its adapters and their Adam
moments are sharded, and the frozen weights are untouched."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from guard_jax import constraints as C  # noqa: E402
from guard_jax import lora  # noqa: E402
from guard_jax.lm import LM  # noqa: E402
from guard_jax.models import lora as lora_lib  # noqa: E402
from guard_jax.models.gpt2 import GPT2  # noqa: E402
from guard_jax.parallel import make_mesh  # noqa: E402
from guard_jax.sampling import bos_prompt, log_prob, sample  # noqa: E402
from guard_jax.train.dpg import DPG, DPGConfig  # noqa: E402
from guard_jax.train.loop import step_key  # noqa: E402
from guard_jax.train.sft import SFT, SFTConfig  # noqa: E402


def main() -> None:
    model = GPT2(vocab_size=48, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_id=47, eos_id=47)
    base = LM.of(model, jax.tree.map(lambda x: 3 * x, model.init(jax.random.PRNGKey(2))))
    pi = lora.with_lora(base, rank=4, alpha=8.0, key=jax.random.PRNGKey(5))
    mesh = make_mesh(2, 4)
    b = C.predicate(lambda t, n: np.any((t < 10) & (np.arange(t.shape[1])[None] < n[:, None]), axis=1), "any token < 10")
    ys = sample(jax.random.PRNGKey(7), pi.model, pi.params, *bos_prompt(model, 32), 6)
    logp = lambda params: np.asarray(log_prob(pi.model, jax.device_get(params), *bos_prompt(model, 32), ys.tokens_BT, ys.lengths_B)[0])
    cfg = DPGConfig(n_samples=32, minibatch=16, max_new_tokens=6, learning_rate=1e-2, on_policy=False)
    sft_data = (np.asarray(ys.tokens_BT), np.asarray(ys.lengths_B))
    for name, make in (("dpg", lambda lm: DPG(lm, b, cfg)), ("sft", lambda lm: SFT(lm, *sft_data, SFTConfig(batch_size=16, learning_rate=1e-2)))):
        one, split = make(pi), make(pi.with_mesh(mesh))
        s1, s2 = one.init_state(pi.params), split.init_state(pi.params)
        for i in range(2):
            s1, m1 = one.step(s1, step_key(0, i))
            s2, m2 = split.step(s2, step_key(0, i))
            np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(logp(s2.params), logp(s1.params), atol=1e-4, rtol=2e-5, err_msg=name)
        assert np.abs(logp(s1.params) - logp(pi.params)).max() > 1e-3, name  # the adapters moved the policy
        adapters, frozen = lora_lib.split(s2.params)
        a_kernel = adapters["h_0"]["c_fc"]["kernel_lora_a"]  # [32, 4]: its 32 rows split over the 4-device "model" axis
        assert a_kernel.sharding.spec[0] == "model" and len(a_kernel.sharding.device_set) == 8, a_kernel.sharding
        mu = jax.tree.leaves(s2.opt_state)
        assert sum(x.size for x in mu if np.ndim(x)) == 2 * lora.num_adapter_params(pi.params), name
        for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(lora_lib.split(pi.params)[1]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        print(name, "ok")


if __name__ == "__main__":
    main()
