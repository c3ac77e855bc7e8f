"""Train the byte-level BPE tokenizer on the embedded corpus's train split and save it (deterministic).

    python -m experiments.build_tokenizer                       # rebuilds guard_jax/assets/tokenizer/
    python -m experiments.build_tokenizer --vocab-size 4096 --out /tmp/tok4k

Writes tokenizer.json and tokenizer_config.json (loadable by transformers) and stats.json (vocabulary size,
tokens and characters per split), each atomically, and prints the stats.
"""

from __future__ import annotations

import argparse
import json

from guard_jax.data import corpus, tokenizer
from guard_jax.io import atomic_write_json


def build(vocab_size: int, out, min_frequency: int = 2) -> dict:
    """Train on the train split, save to `out`, and return the stats written to `out/stats.json`."""
    splits = {s: corpus.split_documents(s) for s in corpus.SPLITS}
    tok = tokenizer.train_bpe(splits["train"], vocab_size=vocab_size, min_frequency=min_frequency)
    tokenizer.save(tok, out)
    stats = {"corpus": corpus.NAME, "source": f"{corpus.FORTUNE_PACKAGE}=={corpus.FORTUNE_PACKAGE_VERSION}",
             "vocab_size": len(tok), "min_frequency": min_frequency,
             "special_tokens": {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}}
    for s, docs in splits.items():
        n_tok, n_chr = tokenizer.count_tokens(tok, docs), sum(map(len, docs))
        stats[s] = {"documents": len(docs), "characters": n_chr, "tokens": n_tok, "chars_per_token": round(n_chr / n_tok, 4)}
    atomic_write_json(f"{out}/stats.json", stats)
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=tokenizer.DEFAULT_VOCAB_SIZE)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--out", default=str(tokenizer.SHIPPED_DIR))
    args = p.parse_args(argv)
    print(json.dumps(build(args.vocab_size, args.out, args.min_frequency), indent=2))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
