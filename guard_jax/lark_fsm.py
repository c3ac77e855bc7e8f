"""A Lark CFG with its recursion unrolled to a bounded depth, as one character DFA (interegular's FSM): what
puts a CFG's masks on the device (`guard_jax.decoding.dense_masks`) for every prefix that stays shallow.

`lark_fsm(text, levels)` reads the grammar with `lark` and composes FSMs bottom-up: a literal or a /regex/ is
its FSM; a sequence, `|`, `*`, `+`, `?`, `[...]`, `~ n` and `~ n..m` compose them; a rule reference is the
rule's FSM one level down (memoised per (rule, level)). A reference at level 0 is the *overflow*: from there on
every text is accepted, so the DFA's states past it are universal. Every prefix that never reaches the overflow
is a prefix of the language exactly when it is one of the grammar's, so the masks of the states from which no
token reaches a universal state are the grammar's masks; the sampler hands the batch to llguidance's masks
when a row reaches any other state (`gcd.DenseMasks.unsafe_S`).

Supported: rules and terminals built of the above, `%import` of lark's common terminals, `%ignore` (its
terminals allowed after every terminal, named or anonymous, as llguidance's lexer skips them: not before the
first). Anything else
(templates, terminal flags such as /i, lark's or llguidance's own extensions) gives None. That the DFA reads
the grammar as llguidance does (its lexer takes the longest match) is checked state by state when the table
is built, against llguidance's masks.
"""

from __future__ import annotations

import ast
import functools
import re

OVERFLOW = "\U000f0000"  # a private-use character no token spells: the overflow's marker in the composed FSM


class _Unsupported(Exception):
    pass


def lark_fsm(text: str, levels: int = 24):
    """(FSM, universal states) of the Lark grammar `text` with rule references nested at most `levels` deep,
    or None where the grammar is outside this module's subset."""
    import interegular
    from lark.exceptions import LarkError
    from lark.load_grammar import load_grammar

    try:
        grammar, _ = load_grammar(text, "<grammar>", None, False)
    except LarkError:
        return None
    rules = {name: tree for name, params, tree, _ in grammar.rule_defs if not params}
    if len(rules) != len(grammar.rule_defs) or "start" not in rules:
        return None
    terms = {name: tree for name, (tree, _) in grammar.term_defs}
    pattern = lambda p: interegular.parse_pattern(p).to_fsm()
    try:
        ignore = _union([_term(terms, name, pattern) for name in grammar.ignore]).star() if grammar.ignore else None

        @functools.cache
        def rule(name: str, level: int):
            if level == 0:
                return pattern(OVERFLOW)
            body = _tree(rules[name], lambda sym: rule(sym, level - 1) if sym in rules else _term(terms, sym, pattern, ignore), pattern,
                         ignore)
            return body.reduce()

        fsm = rule("start", levels).reduce()
    except Exception:  # _Unsupported, an undefined name (KeyError), or a regex interegular cannot compile (several types)
        return None
    return _universal_after_overflow(fsm)


def _tree(tree, reference, pattern, after=None):
    """The FSM of a rule or terminal body (lark's EBNF tree); `after` (the ignored terminals) follows each of a
    rule's anonymous terminals (its literals, /regexes/ and ranges)."""
    from interegular.fsm import epsilon

    data, kids = tree.data, tree.children
    if data == "expansions":
        return _union([_tree(k, reference, pattern, after) for k in kids])
    if data == "alias":
        return _tree(kids[0], reference, pattern, after)
    if data == "expansion":
        parts = [_tree(k, reference, pattern, after) for k in kids]
        return parts[0].concatenate(*parts[1:]) if parts else epsilon(pattern("a").alphabet)
    if data == "maybe":
        return _optional(_tree(kids[0], reference, pattern, after))
    if data == "expr":
        inner, op = _tree(kids[0], reference, pattern, after), str(kids[1])
        if op == "*":
            return inner.star()
        if op == "+":
            return inner.concatenate(inner.star())
        if op == "?":
            return _optional(inner)
        if op == "~":
            lo, hi = int(kids[2]), int(kids[3]) if len(kids) > 3 else int(kids[2])
            return _union([inner.times(n) for n in range(lo, hi + 1)])
        raise _Unsupported(op)
    if data == "value":
        (kid,) = kids
        if hasattr(kid, "data"):
            return _tree(kid, reference, pattern, after)
        return reference(kid.name)
    if data == "literal":
        return _then(pattern(_literal_regex(str(kids[0]))), after)
    if data == "range":
        a, b = (_literal_text(str(k)) for k in kids)
        return _then(pattern(f"[{_escape_class(a)}-{_escape_class(b)}]"), after)
    raise _Unsupported(data)


def _term(terms, name: str, pattern, ignore=None):
    """A terminal's FSM, followed by the ignored terminals where there are some."""
    return _then(_tree(terms[name], lambda sym: _term(terms, sym, pattern), pattern), ignore)


def _then(fsm, after):
    return fsm if after is None else fsm.concatenate(after)


def _literal_regex(token: str) -> str:
    if token.startswith('"'):
        if not token.endswith('"'):
            raise _Unsupported(token)  # "..."i and other flags
        return re.escape(_literal_text(token))
    body, _, flags = token[1:].rpartition("/")
    if flags:
        raise _Unsupported(token)
    return body


def _literal_text(token: str) -> str:
    return ast.literal_eval(token)


def _escape_class(char: str) -> str:
    return "\\" + char if char in "\\]^-[" else char


def _union(fsms):
    return fsms[0].union(*fsms[1:])


def _optional(fsm):
    from interegular.fsm import epsilon

    return fsm.union(epsilon(fsm.alphabet))


def _universal_after_overflow(fsm):
    """The FSM with every state that reads OVERFLOW made universal (accepting, every character to one
    universal state) -> (FSM, universal states), the overflow's symbol kept (no token spells it)."""
    from interegular.fsm import FSM

    symbol = fsm.alphabet[OVERFLOW] if OVERFLOW in fsm.alphabet._symbol_mapping else None
    marked = {s for s, row in fsm.map.items() if symbol is not None and symbol in row}
    if not marked:
        return fsm, frozenset()
    u = max(fsm.states) + 1
    everything = {sym: u for sym in fsm.alphabet.by_transition}
    new_map = {s: (dict(everything) if s in marked else dict(row)) for s, row in fsm.map.items()}
    new_map[u] = dict(everything)
    universal = frozenset(marked | {u})
    return FSM(alphabet=fsm.alphabet, states=set(fsm.states) | {u}, initial=fsm.initial, finals=set(fsm.finals) | universal,
               map=new_map), universal
