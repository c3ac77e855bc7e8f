"""guard_jax.lark_fsm: a Lark CFG unrolled to a bounded depth, as a character DFA whose states past the bound are
universal; checked against llguidance's matcher text by text, and the dense route it opens for a CFG: the same
samples as llguidance's masks bit for bit, including when rows pass the depth bound (llguidance takes over)."""

import functools

import jax
import numpy as np
import pytest

from guard_jax.decoding import gcd
from guard_jax.grammars import Grammar
from guard_jax.lark_fsm import lark_fsm
from guard_jax.lm import LM
from tests.test_grammars import _dense_samples_equal_to_llguidance
from tests.test_json_regex import _Bytes, _llguidance_accepts

ARITHMETIC = 'start: expr\nexpr: term ((" + " | " - ") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]+/\n'
GRAMMARS = {
    "arithmetic": ARITHMETIC,
    "ignored whitespace, common terminals": ('start: pair ("," pair)*\npair: WORD "=" (INT | list)\nlist: "[" [INT ("," INT)*] "]"\n'
                                            '%import common.WORD\n%import common.INT\n%import common.WS\n%ignore WS\n'),
    "repeats, ranges, maybe": 'start: "a"~2 b? ("c".."e")~1..3 [f]\nb: "b" start? "b"\nf: "f"+\n',
}


def _depth(text: str) -> int:
    depth = most = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        most = max(most, depth)
    return most


@pytest.fixture(scope="module")
def byte_tokenizer():
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


def _texts(rng, alphabet, n):
    return ["".join(rng.choice(alphabet, size=int(rng.integers(1, 12)))) for _ in range(n)]


@pytest.mark.parametrize("name", list(GRAMMARS))
def test_unrolled_dfa_accepts_what_llguidance_accepts_within_its_depth(name, byte_tokenizer):
    """Random texts over the grammar's characters: below the depth bound (no universal state on the way) the
    DFA accepts exactly llguidance's texts; every text llguidance accepts is accepted by the DFA."""
    text = GRAMMARS[name]
    fsm, universal = lark_fsm(text, levels=8)
    grammar = Grammar.lark(text, byte_tokenizer)
    alphabet = {"arithmetic": list("0123()") + [" + ", " - ", "+", " "],
                "ignored whitespace, common terminals": list("ab1=[], ") + ["\n", "x=1", "y=[2,3]"],
                "repeats, ranges, maybe": ["aa", "aab", "b", "c", "d", "e", "f", "ff", "cd"]}[name]
    rng = np.random.default_rng(0)
    texts = _texts(rng, alphabet, 3000)
    agree = universal_seen = accepted = 0
    for t in texts:
        theirs = _llguidance_accepts(grammar, t.encode())
        state, passed = fsm.initial, False
        for c in t:
            state = fsm.map.get(state, {}).get(fsm.alphabet[c])
            if state is None:
                break
            passed |= state in universal
        ours = state is not None and state in fsm.finals
        assert ours or not theirs, t  # the unrolled language holds the grammar's
        if not passed:
            assert ours == theirs, t
            agree += 1
        universal_seen += passed
        accepted += theirs
    assert agree > 2000 and accepted > 20


@pytest.mark.parametrize("grammar", [
    'start: x{"a"}\nx{y}: y y\n',  # a template
    'start: /ab/i\n',  # a regex flag
    'start: "a"i\n',
    'start: %json {"type": "object"}\n',  # llguidance's extension
])
def test_grammars_outside_the_subset_have_no_fsm(grammar):
    assert lark_fsm(grammar) is None


@pytest.mark.parametrize("levels", [24, 6])
def test_cfg_masks_come_from_a_dense_table_with_llguidances_samples(levels, monkeypatch):
    """The arithmetic CFG on the embedded model takes the dense route and gives llguidance's samples bit for bit,
    with the default bound (24 levels: no row comes near it) and with 6 levels (a row inside one parenthesis is
    in an unsafe state, a token away from the bound, and llguidance's masks take the batch over)."""
    monkeypatch.setattr(gcd, "lark_fsm", functools.partial(lark_fsm, levels=levels))
    lm = LM.load("embedded")
    grammar = Grammar.lark(ARITHMETIC, lm.tokenizer, vocab_size=lm.model.vocab_size)
    table = gcd.dense_masks(grammar)
    assert table is not None and int(np.asarray(table.unsafe_S).sum()) > 0
    dense = _dense_samples_equal_to_llguidance(lm, grammar, 64, 30, jax.random.PRNGKey(4))
    depth = max(_depth(lm.tokenizer.decode(row[:n].tolist())) for row, n in zip(dense.tokens_BT, dense.lengths_B))
    if levels == 6:
        assert depth >= 1  # an unsafe state reached: the handoff ran
