"""A stand-in experiment for sweep tests: sleeps `--sleep` seconds, then writes its result atomically."""

import argparse
import time

from guard_jax.io import atomic_write_json

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float)
parser.add_argument("--seed", type=int)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--out")
args = parser.parse_args()
time.sleep(args.sleep if args.lr == 0.2 else 0.0)
atomic_write_json(args.out, {"metrics": {"loss": args.lr * 10 + args.seed}, "started": time.time()})
