"""Binary constraints b(y): vectorized predicates over token sequences, combinable with &, |, ~.

A constraint is called as `b(tokens_BT, lengths_B) -> bool_B`, where `tokens_BT` are the generated
tokens (padding after `lengths_B`). Token-level constraints are pure jnp (jit-able, usable by masking
and ASAp on prefixes); text-level ones decode on the host. Every result is checked: a predicate that
returns the wrong shape or dtype raises a `TypeError` naming the constraint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Constraint:
    """b(tokens_BT, lengths_B) -> bool_B, with a readable name and the &, |, ~ combinators."""

    def __init__(self, fn: Callable, name: str):
        if not callable(fn):
            raise TypeError(f"constraint fn must be callable, got {type(fn).__name__}")
        self.fn, self.name = fn, name

    def __call__(self, tokens_BT, lengths_B):
        if np.ndim(tokens_BT) != 2:
            raise ValueError(f"tokens_BT must be 2-D [batch, time], got shape {np.shape(tokens_BT)}")
        if np.shape(lengths_B) != np.shape(tokens_BT)[:1]:
            raise ValueError(f"lengths_B must have shape {np.shape(tokens_BT)[:1]}, got {np.shape(lengths_B)}")
        out = self.fn(tokens_BT, lengths_B)
        if np.shape(out) != np.shape(tokens_BT)[:1] or out.dtype != bool:
            raise TypeError(
                f"constraint {self.name!r} must return a bool array of shape {np.shape(tokens_BT)[:1]}, "
                f"got dtype {getattr(out, 'dtype', type(out).__name__)} and shape {np.shape(out)}"
            )
        return out

    def __and__(self, other: Constraint) -> Constraint:
        return Constraint(lambda t, n: self(t, n) & other(t, n), f"({self.name} & {other.name})")

    def __or__(self, other: Constraint) -> Constraint:
        return Constraint(lambda t, n: self(t, n) | other(t, n), f"({self.name} | {other.name})")

    def __invert__(self) -> Constraint:
        return Constraint(lambda t, n: ~self(t, n), f"~{self.name}")

    def __repr__(self) -> str:
        return f"Constraint({self.name})"


def _in_sequence_BT(tokens_BT, lengths_B):
    return jnp.arange(tokens_BT.shape[1])[None] < jnp.asarray(lengths_B)[:, None]


def contains_ngram(ngram: Sequence[int]) -> Constraint:
    """True where the n-gram occurs (contiguously) before the end of the sequence."""
    ngram = tuple(int(v) for v in ngram)
    if not ngram:
        raise ValueError("ngram must hold at least one token")

    def fn(tokens_BT, lengths_B):
        tokens_BT = jnp.asarray(tokens_BT)
        n, T = len(ngram), tokens_BT.shape[1]
        if n > T:
            return jnp.zeros(tokens_BT.shape[:1], bool)
        inside_BT = _in_sequence_BT(tokens_BT, lengths_B)
        hit_BS = jnp.ones((tokens_BT.shape[0], T - n + 1), bool)
        for k, v in enumerate(ngram):
            hit_BS = hit_BS & (tokens_BT[:, k : T - n + 1 + k] == v) & inside_BT[:, k : T - n + 1 + k]
        return hit_BS.any(axis=1)

    return Constraint(fn, f"contains{list(ngram)}")


def contains_token(token: int) -> Constraint:
    """True where `token` occurs before the end of the sequence."""
    return Constraint(contains_ngram([token]).fn, f"contains({token})")


def token_at(position: int, token: int) -> Constraint:
    """True where the token at `position` (0-based, within the sequence) equals `token`."""
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")

    def fn(tokens_BT, lengths_B):
        tokens_BT = jnp.asarray(tokens_BT)
        if position >= tokens_BT.shape[1]:
            return jnp.zeros(tokens_BT.shape[:1], bool)
        return (tokens_BT[:, position] == token) & (jnp.asarray(lengths_B) > position)

    return Constraint(fn, f"at[{position}]=={token}")


def regex(pattern: str, token_strings: Sequence[str]) -> Constraint:
    """True where `re.search(pattern, rendering)` matches; the rendering joins `token_strings[v]` (host-side)."""
    compiled = re.compile(pattern)
    table = list(token_strings)

    def fn(tokens_BT, lengths_B):
        tokens_BT, lengths_B = np.asarray(tokens_BT), np.asarray(lengths_B)
        texts = ["".join(table[v] for v in row[:n]) for row, n in zip(tokens_BT, lengths_B)]
        return np.fromiter((compiled.search(t) is not None for t in texts), bool, len(texts))

    return Constraint(fn, f"regex({pattern!r})")


def predicate(fn: Callable, name: str | None = None) -> Constraint:
    """Any user function `fn(tokens_BT, lengths_B) -> bool_B`."""
    return Constraint(fn, name or getattr(fn, "__name__", "predicate"))


def all_of(*constraints: Constraint) -> Constraint:
    """The conjunction of one or more constraints."""
    if not constraints:
        raise ValueError("all_of needs at least one constraint (an empty constraint set has no meaning)")
    out = constraints[0]
    for c in constraints[1:]:
        out = out & c
    return out


def any_of(*constraints: Constraint) -> Constraint:
    """The disjunction of one or more constraints."""
    if not constraints:
        raise ValueError("any_of needs at least one constraint (an empty constraint set has no meaning)")
    out = constraints[0]
    for c in constraints[1:]:
        out = out | c
    return out


# ---- text-level constraints: decode the tokens, then test the string (host-side, as the paper does) ----


def decode_texts(tokenizer, tokens_BT, lengths_B) -> list[str]:
    """Decode each row up to its length with a Hugging Face tokenizer (special tokens dropped)."""
    tokens_BT, lengths_B = np.asarray(tokens_BT), np.asarray(lengths_B)
    return tokenizer.batch_decode([row[:n].tolist() for row, n in zip(tokens_BT, lengths_B)], skip_special_tokens=True)


def text(tokenizer, test: Callable[[list[str]], np.ndarray], name: str, prefix: str = "") -> Constraint:
    """b(y) = test(prefix + decode(y)) for a vectorized `test(texts) -> bool array`.

    `prefix` is prepended to each decoded text (the paper's sentiment task judges opening + continuation).
    """

    def fn(tokens_BT, lengths_B):
        texts = [prefix + t for t in decode_texts(tokenizer, tokens_BT, lengths_B)]
        return np.asarray(test(texts), bool)

    return Constraint(fn, name)


def text_regex(tokenizer, pattern: str, flags: int = 0, prefix: str = "") -> Constraint:
    """`re.search(pattern, text)` on the decoded text."""
    compiled = re.compile(pattern, flags)
    return text(tokenizer, lambda texts: np.fromiter((compiled.search(t) is not None for t in texts), bool, len(texts)),
                f"text_regex({pattern!r})", prefix)


def keyword_pattern(word: str, case_sensitive: bool = True) -> re.Pattern:
    """The regex of `keyword`: `word` literally, not preceded and not followed by a word character.

    The rule: a match may not be part of a longer word, i.e. the character before it and the one after it
    (if any) are not letters, digits or underscores (`(?<!\\w)WORD(?!\\w)`). For a word that starts and ends
    with word characters this is the paper's `\\bWORD\\b`; unlike `\\b`, it also works for words that start
    or end with other characters: `c++` matches in "I write c++ code." but not in "c++x", `.net` matches
    in "a .net app" but not in "asp.net".
    """
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"keyword must be a non-empty word, got {word!r}")
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", 0 if case_sensitive else re.IGNORECASE)


def keyword(tokenizer, word: str, case_sensitive: bool = True) -> Constraint:
    """The word occurs as a whole word in the decoded text (see `keyword_pattern` for the boundary rule)."""
    compiled = keyword_pattern(word, case_sensitive)
    return text(tokenizer, lambda texts: np.fromiter((compiled.search(t) is not None for t in texts), bool, len(texts)),
                f"keyword({word!r})")


def last_sentence(text_: str) -> str:
    """The paper's rule: cut at <|endoftext|>, split on '. ' and keep the last non-empty piece."""
    text_ = text_.split("<|endoftext|>")[0]
    pieces = [p for p in text_.split(". ") if p.strip()]
    return pieces[-1] if pieces else ""


def classifier_threshold(tokenizer, score: Callable[[list[str]], np.ndarray], threshold: float, *, on_last_sentence: bool = True,
                         prefix: str = "", name: str = "classifier") -> Constraint:
    """b(y) = score(text) > threshold, with `score(texts) -> float array` (e.g. a sentiment classifier).

    With `on_last_sentence`, the score is taken on the last sentence of prefix + continuation, as in the
    paper's sentiment-reversal task.
    """

    def test(texts):
        inputs = [last_sentence(t) for t in texts] if on_last_sentence else texts
        s = np.asarray(score(inputs), np.float64)
        if s.shape != (len(texts),):
            raise TypeError(f"score must return one float per text, got shape {s.shape} for {len(texts)} texts")
        return s > threshold

    return text(tokenizer, test, f"{name}>{threshold}", prefix)


def vader_positive(texts: list[str]) -> np.ndarray:
    """VADER compound sentiment in [-1, 1] (an offline, lexicon-based scorer shipped with vaderSentiment)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = _vader_cache.setdefault("analyzer", SentimentIntensityAnalyzer())
    return np.asarray([analyzer.polarity_scores(t)["compound"] for t in texts], np.float64)


_vader_cache: dict = {}


# ---- constraint specs: a small grammar for command lines and configs ----

SPEC_KINDS = ("keyword", "regex", "sentiment")
_OPERATORS = "&|~()"
_QUOTES = "'\""


class SpecError(ValueError):
    """A constraint spec that does not parse; the message says where and how to write it."""


class SpecAtom(NamedTuple):
    """One `KIND:ARG` of a spec (ARG unquoted)."""

    kind: str
    arg: str


class SpecOp(NamedTuple):
    """`op` is "&", "|" (two or more operands, left to right) or "~" (one operand)."""

    op: str
    operands: tuple


SPEC_HELP = ("KIND:ARG with KIND in keyword, regex, sentiment, combined with & (and), | (or), ~ (not) and "
             "parentheses; quote an ARG that holds spaces, quotes or any of & | ~ ( ), e.g. regex:'a|b'")


def quote_spec_arg(arg: str) -> str:
    r"""`arg` in single quotes, with `\` and `'` escaped: parses back to `arg` (see `parse_spec`)."""
    return "'" + arg.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _spec_tokens(spec: str) -> list[tuple[str, object, int]]:
    """-> [(type, value, position)] with type "op" (value: the operator) or "atom" (value: SpecAtom)."""
    out, i, n = [], 0, len(spec)
    while i < n:
        ch = spec[i]
        if ch.isspace():
            i += 1
        elif ch in _OPERATORS:
            out.append(("op", ch, i))
            i += 1
        else:
            start = i
            while i < n and (spec[i].isalnum() or spec[i] == "_"):
                i += 1
            kind = spec[start:i]
            if not kind or i >= n or spec[i] != ":":
                raise SpecError(f"constraint spec {spec!r}: expected KIND:ARG at position {start} "
                                f"({spec[start:start + 20]!r}); write {SPEC_HELP}")
            if kind not in SPEC_KINDS:
                raise SpecError(f"constraint spec {spec!r}: unknown kind {kind!r}; use one of {', '.join(SPEC_KINDS)}")
            i += 1
            if i < n and spec[i] in _QUOTES:
                quote, i, chars = spec[i], i + 1, []
                while i < n and spec[i] != quote:
                    if spec[i] == "\\" and i + 1 < n and spec[i + 1] in (quote, "\\"):
                        i += 1
                    chars.append(spec[i])
                    i += 1
                if i >= n:
                    raise SpecError(f"constraint spec {spec!r}: the quote {quote} opened at position {start + len(kind) + 1} "
                                    f"is never closed; end the argument with {quote}")
                i += 1
                arg = "".join(chars)
            else:
                arg_start = i
                while i < n and not spec[i].isspace() and spec[i] not in _OPERATORS + _QUOTES:
                    i += 1
                arg = spec[arg_start:i]
                if i < n and spec[i] in "&|~(" + _QUOTES:
                    one = f"{kind}:{quote_spec_arg(spec[arg_start:])}"
                    two = f"{kind}:{arg} {spec[i]} {spec[i + 1:].lstrip()}" if spec[i] in "&|" and arg else None
                    fix = f"write {two!r} for two constraints or {one!r} for one argument" if two else f"quote the argument: {one!r}"
                    raise SpecError(f"constraint spec {spec!r}: ambiguous {spec[i]!r} right after {kind}:{arg} "
                                    f"(position {i}); {fix}")
            if not arg:
                raise SpecError(f"constraint spec {spec!r}: {kind}: has an empty argument at position {start}; "
                                f"write {kind}:ARG (quote an ARG that holds spaces or any of & | ~ ( ))")
            if i < n and not spec[i].isspace() and spec[i] != ")" and spec[i] not in "&|":
                raise SpecError(f"constraint spec {spec!r}: unexpected {spec[i]!r} after {kind}:{quote_spec_arg(arg)} "
                                f"(position {i}); separate constraints with & or |")
            out.append(("atom", SpecAtom(kind, arg), start))
    return out


def parse_spec(spec: str):
    r"""Parse a constraint spec into a tree of `SpecAtom` / `SpecOp` (no tokenizer needed; raises `SpecError`).

    Grammar (`~` binds tightest, then `&`, then `|`; operators are left-associative):

        spec  := or
        or    := and ("|" and)*
        and   := unary ("&" unary)*
        unary := "~" unary | "(" or ")" | KIND ":" ARG
        KIND  := keyword | regex | sentiment
        ARG   := a run of characters other than spaces, quotes and & | ~ ( )
               | '...' or "..." (inside, \' or \" is the quote and \\ a backslash; any other \ stays)

    An unquoted ARG directly followed by `&`, `|`, `~`, `(` or a quote (as in `keyword:love&keyword:the`)
    is an error, not a guess: write `keyword:love & keyword:the` for two constraints or
    `keyword:'love&keyword:the'` for one.
    """
    if not isinstance(spec, str):
        raise SpecError(f"constraint spec must be a string, got {type(spec).__name__}")
    tokens = _spec_tokens(spec)
    if not tokens:
        raise SpecError(f"constraint spec {spec!r} is empty; write {SPEC_HELP}")
    pos = 0

    def where() -> str:
        return f"position {tokens[pos][2]}" if pos < len(tokens) else "the end"

    def expect_operand():
        nonlocal pos
        if pos >= len(tokens) or (tokens[pos][0] == "op" and tokens[pos][1] in "&|)"):
            got = "the end" if pos >= len(tokens) else f"{tokens[pos][1]!r} at {where()}"
            raise SpecError(f"constraint spec {spec!r}: expected a constraint (KIND:ARG, ~ or '(') but found {got}")

    def binary(op: str, operand):
        nonlocal pos
        parts = [operand()]
        while pos < len(tokens) and tokens[pos][:2] == ("op", op):
            pos += 1
            parts.append(operand())
        return parts[0] if len(parts) == 1 else SpecOp(op, tuple(parts))

    def unary():
        nonlocal pos
        expect_operand()
        typ, value, at = tokens[pos]
        pos += 1
        if typ == "atom":
            return value
        if value == "~":
            return SpecOp("~", (unary(),))
        inner = either()
        if pos >= len(tokens) or tokens[pos][:2] != ("op", ")"):
            raise SpecError(f"constraint spec {spec!r}: the '(' at position {at} is never closed; add ')'")
        pos += 1
        return inner

    def either():
        return binary("|", lambda: binary("&", unary))

    tree = either()
    if pos < len(tokens):
        typ, value, _ = tokens[pos]
        got = repr(value) if typ == "op" else f"{value.kind}:{quote_spec_arg(value.arg)}"
        raise SpecError(f"constraint spec {spec!r}: unexpected {got} at {where()}; join constraints with & or |, "
                        f"and match each ')' with a '('")
    _check_atoms(tree, spec)
    return tree


def _check_atoms(tree, spec: str) -> None:
    if isinstance(tree, SpecOp):
        for t in tree.operands:
            _check_atoms(t, spec)
        return
    if tree.kind == "keyword" and not tree.arg.strip():
        raise SpecError(f"constraint spec {spec!r}: keyword:{quote_spec_arg(tree.arg)} has no word; give a non-empty word")
    if tree.kind == "regex":
        try:
            re.compile(tree.arg)
        except re.error as e:
            raise SpecError(f"constraint spec {spec!r}: regex {tree.arg!r} does not compile ({e}); fix the pattern "
                            f"(quote it if it holds spaces or any of & | ~ ( ))") from None
    if tree.kind == "sentiment":
        try:
            threshold = float(tree.arg)
        except ValueError:
            threshold = math.nan
        if not -1 <= threshold <= 1:
            raise SpecError(f"constraint spec {spec!r}: sentiment:{tree.arg} needs a threshold in [-1, 1] "
                            f"(VADER compound score), e.g. sentiment:0.5")


def spec_to_str(tree) -> str:
    """A spec string that parses back to `tree` (every argument quoted, every operation parenthesised)."""
    if isinstance(tree, SpecAtom):
        return f"{tree.kind}:{quote_spec_arg(tree.arg)}"
    if tree.op == "~":
        return "~" + spec_to_str(tree.operands[0])
    return "(" + f" {tree.op} ".join(spec_to_str(t) for t in tree.operands) + ")"


def from_spec(spec: str, tokenizer) -> Constraint:
    """A text constraint from a spec (grammar in `parse_spec`), for command lines and configs.

    `keyword:WORD` (a whole word, see `keyword_pattern`), `regex:PATTERN` (`re.search` on the decoded text),
    `sentiment:THRESHOLD` (VADER compound score of the last sentence > THRESHOLD, in [-1, 1]), combined with
    `&`, `|`, `~` and parentheses, e.g. `keyword:love & ~(regex:'ha(te|ted)' | sentiment:-0.5)`.
    """

    def build(tree) -> Constraint:
        if isinstance(tree, SpecOp):
            parts = [build(t) for t in tree.operands]
            return ~parts[0] if tree.op == "~" else (all_of if tree.op == "&" else any_of)(*parts)
        if tree.kind == "keyword":
            return keyword(tokenizer, tree.arg)
        if tree.kind == "regex":
            return text_regex(tokenizer, tree.arg)
        return classifier_threshold(tokenizer, vader_positive, float(tree.arg), name="vader")

    return build(parse_spec(spec))
