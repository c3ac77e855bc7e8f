"""guard_jax.json_regex: a regular JSON schema as a regex with llguidance's JSON rules, checked text by text
against llguidance's own matcher (valid instances, their mutations and random byte strings), and the dense
on-device mask route it opens (its samples are llguidance's route's, bit for bit)."""

import re

import jax
import numpy as np
import pytest

from guard_jax.decoding import regex_automaton
from guard_jax.grammars import Grammar, token_bytes
from guard_jax.json_regex import int_range, schema_regex
from bench.bench_decoding import JSON_SCHEMA as FOUR_FIELDS
from guard_jax.lm import EMBEDDED, LM
from tests.test_grammars import _dense_samples_equal_to_llguidance

SCHEMAS = {
    "four fields": (FOUR_FIELDS, ['{"name":"a","age":5,"email":"a@b.com","active":true}',
                                  '{ "name" : "é\\n\\u001F" ,\n\t"age":120,"email":"xy@z.com","active":false }']),
    "optional properties": ({"type": "object", "additionalProperties": False, "required": ["b"],
                             "properties": {"a": {"type": "integer"}, "b": {"type": "null"}, "c": {"type": "number"}}},
                            ['{"b":null}', '{"a":-0,"b":null,"c":-1.5e+3}', '{"b":null, "c":0.25}']),
    "bounded array": ({"type": "array", "items": {"enum": ["x", 7, True, None]}, "minItems": 1, "maxItems": 3},
                      ['["x"]', '[ 7 , true,null ]']),
    "strings": ({"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 3}},
                ['[]', '["ab","\\t\\"\\\\"]', '["日本語"]']),
    "searched pattern": ({"type": "string", "pattern": "[0-9]{2}"}, ['"a12b"', '"99"']),
    "compact": ({"type": "object", "properties": {"k": {"type": "array", "items": {"type": "integer", "minimum": 3, "maximum": 1234}}},
                 "required": ["k"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}},
                ['{"k":[3,1234,77]}', '{"k":[]}']),
}


class _Bytes:
    """A byte-level vocabulary for llguidance: EOS (id 0) and the 256 bytes (id 1 + byte)."""

    def __init__(self):
        self.tokens = [b"<eos>"] + [bytes([i]) for i in range(256)]
        self.eos_token_id, self.bos_token_id, self.special_token_ids = 0, None, [0]

    def __call__(self, text):
        return [1 + b for b in (text.encode() if isinstance(text, str) else text)]


@pytest.fixture(scope="module")
def embedded_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(EMBEDDED))


@pytest.fixture(scope="module")
def byte_tokenizer():
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


def _llguidance_accepts(grammar: Grammar, data: bytes) -> bool:
    m = grammar.matcher()
    return bool(m.consume_tokens([1 + b for b in data])) and m.is_accepting()


def _mutations(text: str, rng: np.random.Generator, n: int) -> list[bytes]:
    """Texts near a valid one: a character deleted, duplicated or replaced by a JSON-ish or multi-byte one, and
    random bytes (some invalid UTF-8) inserted."""
    alphabet = list('{}[],:" \n\t\\-+.0123456789eEabnrtufxyz') + ["é", "\x7f", "\x1f", "日"]
    data = text.encode()
    out = []
    for _ in range(n):
        chars = list(text)
        k = int(rng.integers(len(chars)))
        op = rng.integers(4)
        if op == 0:
            del chars[k]
        elif op == 1:
            chars.insert(k, chars[k])
        elif op == 2:
            chars[k] = str(rng.choice(alphabet))
        else:
            out.append(data[:k] + bytes(rng.integers(0, 256, int(rng.integers(1, 3))).tolist()) + data[k:])
            continue
        out.append("".join(chars).encode())
    return out


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_regex_accepts_exactly_what_llguidance_accepts(name, byte_tokenizer):
    schema, valid = SCHEMAS[name]
    pattern = schema_regex(schema)
    assert pattern is not None
    grammar = Grammar.json_schema(schema, byte_tokenizer)
    rng = np.random.default_rng(0)
    texts = [t.encode() for t in valid] + [m for t in valid for m in _mutations(t, rng, 150)]
    got = []
    for data in texts:
        try:
            ours = re.fullmatch(pattern, data.decode("utf-8")) is not None
        except UnicodeDecodeError:
            ours = False  # llguidance's texts are valid UTF-8
        assert ours == _llguidance_accepts(grammar, data), (name, data)
        got.append(ours)
    assert all(got[: len(valid)]) and 0.02 < np.mean(got) < 0.9  # both outcomes among the mutations


