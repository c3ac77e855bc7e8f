"""Byte-level BPE: offline loading through transformers, exact round trips, deterministic training."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from experiments import build_tokenizer
from guard_jax.data import corpus, tokenizer


@pytest.fixture(scope="module")
def shipped():
    return tokenizer.load()


def test_shipped_tokenizer_loads_offline_with_special_tokens(shipped):
    assert len(shipped) == tokenizer.DEFAULT_VOCAB_SIZE
    assert shipped.bos_token == shipped.eos_token == "<|endoftext|>" and shipped.pad_token == "<|pad|>"
    assert (shipped.eos_token_id, shipped.pad_token_id) == (0, 1)
    auto = AutoTokenizer.from_pretrained(str(tokenizer.SHIPPED_DIR), local_files_only=True)
    text = "The fortune cookie said: you will be amazing."
    assert auto(text)["input_ids"] == shipped(text)["input_ids"]
    assert shipped.decode([shipped.eos_token_id]) == "<|endoftext|>"


@given(st.text(max_size=200))
def test_any_string_round_trips(shipped, text):
    ids = shipped(text, add_special_tokens=False)["input_ids"]
    assert shipped.decode(ids) == text


def test_round_trip_of_corpus_documents(shipped):
    docs = corpus.split_documents("validation")[:200]
    ids = shipped(docs, add_special_tokens=False)["input_ids"]
    assert shipped.batch_decode(ids) == docs
    assert all(tokenizer.EOS not in d for d in docs)


def test_training_is_deterministic_and_survives_save_load(tmp_path):
    docs = corpus.split_documents("train")[:300]
    a = tokenizer.train_bpe(docs, vocab_size=600)
    b = tokenizer.train_bpe(docs, vocab_size=600)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str() and len(a) == 600
    tokenizer.save(a, tmp_path)
    loaded = tokenizer.load(tmp_path)
    assert loaded(docs[:20])["input_ids"] == a(docs[:20])["input_ids"]
    assert loaded.backend_tokenizer.to_str() == a.backend_tokenizer.to_str()


def test_shipped_tokenizer_is_what_the_script_builds(tmp_path):
    stats = build_tokenizer.build(tokenizer.DEFAULT_VOCAB_SIZE, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "stats.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer.SHIPPED_DIR / name).read_bytes(), name
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert stats["train"]["tokens"] > 20 * stats["validation"]["tokens"] > 0


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        tokenizer.train_bpe(["a b c"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="python -m experiments.build_tokenizer"):
        tokenizer.load(tmp_path)
