"""Binary constraints b(y): vectorized predicates over token sequences, combinable with &, |, ~.

A constraint is called as `b(tokens_BT, lengths_B) -> bool_B`, where `tokens_BT` are the generated
tokens (padding after `lengths_B`). Token-level constraints are pure jnp (jit-able, usable by masking
and ASAp on prefixes); text-level ones decode on the host. Every result is checked: a predicate that
returns the wrong shape or dtype raises a `TypeError` naming the constraint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

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


def keyword(tokenizer, word: str, case_sensitive: bool = True) -> Constraint:
    """The word occurs with word boundaries on both sides (the paper's `\\bamazing\\b`)."""
    if not word or not word.strip():
        raise ValueError("word must be a non-empty string")
    c = text_regex(tokenizer, rf"\b{re.escape(word)}\b", 0 if case_sensitive else re.IGNORECASE)
    c.name = f"keyword({word!r})"
    return c


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


def from_spec(spec: str, tokenizer) -> Constraint:
    """A text constraint from a short spec, for command lines and configs.

    `keyword:WORD` (word boundaries), `regex:PATTERN`, `sentiment:THRESHOLD` (VADER compound score of the
    last sentence > THRESHOLD); join several with ` & `.
    """
    if " & " in spec:
        return all_of(*(from_spec(part, tokenizer) for part in spec.split(" & ")))
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError(f"constraint spec {spec!r} must look like keyword:WORD, regex:PATTERN or sentiment:THRESHOLD")
    if kind == "keyword":
        return keyword(tokenizer, arg)
    if kind == "regex":
        return text_regex(tokenizer, arg)
    if kind == "sentiment":
        return classifier_threshold(tokenizer, vader_positive, float(arg), name="vader")
    raise ValueError(f"unknown constraint kind {kind!r} in {spec!r}: use keyword, regex or sentiment")
