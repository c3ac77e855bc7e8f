"""Text-level constraints: decode with a Hugging Face tokenizer, then keyword / regex / classifier tests."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from guard_jax import constraints as C

WORDS = ["<|endoftext|>", "the", "film", "was", "amazing", "amazingly", "bad", ".", "I", "loved", "it", "sad", "happy", "Amazing"]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def ids(tok, text):
    return tok(text)["input_ids"]


def batch(tok, texts, T=8):
    rows = [ids(tok, t) for t in texts]
    tokens = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, np.asarray([len(r) for r in rows])


def test_keyword_uses_word_boundaries(tok):
    tokens, lengths = batch(tok, ["the film was amazing", "the film was amazingly bad", "Amazing film", "bad"])
    np.testing.assert_array_equal(C.keyword(tok, "amazing")(tokens, lengths), [True, False, False, False])
    np.testing.assert_array_equal(C.keyword(tok, "amazing", case_sensitive=False)(tokens, lengths), [True, False, True, False])
    lengths[0] = 3  # "amazing" now lies after the end of row 0
    assert not C.keyword(tok, "amazing")(tokens, lengths)[0]


def test_regex_and_prefix(tok):
    tokens, lengths = batch(tok, ["loved it", "the film"])
    c = C.text_regex(tok, r"^I loved", prefix="I ")
    np.testing.assert_array_equal(c(tokens, lengths), [True, False])


def test_classifier_on_last_sentence(tok):
    tokens, lengths = batch(tok, ["sad . I loved it", "I loved it . sad"])
    c = C.classifier_threshold(tok, C.vader_positive, 0.3, prefix="the film was bad . ")
    np.testing.assert_array_equal(c(tokens, lengths), [True, False])
    assert C.last_sentence("a. b. c<|endoftext|>d. e") == "c"


def test_classifier_shape_errors_are_reported(tok):
    tokens, lengths = batch(tok, ["sad", "happy"])
    c = C.classifier_threshold(tok, lambda texts: np.zeros(1), 0.5)
    with pytest.raises(TypeError, match="one float per text"):
        c(tokens, lengths)
    with pytest.raises(ValueError, match="word"):
        C.keyword(tok, " ")


def test_specs(tok):
    tokens, lengths = batch(tok, ["the film was amazing", "I loved it . happy"])
    np.testing.assert_array_equal(C.from_spec("keyword:amazing", tok)(tokens, lengths), [True, False])
    np.testing.assert_array_equal(C.from_spec("regex:lo+ved & sentiment:0.2", tok)(tokens, lengths), [False, True])
    for bad in ("amazing", "keyword:", "colour:red"):
        with pytest.raises(ValueError, match="spec|kind"):
            C.from_spec(bad, tok)
