"""Grammars (Lark CFG, JSON schema, regex) through llguidance, bound to a tokenizer at the byte level.

    g = Grammar.lark('start: expr\\nexpr: NUM | "(" expr "+" expr ")"\\nNUM: /[0-9]/', tokenizer)
    b = g.constraint()                        # b(y) for GUARD and every estimator
    batch = g.batch(64)                       # 64 matchers: next-token bitmasks for masked decoding
    allowed = g.allowed_ids(prefix_tokens)    # ASAp's allowed set after a prefix

A token sequence y (generated tokens, EOS last when it ended) satisfies b iff the bytes of its tokens before
EOS, concatenated, are a string of the language. Tokens are bytes, not characters: a byte-level BPE piece that
holds half of "é" is the byte 0xC3, and the two pieces of "é" together spell the character.

The next-token mask after a prefix u holds every token v such that uv is still a prefix of some string of the
language (EOS where u itself is in it), for any tokenization: llguidance's forcing of canonical tokens is
switched off (`no_forcing`), so masks never drop a non-canonical path that b accepts. Masks are not
length-aware: masked decoding can run out of tokens inside a string, and that sample fails b.

Regexes are llguidance's (Rust `regex` syntax, full match); JSON schemas follow llguidance's JSON support
(flexible whitespace by default; `json_options={"whitespace_flexible": False}` gives compact JSON only).
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Mapping, Sequence

import numpy as np

from guard_jax.constraints import Constraint

_NO_FORCING = '%llguidance {"no_forcing": true}\n'


_BOUND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {(vocab_size, eos_id, slices): LLTokenizer}


def llg_tokenizer(tokenizer, vocab_size: int | None = None, eos_id: int | None = None, slices: Sequence[str] | None = None):
    """An llguidance `LLTokenizer` for a Hugging Face fast tokenizer (transformers) or a `tokenizers.Tokenizer`.

    `vocab_size`: the model's output size (default: the tokenizer's); ids the tokenizer does not have are never
    allowed. `eos_id`: the token that ends a sequence (default: the tokenizer's EOS). `slices`: llguidance's
    mask-precomputation slices (None: its general ones; [] binds about twice as fast at V = 256,000 and
    computes masks by walking the token trie alone). Binding walks the whole vocabulary (about 0.5 s at
    V = 8,192, seconds at V = 256,000), so the result is cached per tokenizer object (and these arguments):
    every grammar built on the same tokenizer shares one binding.
    """
    import llguidance

    if isinstance(tokenizer, llguidance.LLTokenizer):
        return tokenizer
    key = (vocab_size, eos_id, None if slices is None else tuple(slices))
    try:
        cached = _BOUND.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: bind without caching
        cached = {}
    if key not in cached:
        cached[key] = _bind(tokenizer, vocab_size, eos_id, None if slices is None else list(slices))
    return cached[key]


def _bind(tokenizer, vocab_size, eos_id, slices):
    import llguidance
    import llguidance.hf

    try:
        if hasattr(tokenizer, "backend_tokenizer"):
            listed = _hf_token_list(tokenizer)
            if listed is not None:  # the same bytes as llguidance's own reading of the tokenizer, faster to bind
                tokens, special = listed
                if vocab_size is not None and vocab_size < len(tokens):
                    raise ValueError(f"vocab size too small; {vocab_size} vs {len(tokens)}")
                for i in range(len(tokens), vocab_size or 0):  # ids past the tokenizer's: special, as llguidance names them
                    tokens.append(f"<[{i}]>".encode())
                    special.append(i)
                return llguidance.LLTokenizer(_ByteList(tokenizer, tokens, special, eos_id), slices=slices)
            return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_id, slices=slices)
        if hasattr(tokenizer, "to_str"):
            if eos_id is None:
                raise ValueError("a raw tokenizers.Tokenizer has no EOS: pass eos_id=")
            return llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos_id, slices=slices)
    except ValueError as e:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} cannot be bound at the byte level by llguidance: {e}; "
                         "use a byte-level BPE or SentencePiece fast tokenizer") from e
    raise TypeError(f"tokenizer must be a Hugging Face fast tokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}")


def _hf_token_list(tokenizer) -> tuple[list[bytes], list[int]] | None:
    """(the bytes of every token id, the special ids) of a byte-level fast tokenizer (GPT-2's ByteLevel decoder),
    read as llguidance reads it (its `toktrie_hf`): each character of a token maps back to its byte; an added
    token is its text, special when marked so or written <...>. None for another decoder (e.g. SentencePiece's
    byte fallback, whose tokenizer adds a prefix space that llguidance's tokenization must not see): then
    llguidance reads the tokenizer itself."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> printable character

    backend = tokenizer.backend_tokenizer
    if backend.decoder is None or json.loads(backend.decoder.__getstate__()).get("type") != "ByteLevel":
        return None
    # each alphabet character -> the character of its byte (latin-1), every other character below 256 -> one that
    # latin-1 cannot encode, so a token with a character outside the alphabet fails to encode
    table = {i: 0xFFFF for i in range(256)} | {ord(c): b for b, c in bytes_to_unicode().items()}
    vocab = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    tokens = [b""] * max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    for text, i in vocab.items():
        if i not in added:
            try:
                tokens[i] = text.translate(table).encode("latin-1")
            except UnicodeEncodeError:  # a character outside the byte-level alphabet: llguidance leaves the token out too
                continue
    special = []
    for i, info in added.items():
        tokens[i] = info.content.encode("utf-8")
        if info.special or (info.content.startswith("<") and info.content.endswith(">")):  # llguidance's rule
            special.append(int(i))
    return tokens, special


class _ByteList:
    """A tokenizer as llguidance's `TokenizerWrapper` protocol wants it: the bytes of every token, the special
    ids, EOS, and text -> ids through the Hugging Face tokenizer."""

    def __init__(self, tokenizer, tokens: list[bytes], special: list[int], eos_id: int | None):
        self.tokens, self.special_token_ids = tokens, special
        self.eos_token_id = tokenizer.eos_token_id if eos_id is None else int(eos_id)
        self.bos_token_id = tokenizer.bos_token_id
        self.is_tokenizer_wrapper = True
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def token_bytes(tokenizer, vocab_size: int | None = None) -> dict[int, bytes]:
    """id -> the bytes the token spells, for every non-special token id below `vocab_size` (byte-level: a piece
    of a multi-byte character is its raw bytes, e.g. b"\\xc3"). Accepts what `llg_tokenizer` accepts."""
    lt = llg_tokenizer(tokenizer, vocab_size)
    V = lt.vocab_size if vocab_size is None else min(int(vocab_size), lt.vocab_size)
    out = {}
    for i in range(V):
        if not lt.is_special_token(i):
            piece = lt.decode_bytes([i])
            if piece:
                out[i] = piece
    return out


def _unpack_bits(bitmask_BW: np.ndarray, vocab_size: int) -> np.ndarray:
    """int32 bitmask [B, ceil(V/32)] (bit v % 32 of word v // 32) -> bool [B, V] (numpy)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask_BW).view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :vocab_size].astype(bool)


@dataclasses.dataclass(frozen=True, eq=False)
class Grammar:
    """A language bound to a tokenizer. Build it with `Grammar.lark`, `Grammar.json_schema` or `Grammar.regex`.

    `program`: the grammar as llguidance Lark (what the matcher runs); `kind` and `source`: what the user gave;
    `vocab_size`: the model's output size (masks have that many entries); `eos_id`: the token that ends a
    sequence (allowed exactly where the text so far is in the language).
    """

    program: str
    kind: str
    source: str
    tokenizer: object  # llguidance.LLTokenizer
    vocab_size: int
    eos_id: int
    _start: object = dataclasses.field(default=None, repr=False)  # a compiled matcher at the start, copied per use

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def _build(cls, program: str, kind: str, source: str, tokenizer, vocab_size, eos_id) -> "Grammar":
        import llguidance

        lt = llg_tokenizer(tokenizer, vocab_size, eos_id)
        program = _NO_FORCING + program
        start = llguidance.LLMatcher(lt, llguidance.grammar_from("lark", program), log_level=0)
        if start.is_error():
            raise ValueError(f"the {kind} {source!r} is not a grammar llguidance accepts: {start.get_error()}")
        return cls(program, kind, source, lt, int(lt.vocab_size), int(lt.eos_token), start)

    @classmethod
    def lark(cls, text: str, tokenizer, *, vocab_size: int | None = None, eos_id: int | None = None) -> "Grammar":
        """A context-free grammar in llguidance's Lark syntax (rule `start` is the language)."""
        return cls._build(text, "lark", text, tokenizer, vocab_size, eos_id)

    @classmethod
    def regex(cls, pattern: str, tokenizer, *, vocab_size: int | None = None, eos_id: int | None = None) -> "Grammar":
        """The strings that fully match `pattern` (Rust `regex` syntax)."""
        import llguidance

        return cls._build(f"start: /{llguidance.regex_to_lark(pattern)}/", "regex", pattern, tokenizer, vocab_size, eos_id)

    @classmethod
    def json_schema(cls, schema: Mapping | str, tokenizer, *, vocab_size: int | None = None, eos_id: int | None = None,
                    json_options: Mapping | None = None) -> "Grammar":
        """JSON values that validate against `schema` (a dict or its JSON text). `json_options` go to llguidance
        as the schema's "x-guidance" (e.g. {"whitespace_flexible": True}, {"key_separator": ": "})."""
        data = json.loads(schema) if isinstance(schema, str) else dict(schema)
        if json_options:
            data = {**data, "x-guidance": {**data.get("x-guidance", {}), **dict(json_options)}}
        text = json.dumps(data)
        return cls._build(f"start: %json {text}", "json_schema", text, tokenizer, vocab_size, eos_id)

    # --- matchers -----------------------------------------------------------------------------------------
    def matcher(self):
        """A fresh llguidance `LLMatcher` at the start of the language (a copy of the compiled one: microseconds)."""
        return self._start.deep_copy()

    def batch(self, batch_size: int) -> "MatcherBatch":
        """`batch_size` fresh matchers whose masks are computed together (see `MatcherBatch`)."""
        return MatcherBatch(self, batch_size)

    @property
    def mask_words(self) -> int:
        """Width W of an int32 bitmask row: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32

    def allowed_ids(self, prefix: Sequence[int]) -> np.ndarray:
        """The sorted token ids allowed after the generated tokens `prefix` (empty when the prefix is off the
        language or has ended with EOS)."""
        m = self.matcher()
        if not m.consume_tokens([int(t) for t in prefix]) or m.is_error():
            return np.zeros(0, np.int64)
        return np.flatnonzero(mask_of(m, self.vocab_size))

    # --- b(y) ---------------------------------------------------------------------------------------------
    def accepts(self, tokens_BT, lengths_B) -> np.ndarray:
        """b(y) for each row: the bytes of its first `lengths_B` tokens before EOS are in the language -> bool_B."""
        tokens_BT, lengths_B = np.asarray(tokens_BT), np.asarray(lengths_B)
        seen: dict[tuple[int, ...], bool] = {}
        out = np.zeros(len(tokens_BT), bool)
        for i, (row, n) in enumerate(zip(tokens_BT, lengths_B)):
            ids = tuple(row[: int(n)].tolist())
            if self.eos_id in ids:
                ids = ids[: ids.index(self.eos_id)]
            if ids not in seen:
                m = self.matcher()
                seen[ids] = (all(0 <= t < self.vocab_size for t in ids) and m.consume_tokens(list(ids))
                             and not m.is_error() and m.is_accepting())
            out[i] = seen[ids]
        return out

    def constraint(self, name: str | None = None) -> Constraint:
        """b as a `Constraint` (host-side), usable by the GUARD sampler and every estimator."""
        return Constraint(self.accepts, name or f"{self.kind}({self.source[:40]!r})")

    # --- exact masks on a toy grid --------------------------------------------------------------------------
    def allowed_levels(self, space) -> list[np.ndarray]:
        """The masks on every prefix of a toy grid (`guard_jax.exact.SequenceSpace`): element t is bool [V^t, V],
        row = the base-V code of the prefix (most significant first), as `TabularARM` indexes prefixes.

        A prefix that already holds EOS allows every token (the grid's own padding rule then keeps only pad).
        """
        V, T = space.vocab_size, space.max_len
        if V != self.vocab_size:
            raise ValueError(f"space.vocab_size={V} must equal the grammar's vocab_size={self.vocab_size}")
        levels = [np.ones((V**t, V), bool) for t in range(T)]
        frontier = [((), self.matcher())]
        for t in range(T):
            nxt = []
            for prefix, m in frontier:
                code = int(np.dot(prefix, V ** np.arange(t - 1, -1, -1))) if prefix else 0
                ok = mask_of(m, V) if not m.is_error() else np.zeros(V, bool)
                levels[t][code] = ok
                if t + 1 < T:
                    for v in np.flatnonzero(ok):
                        if v == self.eos_id:
                            continue
                        child = m.deep_copy()
                        child.consume_token(int(v))
                        nxt.append(((*prefix, int(v)), child))
            frontier = nxt
        return levels

    def __repr__(self) -> str:
        return f"Grammar({self.kind}, {self.source[:60]!r}, V={self.vocab_size}, eos={self.eos_id})"


def mask_of(matcher, vocab_size: int) -> np.ndarray:
    """bool [V]: an llguidance matcher's next-token mask."""
    words = np.frombuffer(matcher.compute_bitmask(), np.int32)
    return _unpack_bits(words[None], vocab_size)[0]


class MatcherBatch:
    """One llguidance matcher per row; masks for all live rows at once (llguidance's thread pool).

    `fill(bitmask_BW)` writes the next-token masks of the rows still running (finished rows: all ones, so a
    jitted step never sees an empty row); `consume(tokens_B)` advances the running rows by their tokens and
    retires rows that emitted EOS. Rows with the same tokens so far have the same mask, so `fill` computes
    one mask per distinct prefix (all 128 rows of a batch share the first; a JSON schema's forced opening
    keeps them few for several steps) and copies it.
    """

    def __init__(self, grammar: Grammar, batch_size: int):
        import llguidance

        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.grammar = grammar
        self.matchers = [grammar.matcher() for _ in range(batch_size)]
        self.running_B = np.ones(batch_size, bool)
        self._executor = _executor(llguidance)
        self._prefix_B = np.zeros(batch_size, np.int64)  # an id of each row's tokens so far (equal ids: equal prefixes)
        self._child: dict[tuple[int, int], int] = {}

    def fill(self, bitmask_BW: np.ndarray) -> np.ndarray:
        """Write the masks into `bitmask_BW` (int32, C-contiguous, [B, grammar.mask_words]) -> bitmask_BW."""
        import llguidance.numpy as lnp

        bitmask_BW.fill(-1)
        rows = np.flatnonzero(self.running_B)
        if len(rows):
            _, first, inverse = np.unique(self._prefix_B[rows], return_index=True, return_inverse=True)
            reps = rows[first]  # one row per distinct prefix
            lnp.fill_next_token_bitmask_par(self._executor, [(self.matchers[i], int(i)) for i in reps], bitmask_BW)
            empty = reps[~bitmask_BW[reps].any(axis=1)]
            if len(empty):
                raise RuntimeError(f"grammar matcher for row {empty[0]} allows no token: {self.matchers[empty[0]].get_error()}")
            bitmask_BW[rows] = bitmask_BW[reps[inverse.reshape(-1)]]
        return bitmask_BW

    def consume(self, tokens_B) -> None:
        """Advance every running row by its token; rows that took EOS stop running."""
        import llguidance.numpy as lnp

        tokens_B = np.asarray(tokens_B)
        rows = np.flatnonzero(self.running_B)
        if len(rows):
            lnp.consume_token_par(self._executor, [(self.matchers[i], int(tokens_B[i])) for i in rows])
            for i in rows:
                self._prefix_B[i] = self._child.setdefault((int(self._prefix_B[i]), int(tokens_B[i])), len(self._child) + 1)
        self.running_B[rows[tokens_B[rows] == self.grammar.eos_id]] = False

    def accepting(self) -> np.ndarray:
        """bool_B: the text of each row so far is in the language."""
        return np.asarray([not m.is_error() and m.is_accepting() for m in self.matchers])


_EXECUTORS: dict = {}


def _executor(llguidance):
    """One shared llguidance thread pool per process."""
    if "pool" not in _EXECUTORS:
        _EXECUTORS["pool"] = llguidance.LLExecutor()
    return _EXECUTORS["pool"]
