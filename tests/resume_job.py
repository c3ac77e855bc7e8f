"""A small DPG run used by the resume test: `python tests/resume_job.py OUT STEPS [--kill-after K]`.

With --kill-after K the process SIGKILLs itself right after step K's checkpoint is written.
"""

import os
import signal
import sys

import jax
import numpy as np

from guard_jax import constraints as C
from guard_jax.lm import LM
from guard_jax.models.toy import TinyTransformerARM
from guard_jax.train import loop
from guard_jax.train.dpg import DPG, DPGConfig


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    kill_after = int(sys.argv[4]) if len(sys.argv) > 4 else None
    model = TinyTransformerARM(4, 4, eos_id=0, d_model=16)
    a_params = model.init(jax.random.PRNGKey(0))
    trainer = DPG(LM.of(model, a_params), C.contains_ngram([2, 3]), DPGConfig(n_samples=128, minibatch=64, max_new_tokens=4, learning_rate=3e-3))
    if kill_after is not None:
        original = trainer.step

        def step(state, key):
            if int(state.step) == kill_after + 1:  # the checkpoint of step kill_after is on disk by now
                os.kill(os.getpid(), signal.SIGKILL)
            return original(state, key)

        trainer.step = step
    config = loop.LoopConfig(steps=steps, out_dir=out, checkpoint_every=1 if kill_after is not None else steps, progress=False, seed=3)
    state, _ = loop.run(trainer, trainer.init_state(a_params), config)
    np.savez(os.path.join(out, "final.npz"), *[np.asarray(x) for x in jax.tree.leaves(state.params)])


if __name__ == "__main__":
    main()
