"""Train the embedded base LM: a small GPT-2 on the embedded corpus with the shipped tokenizer.

    python -m experiments.pretrain_base                      # the shipped model (guard_jax/assets/base_lm)
    python -m experiments.pretrain_base --quick --out /tmp/lm # a few steps, for tests

Deterministic (batches are a function of (seed, step)) and resumable: the run folder holds Orbax
checkpoints, metrics.jsonl and TensorBoard logs; rerunning the same command continues where it stopped.
At the end the model is exported as a Hugging Face folder (config.json, model.safetensors, tokenizer) with
`train_log.json` (settings, validation loss and perplexity, timings).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.data import corpus
from guard_jax.data import tokenizer as tok_lib
from guard_jax.data.packing import pack
from guard_jax.io import atomic_write_json
from guard_jax.models import gpt2, hf
from guard_jax.train.loop import LoopConfig, run
from guard_jax.lm import LM
from guard_jax.train.sft import SFT, SFTConfig, nll_per_token

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "guard_jax" / "assets" / "base_lm"


def token_rows(tokenizer, split: str, seq_len: int) -> np.ndarray:
    """The split's documents tokenized, joined by EOS and cut into rows of seq_len + 1 tokens."""
    ids = tokenizer(corpus.load(split=split), add_special_tokens=False)["input_ids"]
    return pack(ids, seq_len, tokenizer.eos_token_id)


def validation_nll(model, params, rows_NS: np.ndarray, batch_size: int = 64) -> float:
    """Mean NLL per token of the rows (each after BOS), in nats."""
    prompt, mask = LM.of(model, params).prompt_arrays(1)
    fn = jax.jit(lambda p, t: nll_per_token(model, p, jnp.repeat(prompt, len(t), 0), jnp.repeat(mask, len(t), 0), t,
                                            jnp.full((len(t),), t.shape[1], jnp.int32)))
    total, count = 0.0, 0
    for i in range(0, len(rows_NS) - batch_size + 1, batch_size):  # whole batches: one compilation
        total += float(fn(params, jnp.asarray(rows_NS[i:i + batch_size]))) * batch_size
        count += batch_size
    return total / count


def build_model(tokenizer, args) -> gpt2.GPT2:
    return gpt2.GPT2(vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=args.n_head, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(SHIPPED), help="Hugging Face folder to write (default: the shipped model)")
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "pretrain_base"), help="checkpoints and logs (resumable)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seq_len, args.n_layer, args.n_embd, args.n_head = 3, 8, 32, 1, 32, 2
        args.warmup_steps = 0
    if args.seq_len + 2 > args.n_positions:
        p.error(f"--seq-len {args.seq_len} needs --n-positions >= {args.seq_len + 2} (BOS + row)")

    tokenizer = tok_lib.load()
    train, valid = token_rows(tokenizer, "train", args.seq_len), token_rows(tokenizer, "validation", args.seq_len)
    model = build_model(tokenizer, args)
    params = model.init(jax.random.PRNGKey(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"base LM: GPT-2 {args.n_layer} layers x {args.n_embd} dims, {n_params / 1e6:.2f}M params; "
          f"{train.size} train / {valid.size} validation tokens")
    trainer = SFT(LM.of(model, params), train, np.full(len(train), train.shape[1], np.int32),
                  SFTConfig(batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, seed=args.seed))
    t0 = time.perf_counter()
    state, history = run(trainer, trainer.init_state(params),
                         LoopConfig(steps=args.steps, out_dir=args.run_dir, seed=args.seed, checkpoint_every=100))
    seconds = time.perf_counter() - t0
    nll = validation_nll(model, state.params, valid)
    log = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "run_dir")},
        "params": int(n_params),
        "train_tokens": int(train.size),
        "validation_tokens": int(valid.size),
        "epochs": args.steps * args.batch_size / len(train),
        "final_train_loss": history[-1]["loss"] if history else None,
        "validation_nll": nll,
        "validation_perplexity": float(np.exp(nll)),
        "train_seconds_this_call": seconds,
        "machine": f"{jax.devices()[0].platform}, {jax.device_count()} device(s)",
    }
    out = hf.export(args.out, model, state.params, tokenizer)
    atomic_write_json(out / "train_log.json", log)
    print(f"validation perplexity {log['validation_perplexity']:.2f}; wrote {out}")
    return log


if __name__ == "__main__":
    main()
