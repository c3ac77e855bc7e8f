"""Warm-start params from a run folder's Orbax checkpoints (latest or best), with clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from guard_jax.train.loop import LoopConfig, TrainState, run
from guard_jax.train.warm import load_params


class _Walk:
    """params w_s = s (so step s is recognisable); metric `kl` is lowest at step 2."""

    def init_state(self, params):
        return TrainState(jnp.asarray(0, jnp.int32), params, {"mu": jnp.zeros(2)}, {})

    def step(self, state, key):
        s = state.step + 1
        return TrainState(s, {"w": jnp.full(2, s, jnp.float32)}, state.opt_state, {}), {"kl": (s - 2.0) ** 2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = _Walk()
    run(trainer, trainer.init_state({"w": jnp.zeros(2)}), LoopConfig(steps=5, out_dir=out, checkpoint_every=1, best_metric="kl", keep_best=2,
                                                                   progress=False, tensorboard=False))
    return out


def test_latest_and_best(run_dir):
    like = {"w": jnp.zeros(2, jnp.float32)}
    np.testing.assert_array_equal(load_params(run_dir, like)["w"], [5, 5])
    np.testing.assert_array_equal(load_params(run_dir, like, which="best")["w"], [2, 2])
    np.testing.assert_array_equal(load_params(run_dir / "checkpoints")["w"], [5, 5])  # the checkpoints folder itself
    assert load_params(run_dir, {"w": jnp.zeros(2, jnp.bfloat16)})["w"].dtype == jnp.bfloat16


def test_errors_name_the_problem(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_params(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no Orbax checkpoint"):
        load_params(tmp_path)
    with pytest.raises(ValueError, match="structure"):
        load_params(run_dir, {"v": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"\['w'\] .* shape \(2,\), expected \(3,\)"):
        load_params(run_dir, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="which"):
        load_params(run_dir, which="first")
