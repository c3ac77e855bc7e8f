"""A byte-level BPE tokenizer trained with Hugging Face `tokenizers`, saved as `tokenizer.json`, loaded by transformers.

GPT-2 conventions: byte-level pre-tokenization without a prefix space (every string round-trips exactly),
`<|endoftext|>` is both BOS and EOS (it separates packed documents and starts samples), `<|pad|>` pads.
Training is deterministic: the same documents in the same order give a byte-identical `tokenizer.json`.

The tokenizer trained on the embedded corpus's train split ships in `guard_jax/assets/tokenizer/`
(rebuild it with `python -m experiments.build_tokenizer`).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from guard_jax.io import atomic_write_bytes

EOS = BOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)  # ids 0 and 1
DEFAULT_VOCAB_SIZE = 8192
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "tokenizer"


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (vocabulary = 2 special tokens + 256 bytes + merges, at most `vocab_size`)."""
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (special tokens + 256 byte symbols), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a `tokenizers.Tokenizer`, with our BOS/EOS/PAD."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def save(tokenizer: PreTrainedTokenizerFast, folder: str | os.PathLike) -> pathlib.Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`, each atomically."""
    folder = pathlib.Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(pathlib.Path(tmp).iterdir()):
            atomic_write_bytes(folder / path.name, path.read_bytes())
    return folder


def load(folder: str | os.PathLike = SHIPPED_DIR) -> PreTrainedTokenizerFast:
    """The tokenizer saved in `folder` (default: the shipped one), through transformers, offline."""
    folder = pathlib.Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}: build one with `python -m experiments.build_tokenizer --out {folder}`")
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def count_tokens(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> int:
    """Total number of tokens of `texts` (no special tokens added)."""
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