def test_int_range_is_the_integers_between_its_bounds_without_leading_zeros():
    for lo, hi in [(0, 0), (0, 9), (0, 120), (3, 1234), (7, 7), (10, 99), (95, 305), (100, 199), (1, 2000)]:
        pattern = int_range(lo, hi)
        got = [n for n in range(2500) if re.fullmatch(pattern, str(n))]
        assert got == list(range(lo, hi + 1)), (lo, hi)
        assert not re.fullmatch(pattern, "0" + str(max(lo, 1))), (lo, hi)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "integer"}}},  # additional properties: any JSON value
    {"type": "array"},  # any JSON items
    {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "integer", "exclusiveMinimum": 0},
    {"type": "string", "pattern": "^a.b$"},
    {"type": "string", "pattern": "^a|b$"},
    {"type": "string", "pattern": "[a-z]+", "maxLength": 3},
    {"type": "string", "format": "date"},
    {"enum": ["é"]},
    {"type": "string", "enum": [1]},
    {"type": "integer", "x-guidance": {"key_separator": ": "}},
])
def test_schemas_outside_the_subset_have_no_regex(schema):
    assert schema_regex(schema) is None


def test_json_schema_masks_come_from_a_dense_table_with_llguidances_samples(embedded_tokenizer):
    """The 4-field schema on the embedded tokenizer takes the dense on-device route by default, and its samples
    over 30 steps (three cache segments) are bit for bit those of llguidance's masks (`dense=False`)."""
    from guard_jax.decoding.gcd import dense_masks

    lm = LM.load("embedded")
    grammar = Grammar.json_schema(FOUR_FIELDS, embedded_tokenizer, vocab_size=8192)
    assert dense_masks(grammar) is not None
    dense = _dense_samples_equal_to_llguidance(lm, grammar, 16, 30, jax.random.PRNGKey(2))
    texts = [embedded_tokenizer.decode(row[: n].tolist()) for row, n in zip(dense.tokens_BT, dense.lengths_B)]
    assert all(t.startswith('{') for t in texts) and dense.lengths_B.max() == 30


def test_reject_mode_allows_only_valid_utf8(embedded_tokenizer):
    """`regex_automaton(..., invalid_utf8="reject")` over "any text": b of random byte-piece sequences is their
    being valid UTF-8 (the default reads invalid bytes as U+FFFD, which "any text" accepts)."""
    tb = token_bytes(embedded_tokenizer, 8192)
    eos = embedded_tokenizer.eos_token_id
    pool = np.asarray([i for i, t in tb.items() if len(t) == 1 or any(x >= 0x80 for x in t)])
    tokens = np.random.default_rng(1).choice(pool, size=(3000, 3))
    tokens[:3] = [[tb_id(tb, b"\xed"), tb_id(tb, b"\xa1"), tb_id(tb, b"\x80")], [tb_id(tb, b"\xed"), tb_id(tb, b"\x9f"), tb_id(tb, b"\xbf")],
                  [tb_id(tb, b"\xc3"), tb_id(tb, b"\xa9"), tb_id(tb, b"a")]]
    want = []
    for row in tokens:
        try:
            b"".join(tb[int(i)] for i in row).decode("utf-8")
            want.append(True)
        except UnicodeDecodeError:
            want.append(False)
    strict = regex_automaton("(?s:.*)", tb, eos_id=eos, vocab_size=8192, invalid_utf8="reject")
    lenient = regex_automaton("(?s:.*)", tb, eos_id=eos, vocab_size=8192)
    lengths = np.full(3000, 3)
    np.testing.assert_array_equal(np.asarray(strict.accepts(tokens, lengths)), want)
    assert np.asarray(lenient.accepts(tokens, lengths)).all() and 0.05 < np.mean(want) < 0.95
    assert want[:3] == [False, True, True]
    with pytest.raises(ValueError, match="invalid_utf8"):
        regex_automaton("a", tb, eos_id=eos, vocab_size=8192, invalid_utf8="ignore")


def tb_id(tb: dict, data: bytes) -> int:
    return next(i for i, t in tb.items() if t == data)
