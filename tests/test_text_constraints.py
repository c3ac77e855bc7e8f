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


def test_spec_grammar_combines_with_and_or_not(tok):
    tokens, lengths = batch(tok, ["the film was amazing", "I loved it . happy", "bad", "the film"])
    b = lambda spec: C.from_spec(spec, tok)(tokens, lengths).tolist()
    assert b("keyword:amazing | keyword:loved") == [True, True, False, False]
    assert b("keyword:the & ~keyword:amazing") == [False, False, False, True]
    assert b("~(keyword:amazing | keyword:bad)") == [False, True, False, True]
    assert b("keyword:the & keyword:film | keyword:bad") == [True, False, True, True]  # & binds tighter than |
    assert b("keyword:the & (keyword:amazing | keyword:bad)") == [True, False, False, False]
    assert b("regex:'film (was|is)'") == [True, False, False, False]
    assert b('regex:"^I loved"') == [False, True, False, False]


def test_spec_without_spaces_around_an_operator_is_an_error_not_one_keyword(tok):
    with pytest.raises(C.SpecError, match=r"ambiguous '&' .*keyword:love & keyword:the.*keyword:'love&keyword:the'"):
        C.from_spec("keyword:love&keyword:the", tok)
    for bad, what in (("regex:a|b", r"ambiguous '\|'"), ("regex:(a)", r"ambiguous '\('"), ("(keyword:a", "never closed"),
                      ("keyword:a)", r"unexpected '\)'"), ("keyword:a keyword:b", "unexpected keyword:'b'"),
                      ("regex:'a", "never closed"), ("keyword:a &", "found the end"), ("sentiment:x", "threshold in"),
                      ("regex:'('", "does not compile"), ("", "empty"), ("~", "found the end")):
        with pytest.raises(C.SpecError, match=what):
            C.parse_spec(bad)


def test_parse_spec_quotes_and_round_trips():
    assert C.parse_spec("keyword:'it\\'s'") == C.SpecAtom("keyword", "it's")
    assert C.parse_spec(r"keyword:'\bfoo\\'") == C.SpecAtom("keyword", "\\bfoo\\")  # \\ is one backslash, \b stays
    tree = C.parse_spec("~(keyword:'a b' | regex:\"x&y\") & sentiment:0.2")
    assert tree == C.SpecOp("&", (C.SpecOp("~", (C.SpecOp("|", (C.SpecAtom("keyword", "a b"), C.SpecAtom("regex", "x&y"))),)),
                                  C.SpecAtom("sentiment", "0.2")))
    assert C.parse_spec(C.spec_to_str(tree)) == tree


def test_keyword_boundaries_for_words_with_non_word_characters():
    search = lambda word, text: C.keyword_pattern(word).search(text) is not None
    assert search("c++", "I write c++ code.") and search("c++", "c++") and not search("c++", "c++x")
    assert search(".net", "a .net app") and not search(".net", "asp.net")
    assert search("amazing", "so amazing!") and not search("amazing", "amazingly") and not search("amazing", "unamazing")
    assert search("e-mail", "send an e-mail.") and not search("e-mail", "e-mails")


def test_keyword_c_plus_plus_matches_decoded_text():
    from guard_jax.models import hf
    from guard_jax.lm import EMBEDDED

    tokenizer = hf.load_tokenizer(EMBEDDED)
    rows = [tokenizer("I write c++ code.", add_special_tokens=False)["input_ids"],
            tokenizer("I write c code.", add_special_tokens=False)["input_ids"]]
    T = max(map(len, rows))
    tokens = np.asarray([r + [0] * (T - len(r)) for r in rows])
    assert C.from_spec("keyword:c++", tokenizer)(tokens, np.asarray([len(r) for r in rows])).tolist() == [True, False]
