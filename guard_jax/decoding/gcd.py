"""Masked (grammar/locally constrained) decoding: sample only tokens that can still lead to b = 1.

A mask provider is a `TokenAutomaton`: a dense deterministic automaton over token ids, held as device
arrays so the whole decode stays under `jax.jit` (its state is carried in the scan):

- `next_state_SV[s, v]`: the state after token v in state s, or -1 when v is forbidden there;
- `steps_to_accept_S[s]`: the fewest tokens that take s to an accepting state (0 when s accepts;
  `UNREACHABLE` when none does);
- `accepting_S[s]`: b holds for a sequence that ends in state s.

Token v is allowed in state s with `r` tokens left after it iff `next_state_SV[s, v] >= 0` and
`steps_to_accept_S[next] <= r`, so masks are length-aware: every masked sample of `max_new_tokens` tokens
satisfies b. Two builders:

- `reachability_automaton`: toy ARMs, exact reachability from the enumerated b (the prefix tree of V^T);
- `regex_automaton`: a small regex over a real tokenizer's vocabulary (interegular's DFA walked by each
  token's bytes); `guard_jax.grammars.Grammar` covers CFGs, JSON schemas and large regexes: llguidance's host
  masks, or `dense_masks`'s on-device table where the grammar has one (a regex, a regular JSON schema, a CFG
  unrolled to a bounded depth).

Masking guarantees b but samples q(y) = prod_t a(y_t | u) 1[allowed] / a(allowed | u), not
g(y) = a(y) b(y) / Z: `exact_masked_log_prob` gives that law on the grid.
"""

from __future__ import annotations

import codecs
import functools
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.constraints import Constraint
from guard_jax.exact import SequenceSpace, prefix_log_marginals
from guard_jax.grammars import Grammar
from guard_jax.json_regex import schema_regex
from guard_jax.lark_fsm import lark_fsm
from guard_jax.models.base import ARM, Params
from guard_jax.sampling import categorical, check_segment_ends, scan_segments, uniforms, unpack_bitmask

UNREACHABLE = 2**30


class MaskProvider(Protocol):
    """What the masked sampler needs: a pytree with these three pure methods."""

    def init_state(self, batch_size: int) -> jax.Array: ...

    def allowed(self, state_B: jax.Array, remaining: jax.Array) -> jax.Array: ...

    def advance(self, state_B: jax.Array, token_B: jax.Array) -> jax.Array: ...


class TokenAutomaton(NamedTuple):
    """A dense token automaton (a pytree of arrays; pass it to jitted functions as an argument)."""

    next_state_SV: jax.Array  # int32 [S, V], -1 = forbidden
    steps_to_accept_S: jax.Array  # int32 [S]
    accepting_S: jax.Array  # bool [S]
    initial_state: jax.Array  # int32 []

    @property
    def num_states(self) -> int:
        return self.next_state_SV.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.next_state_SV.shape[1]

    def init_state(self, batch_size: int) -> jax.Array:
        """-> state_B (int32), every row at the initial state."""
        return jnp.full((batch_size,), self.initial_state, jnp.int32)

    def allowed(self, state_B: jax.Array, remaining) -> jax.Array:
        """allowed_BV: tokens that keep b reachable with `remaining` tokens left after this one."""
        next_BV = self.next_state_SV[state_B]
        steps_BV = self.steps_to_accept_S[jnp.maximum(next_BV, 0)]
        return (next_BV >= 0) & (steps_BV <= remaining)

    def advance(self, state_B: jax.Array, token_B: jax.Array) -> jax.Array:
        """-> the next state_B (-1 where token_B was forbidden)."""
        return jnp.take_along_axis(self.next_state_SV[state_B], token_B[:, None].astype(jnp.int32), axis=1)[:, 0]

    def accepts(self, tokens_BT, lengths_B) -> jax.Array:
        """b(y) as the automaton defines it: the first `lengths_B` tokens are all allowed transitions and end
        in an accepting state -> bool_B."""
        tokens_BT, lengths_B = jnp.asarray(tokens_BT, jnp.int32), jnp.asarray(lengths_B)

        def step(state_B, xs):
            t, token_B = xs
            inside_B = t < lengths_B
            nxt_B = self.advance(jnp.maximum(state_B, 0), token_B)
            return jnp.where(inside_B & (state_B >= 0), nxt_B, state_B), None

        T = tokens_BT.shape[1]
        state_B, _ = jax.lax.scan(step, self.init_state(tokens_BT.shape[0]), (jnp.arange(T), tokens_BT.T))
        return (state_B >= 0) & self.accepting_S[jnp.maximum(state_B, 0)]

    def constraint(self, name: str = "automaton") -> Constraint:
        """The automaton's b as a `Constraint` (jit-able; usable by GUARD and the estimators)."""
        return Constraint(lambda t, n: self.accepts(t, n), name)


def _steps_to_accept(next_state_SV: np.ndarray, accepting_S: np.ndarray) -> np.ndarray:
    """Breadth-first search backwards from the accepting states -> steps_S (UNREACHABLE where none)."""
    S, V = next_state_SV.shape
    src, tok = np.nonzero(next_state_SV >= 0)
    dst = next_state_SV[src, tok]
    order = np.argsort(dst, kind="stable")
    src_sorted, starts = src[order], np.searchsorted(dst[order], np.arange(S + 1))
    steps = np.full(S, UNREACHABLE, np.int64)
    queue = deque(np.nonzero(accepting_S)[0].tolist())
    steps[accepting_S] = 0
    while queue:
        s = queue.popleft()
        for p in src_sorted[starts[s] : starts[s + 1]]:
            if steps[p] == UNREACHABLE:
                steps[p] = steps[s] + 1
                queue.append(p)
    return steps.astype(np.int32)


def _automaton(next_state_SV: np.ndarray, accepting_S: np.ndarray, initial: int) -> TokenAutomaton:
    next_state_SV = np.asarray(next_state_SV, np.int32)
    accepting_S = np.asarray(accepting_S, bool)
    return TokenAutomaton(
        jnp.asarray(next_state_SV),
        jnp.asarray(_steps_to_accept(next_state_SV, accepting_S)),
        jnp.asarray(accepting_S),
        jnp.asarray(initial, jnp.int32),
    )


# ---- toy ARMs: exact reachability over the enumerated grid ----


def _prefix_any(space: SequenceSpace, b) -> list[np.ndarray]:
    """reach[t][u] = some grid point with prefix u (of length t) satisfies b; element t has shape [V^t]."""
    V, T = space.vocab_size, space.max_len
    levels = [np.asarray(b, bool).reshape((V,) * T)]
    for _ in range(T):
        levels.append(levels[-1].any(axis=-1))
    return [levels[T - t].reshape(V**t) for t in range(T + 1)]


def _level_offsets(V: int, T: int) -> list[int]:
    return [(V**t - 1) // (V - 1) for t in range(T + 2)]


def reachability_automaton(space: SequenceSpace, b) -> TokenAutomaton:
    """The exact mask for a toy space: token v is allowed after prefix u iff some valid completion of uv
    satisfies b. `b` is the bool grid of `guard_jax.exact.exact_constraint`.

    States are the prefixes of length 0..T in level order (the prefix of length t with base-V code c is
    state (V^t - 1)/(V - 1) + c, as in `TabularARM`): S = (V^(T+1) - 1)/(V - 1) states.
    """
    b = np.asarray(b, bool)
    if b.shape != (space.size,):
        raise ValueError(f"b must be the bool grid of {space.size} points (exact_constraint), got shape {b.shape}")
    if not b.any():
        raise ValueError("b is never satisfied on this space: there is nothing to mask toward (Z = 0)")
    V, T = space.vocab_size, space.max_len
    reach = _prefix_any(space, b)
    offset = _level_offsets(V, T)
    next_state = np.full((offset[T + 1], V), -1, np.int64)
    accepting = np.zeros(offset[T + 1], bool)
    for t in range(T):
        child = np.arange(V ** (t + 1))
        next_state[offset[t] : offset[t + 1]] = np.where(reach[t + 1], offset[t + 1] + child, -1).reshape(V**t, V)
    accepting[offset[T] :] = reach[T]
    if space.eos_id is not None:  # a sequence that ends with EOS before position T accepts iff its padding does
        for t in range(1, T):
            codes = np.arange(V**t)
            ends = codes % V == space.eos_id
            accepting[offset[t] + codes[ends]] = reach[t][ends]
    return _automaton(next_state, accepting, 0)


# ---- regex over a tokenizer's vocabulary: interegular's DFA, walked by every token's bytes ----


def regex_automaton(pattern: str, tokens: Mapping[int, bytes | str] | Sequence[bytes | str], eos_id: int,
                    vocab_size: int | None = None, invalid_utf8: str = "replace") -> TokenAutomaton:
    """A length-aware mask for `re.fullmatch(pattern, text)`, text = the concatenated bytes of the tokens before
    EOS decoded as UTF-8 with each invalid or unfinished byte sequence read as U+FFFD (what a byte-level
    tokenizer's `decode` returns; `invalid_utf8="replace"`), or with such bytes never allowed
    (`invalid_utf8="reject"`: the text is valid UTF-8, llguidance's byte-level rule).

    `tokens` maps token id -> the bytes it spells (`guard_jax.grammars.token_bytes`; a str is taken as its
    UTF-8 bytes), as a list or a dict, special tokens left out. Tokens are bytes: the two byte-level pieces of
    "é" spell it only together. `eos_id` ends a sequence and is allowed only where the text so far matches;
    `vocab_size` (default: one more than the largest id) is the model's output size: ids absent from `tokens`
    are never allowed.

    The regex is compiled to a character DFA by `interegular`; a state of the token automaton is a DFA state
    with the bytes of an unfinished character (pending bytes whose completions the regex does not name are
    merged into one state per length), and every token's bytes are walked through it for all DFA states at
    once (vectorized), giving [states, vocab_size]. This dense table is for small regexes (its size is
    states x V); `guard_jax.grammars.Grammar.regex` has no such limit. outlines-core's `Index` is not used: it
    drops transitions that loop back through accepting states (its `(ab)*` accepts only "").
    """
    import interegular

    items = dict(enumerate(tokens)) if not isinstance(tokens, Mapping) else dict(tokens)
    items.pop(eos_id, None)
    if not items:
        raise ValueError("tokens must hold at least one non-EOS token")
    items = {int(i): (t.encode("utf-8") if isinstance(t, str) else bytes(t)) for i, t in items.items()}
    V = vocab_size if vocab_size is not None else max(max(items), eos_id) + 1
    if max(max(items), eos_id) >= V:
        raise ValueError(f"vocab_size={V} is smaller than the largest token id {max(max(items), eos_id)}")
    if any(not t for t in items.values()):
        raise ValueError("every non-special token needs its (non-empty) bytes in tokens; leave special tokens out")
    if invalid_utf8 not in ("replace", "reject"):
        raise ValueError(f"invalid_utf8={invalid_utf8!r}: use 'replace' (read as U+FFFD) or 'reject' (valid UTF-8 only)")
    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as e:  # interegular raises several types for unsupported syntax
        raise ValueError(f"pattern {pattern!r} is not a regex interegular can compile to a DFA: {e}") from e
    next_state, accepting, _ = _fsm_table(fsm, items, eos_id, V, strict=invalid_utf8 == "reject")
    return _automaton(next_state, accepting, 0)


def _fsm_table(fsm, items: dict[int, bytes], eos_id: int, V: int, strict: bool):
    """interegular's character DFA walked by every token's bytes -> (next_state [S, V], -1: dead; accepting [S];
    dfa_state [S]: the character DFA's state (the FSM's label) of each automaton state, pending bytes aside);
    state 0 is the initial one."""
    walker = _ByteWalker(fsm, strict=strict)
    S, width = walker.num_states, _MAX_PENDING
    ids = np.fromiter(items, np.int64, len(items))
    data = [items[i] for i in ids]
    pairs: dict[tuple[int, int], int] = {}  # (DFA state, pending id) -> automaton state
    order: list[tuple[int, int]] = []

    def pair_id(s: int, p: int) -> int:
        if (s, p) not in pairs:
            pairs[(s, p)] = len(order)
            order.append((s, p))
        return pairs[(s, p)]

    pair_id(walker.initial, walker.pending_id(b""))
    rows = []
    while len(rows) < len(order):
        s, p = order[len(rows)]
        state_SN, tail_N = walker.walk(p, data)
        nxt_N = state_SN[s]
        live_N = nxt_N < S
        live_N[live_N] = walker.live(nxt_N[live_N], tail_N[live_N])
        uniq, inverse = np.unique(nxt_N[live_N] * width + tail_N[live_N], return_inverse=True)
        row = np.full(V, -1, np.int64)
        if len(uniq):
            row[ids[live_N]] = np.asarray([pair_id(int(c) // width, int(c) % width) for c in uniq], np.int64)[inverse]
        rows.append(row)
    next_state = np.stack(rows)
    accepting = np.asarray([walker.accepting(s, p) for s, p in order], bool)
    next_state[accepting, eos_id] = np.flatnonzero(accepting)  # EOS ends a matching text where it is
    return next_state, accepting, np.asarray([walker.states[s] for s, _ in order], np.int64)


_MAX_PENDING = 4096
_REPLACEMENT = "\ufffd"


def _stand_in(tail: bytes) -> bytes:
    """One pending of `tail`'s class: the bytes that may follow it are the same. One lead byte: the range of its
    first continuation byte (C2-DF, E0, E1-EC and EE-EF, ED, F0, F1-F3, F4); two or more: any continuation."""
    if len(tail) >= 2:
        return (b"\xe1" if _utf8_length(tail[0]) == 3 else b"\xf1") + b"\x80" * (len(tail) - 1)
    lead = tail[0]
    if lead in (0xE0, 0xED, 0xF0, 0xF4):
        return tail
    return {2: b"\xc2", 3: b"\xe1", 4: b"\xf1"}[_utf8_length(lead)]


class _ByteWalker:
    """interegular's character DFA driven by bytes, decoded as UTF-8 with U+FFFD for each invalid or unfinished
    byte sequence (Python's "replace" error handler, the same substitution as a tokenizer's decode), or with
    such bytes dead (`strict`: the text must be valid UTF-8). The pending bytes of an unfinished character are
    part of the state; a pending that no character named by the regex starts with is merged with every other
    such pending of its class (`_stand_in`)."""

    def __init__(self, fsm, strict: bool = False):
        from interegular.fsm import anything_else

        self.states = states = sorted(fsm.states)  # walker index -> the FSM's state label
        sid = {s: k for k, s in enumerate(states)}
        self.num_states = S = len(states)
        self.strict = strict
        K = max(fsm.alphabet.by_transition) + 1
        # row S: dead; column K: a character outside the regex; column K + 1: an invalid byte (strict)
        self.char_next_SK = np.full((S + 1, K + 2), S, np.int64)
        for s, row in fsm.map.items():
            for sym, s2 in row.items():
                self.char_next_SK[sid[s], sym] = sid[s2]
        self.initial, self.finals = sid[fsm.initial], {sid[s] for s in fsm.finals}
        self.explicit = {c: sym for c, sym in fsm.alphabet._symbol_mapping.items() if isinstance(c, str)}
        other = fsm.alphabet._symbol_mapping.get(anything_else)
        self.other = K if other is None else other
        self.invalid = K + 1
        self.prefixes: dict[bytes, set[int]] = {}  # proper prefixes of named multi-byte characters -> their symbols
        for c, sym in self.explicit.items():
            enc = c.encode("utf-8")
            for n in range(1, len(enc)):
                self.prefixes.setdefault(enc[:n], set()).add(sym)
        self._ids: dict = {}
        self._keys: list = []
        self._walks: dict = {}

    def symbol(self, char: str) -> int:
        if self.strict and "\udc80" <= char <= "\udcff":  # surrogateescape's stand-in for an invalid byte
            return self.invalid
        return self.explicit.get(char, self.other)

    def pending_id(self, tail: bytes) -> int:
        """The id of a pending value: b"" (none), the bytes themselves, or ("other", stand-in) merged."""
        key = tail if not tail or tail in self.prefixes else ("other", _stand_in(tail))
        if key not in self._ids:
            if len(self._keys) >= _MAX_PENDING:
                raise ValueError(f"the regex over this vocabulary needs over {_MAX_PENDING} pending-byte states; "
                                 "use guard_jax.grammars.Grammar.regex")
            self._ids[key] = len(self._keys)
            self._keys.append(key)
        return self._ids[key]

    def _split(self, pending_id: int, data: bytes) -> tuple[list[int], int]:
        """pending + data -> (the symbols of the characters completed, the pending id after)."""
        key = self._keys[pending_id]
        merged = isinstance(key, tuple)
        errors = "surrogateescape" if self.strict else "replace"
        decoder = codecs.getincrementaldecoder("utf-8")(errors)
        decoder.setstate((key[1] if merged else key, 0))
        chars = decoder.decode(data)
        tail = decoder.getstate()[0]
        if len(tail) >= 2 and tail[0] == 0xED and tail[1] >= 0xA0:  # a surrogate's bytes, kept pending by Python:
            chars, tail = chars + tail.decode("utf-8", errors), b""  # each byte is invalid whatever follows
        syms = [self.symbol(c) for c in chars]
        if merged and chars and syms[0] != self.invalid and chars[0] != _REPLACEMENT:
            syms[0] = self.other  # the merged pending's character: one the regex does not name
        return syms, self.pending_id(tail)

    def _walk_tokens(self, pending_id: int, data: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """`data` from every DFA state with this pending value -> (state_SN, S = dead; tail_N: pending ids)."""
        split = [self._split(pending_id, d) for d in data]
        tail_N = np.asarray([r[1] for r in split], np.int64)
        L = max([len(r[0]) for r in split] + [1])
        sym_NL = np.full((len(data), L), -1, np.int64)
        for n, (syms, _) in enumerate(split):
            sym_NL[n, : len(syms)] = syms
        S = self.num_states
        state_SN = np.broadcast_to(np.arange(S)[:, None], (S, len(data))).copy()
        for k in range(L):
            sym_N = sym_NL[:, k]
            state_SN = np.where(sym_N[None] >= 0, self.char_next_SK[state_SN, np.maximum(sym_N, 0)[None]], state_SN)
        return state_SN, tail_N

    def walk(self, pending_id: int, data: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Every token from every DFA state with this pending value -> (state_SN: the DFA state after, S = dead;
        tail_N: the pending id after). With pending bytes, a token that starts a new character first closes
        them as one U+FFFD (strict: is dead) and then reads as from no pending: only tokens that start with a
        continuation byte are walked again."""
        if pending_id in self._walks:
            return self._walks[pending_id]
        empty = self.pending_id(b"")
        if pending_id == empty:
            out = self._walk_tokens(empty, data)
        else:
            base_SN, base_N = self.walk(empty, data)
            S = self.num_states
            after_fffd_S = self.char_next_SK[:S, self.invalid if self.strict else self.symbol(_REPLACEMENT)]
            state_SN = np.where(after_fffd_S[:, None] < S, base_SN[np.minimum(after_fffd_S, S - 1)], S)
            tail_N = base_N.copy()
            cont = np.asarray([n for n, d in enumerate(data) if 0x80 <= d[0] <= 0xBF], np.int64)
            if len(cont):
                state_SN[:, cont], tail_N[cont] = self._walk_tokens(pending_id, [data[n] for n in cont])
            out = (state_SN, tail_N)
        self._walks[pending_id] = out
        return out

    def _finishing(self, pending_id: int) -> set[int]:
        """Symbols of the characters a pending value can turn into: a completion, or U+FFFD (not when strict)."""
        key = self._keys[pending_id]
        syms = set() if self.strict else {self.symbol(_REPLACEMENT)}
        if key != b"":
            syms |= {self.other} | (set(self.prefixes.get(key, ())) if isinstance(key, bytes) else set())
        return syms

    def live(self, state_M: np.ndarray, tail_M: np.ndarray) -> np.ndarray:
        """False where (DFA state, pending) cannot finish its character into a live DFA state (a safe prune: the
        automaton's reachability search would find such states dead anyway)."""
        dead, empty = self.num_states, self.pending_id(b"")
        return np.asarray([p == empty or any(self.char_next_SK[s, sym] != dead for sym in self._finishing(p))
                           for s, p in zip(state_M.tolist(), tail_M.tolist())], bool)

    def accepting(self, s: int, p: int) -> bool:
        """The text ends here: unfinished pending bytes read as one U+FFFD (strict: never accepted)."""
        if p == self.pending_id(b""):
            return s in self.finals
        return not self.strict and int(self.char_next_SK[s, self.symbol(_REPLACEMENT)]) in self.finals


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 character that starts with `lead` (0: not a lead byte)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def unconstrained_automaton(vocab_size: int) -> TokenAutomaton:
    """One accepting state that allows every token: masked sampling with it is plain sampling."""
    return _automaton(np.zeros((1, vocab_size), np.int64), np.ones(1, bool), 0)


# ---- masked sampling ----


class MaskedSamples(NamedTuple):
    """The fields of `guard_jax.sampling.Samples` (log-probs under the masked law q) plus the same sequences'
    log-probs under the unmasked model a (base_logp_BT, base_logp_B)."""

    tokens_BT: jax.Array
    lengths_B: jax.Array
    logp_BT: jax.Array
    logp_B: jax.Array
    base_logp_BT: jax.Array
    base_logp_B: jax.Array


def check_feasible(mask: TokenAutomaton, max_new_tokens: int) -> None:
    """Raise if no sequence of at most `max_new_tokens` tokens satisfies the automaton's b."""
    steps = int(mask.steps_to_accept_S[int(mask.initial_state)])
    if steps > max_new_tokens:
        need = "no length does" if steps >= UNREACHABLE else f"the shortest needs {steps} tokens"
        raise ValueError(f"the constraint cannot be met within max_new_tokens={max_new_tokens} ({need}); raise max_new_tokens or relax b")


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def masked_sample(key: jax.Array, model: ARM, params: Params, prompt_BP, prompt_mask_BP, mask: MaskProvider, max_new_tokens: int) -> MaskedSamples:
    """Masked ancestral sampling (temperature 1): at each step, a's logits with forbidden tokens at -inf.

    Same uniforms and inverse-CDF draw as `guard_jax.sampling.sample`, so with an all-allowing mask it returns
    exactly the same samples. Call `check_feasible` first: an infeasible constraint has no allowed token.
    """
    u_TB = uniforms(key, prompt_BP.shape[0], max_new_tokens)
    return masked_sample_from_uniforms(u_TB, model, params, prompt_BP, prompt_mask_BP, mask)


def masked_sample_from_uniforms(u_TB, model: ARM, params: Params, prompt_BP, prompt_mask_BP, mask: MaskProvider) -> MaskedSamples:
    """`masked_sample` given its uniforms u_TB [T, B] in (0, 1]. Traceable, not jitted."""
    B, P = prompt_BP.shape
    T = u_TB.shape[0]
    ends = check_segment_ends(T)
    cache = model.init_cache(B, P + ends[0])
    logits_BV, cache = model.prefill(params, prompt_BP, prompt_mask_BP, cache)

    def step(carry, xs):
        logits_BV, cache, state_B, done_B = carry
        t, u_B = xs
        token_B, logq_B, loga_B = categorical(u_B, logits_BV, allowed_BV=mask.allowed(state_B, T - t - 1))
        token_B = jnp.where(done_B, model.pad_id, token_B)
        logq_B, loga_B = jnp.where(done_B, 0.0, logq_B), jnp.where(done_B, 0.0, loga_B)
        state_B = jnp.where(done_B, state_B, mask.advance(state_B, token_B))
        alive_B = ~done_B
        if model.eos_id is not None:
            done_B = done_B | (token_B == model.eos_id)
        logits_BV, cache = model.decode(params, token_B, cache)
        return (logits_BV, cache, state_B, done_B), (token_B, logq_B, loga_B, alive_B)

    carry = (logits_BV, cache, mask.init_state(B), jnp.zeros((B,), bool))
    tokens_TB, logq_TB, loga_TB, alive_TB = scan_segments(model, step, carry, (jnp.arange(T), u_TB), P, ends)
    return MaskedSamples(tokens_TB.T, alive_TB.sum(0).astype(jnp.int32), logq_TB.T, logq_TB.sum(0), loga_TB.T, loga_TB.sum(0))


# ---- the exact law of masking on a toy grid ----


def exact_masked_log_prob(space: SequenceSpace, log_a, b, log_bias_levels: Sequence[np.ndarray] | None = None,
                          allowed_levels: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """log q(y) over the grid for masked decoding -> float64 [V^T].

    q(y) = prod_t a(y_t | y_<t) w(y_<=t) 1[allowed] / sum_{v allowed} a(v | y_<t) w(y_<t v). The masks are the
    exact reachability masks of b (q = -inf where b = 0) unless `allowed_levels` gives them (element t: bool
    [V^t, V], e.g. `Grammar.allowed_levels`; then q may put mass where b = 0). Without `log_bias_levels` the
    weights w are 1 (masking); element t of `log_bias_levels`, shape [V^t, V], gives log w(uv) for the
    prefixes u of length t (ASAp's log theta~).
    """
    V, T = space.vocab_size, space.max_len
    b = np.asarray(b, bool)
    log_a = np.asarray(log_a, np.float64)
    if b.shape != (space.size,) or log_a.shape != (space.size,):
        raise ValueError(f"log_a {log_a.shape} and b {b.shape} must both be grids of {space.size} points")
    m = prefix_log_marginals(space, log_a)
    if allowed_levels is None:
        reach = _prefix_any(space, b)
        allowed_levels = [reach[t + 1].reshape(V**t, V) for t in range(T)]
    elif len(allowed_levels) != T or any(np.shape(allowed_levels[t]) != (V**t, V) for t in range(T)):
        raise ValueError(f"allowed_levels must hold {T} bool arrays of shapes [V^t, V] (t = 0..{T - 1}), V = {V}")
    log_q = np.zeros(1)
    for t in range(T):
        with np.errstate(invalid="ignore", divide="ignore"):
            cond = m[t + 1].reshape(V**t, V) - m[t][:, None]
        cond = np.where(np.isfinite(m[t])[:, None], cond, -np.inf)
        if log_bias_levels is not None:
            cond = cond + np.asarray(log_bias_levels[t], np.float64).reshape(V**t, V)
        cond = np.where(np.asarray(allowed_levels[t], bool), cond, -np.inf)
        norm = np.logaddexp.reduce(cond, axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):
            step = np.where(np.isfinite(norm), cond - norm, -np.inf)
        log_q = (log_q[:, None] + step).reshape(-1)
    return log_q


# ---- masked sampling with a grammar: masks on the host, the model under jit ----


@functools.partial(jax.jit, static_argnames=("model", "length"))
def _prefill(model: ARM, params: Params, prompt_BP, mask_BP, length: int):
    return model.prefill(params, prompt_BP, mask_BP, model.init_cache(prompt_BP.shape[0], length))


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _decode(model: ARM, params: Params, token_B, cache):
    return model.decode(params, token_B, cache)


@functools.partial(jax.jit, static_argnames=("model", "length"))
def _grow(model: ARM, cache, length: int):
    return model.grow_cache(cache, length)


def _decode_growing(model: ARM, params: Params, token_B, cache, t: int, size: int, prompt_len: int, ends: list[int]):
    """`_decode` of generated token t (cache slot prompt_len + t) in a cache of `size` slots, first grown to
    prompt_len + the next of the segment ends `ends` when it is full, as the sampler's scans grow it (early
    steps attend over fewer slots) -> (logits_BV, cache, size)."""
    if prompt_len + t >= size:
        size = prompt_len + next(e for e in ends if e > t)
        cache = _grow(model, cache, size)
    logits_BV, cache = _decode(model, params, token_B, cache)
    return logits_BV, cache, size


def _pick(logits_BV, u_B, done_B, pad_id: int, eos_id: int, **mask):
    """One masked draw per row (`mask`: categorical's allowed_BV= or allowed_bits_BW=) -> (token_B, logq_B, loga_B,
    alive_B, done_B), as `masked_sample`'s step."""
    token_B, logq_B, loga_B = categorical(u_B, logits_BV, **mask)
    token_B = jnp.where(done_B, pad_id, token_B)
    logq_B, loga_B = jnp.where(done_B, 0.0, logq_B), jnp.where(done_B, 0.0, loga_B)
    return token_B, logq_B, loga_B, ~done_B, done_B | (token_B == eos_id)


@functools.partial(jax.jit, static_argnames=("pad_id", "eos_id"))
def _masked_pick(logits_BV, bitmask_BW, u_B, done_B, pad_id: int, eos_id: int):
    """`_pick` with llguidance's int32 bitmasks [B, ceil(V/32)], bit-tested inside the draw's block sums (no [B, V]
    bool stored; same tokens and log-probs as unpacking them first, in 0.91-0.94x its time over four loaded runs)."""
    return _pick(logits_BV, u_B, done_B, pad_id, eos_id, allowed_bits_BW=bitmask_BW)


def _dense_pick(logits_BV, table: "DenseMasks", state_B, u_B, done_B, pad_id: int, eos_id: int):
    """`_pick` with the masks of the rows' states in a dense table (unpacked after the gather: measured faster here
    than the bit test inside the draw) -> (its outputs, next state_B)."""
    out = _pick(logits_BV, u_B, done_B, pad_id, eos_id, allowed_BV=unpack_bitmask(table.bitmask_SW[state_B], logits_BV.shape[-1]))
    return out, jnp.where(done_B, state_B, table.next_state_SV[state_B, out[0]])


@functools.partial(jax.jit, static_argnames=("model", "end"), donate_argnames=("cache", "out"))
def _dense_segment(model: ARM, params: Params, table: "DenseMasks", t, logits_BV, cache, state_B, done_B, out, u_TB, end: int):
    """Steps t..end-1 of the dense route in one on-device loop that stops early once every row has ended, or
    before a step where a running row's state is unsafe (`DenseMasks.unsafe_S`).

    `out` = (tokens_TB, logq_TB, loga_TB, alive_TB), written at each step; the cache holds prompt + `end` slots.
    The decode after a step runs only while a later step needs its logits (not after step T-1, nor once every
    row has ended) -> (t, logits_BV, cache, state_B, done_B, out) where it stopped."""
    T = u_TB.shape[0]

    def body(carry):
        t, logits_BV, cache, state_B, done_B, out = carry
        (token_B, *rest, done_B), state_B = _dense_pick(logits_BV, table, state_B, u_TB[t], done_B, model.pad_id, model.eos_id)
        out = tuple(o.at[t].set(x) for o, x in zip(out, (token_B, *rest)))
        logits_BV, cache = jax.lax.cond((t + 1 < T) & ~jnp.all(done_B), lambda: model.decode(params, token_B, cache),
                                        lambda: (logits_BV, cache))
        return t + 1, logits_BV, cache, state_B, done_B, out

    def running(carry):  # steps left in the segment, a row still running, and none in a state with an unsafe mask
        t, _, _, state_B, done_B, _ = carry
        return (t < end) & ~jnp.all(done_B) & ~jnp.any(table.unsafe_S[state_B] & ~done_B)

    return jax.lax.while_loop(running, body, (t, logits_BV, cache, state_B, done_B, out))


def _dense_sample(model: ARM, params: Params, grammar: Grammar, table: "DenseMasks", logits_BV, cache, u_TB, prompt_len: int,
                  ends: list[int]):
    """The dense route after the prefill (cache of prompt_len + ends[0] slots): one `_dense_segment` per segment
    of `ends`, the cache grown between them, stopping after the segment where every row has ended; from a step
    where a running row's state is unsafe, llguidance's route takes the batch over -> numpy (tokens_TB,
    logq_TB, loga_TB, alive_TB)."""
    T, B = u_TB.shape
    out = (jnp.full((T, B), model.pad_id, jnp.int32), jnp.zeros((T, B)), jnp.zeros((T, B)), jnp.zeros((T, B), bool))
    t, state_B, done_B = jnp.int32(0), jnp.full((B,), table.initial_state, jnp.int32), jnp.zeros((B,), bool)
    for k, end in enumerate(ends):
        if k:
            cache = _grow(model, cache, prompt_len + end)
        t, logits_BV, cache, state_B, done_B, out = _dense_segment(model, params, table, t, logits_BV, cache, state_B, done_B,
                                                                   out, u_TB, end)
        if bool(np.asarray(done_B).all()):
            break
        if int(t) < end:  # a running row reached an unsafe state
            return _llguidance_sample(model, params, grammar, logits_BV, cache, np.asarray(u_TB), prompt_len, ends,
                                      start=(int(t), prompt_len + end, tuple(np.asarray(x) for x in out), done_B))
    return tuple(np.asarray(x) for x in out)


class DenseMasks(NamedTuple):
    """A grammar's next-token masks as a dense on-device table (`dense_masks`): row s holds the mask of state s."""

    bitmask_SW: jax.Array  # int32 [S, ceil(V/32)]: the allowed tokens of each state, as llguidance's bitmasks
    next_state_SV: jax.Array  # int32 [S, V]: the state after each allowed token (-1: not allowed)
    initial_state: jax.Array  # int32 []
    unsafe_S: jax.Array  # bool [S]: a state whose mask may allow more than the grammar's (a CFG's depth bound near)


# states x V of the largest table `grammar_masked_sample` builds by itself (64 MB of int32); the 4-field JSON schema at
# V = 8,192 (1,054 states, 8.6M cells) builds and is checked in 2.3 s on a 2-core Xeon, at V = 50,257 (53M) in 5.8 s
DENSE_MAX_CELLS = 2**24
_DENSE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # grammar -> {max_cells: DenseMasks | None}


def dense_masks(grammar: Grammar, max_cells: int = DENSE_MAX_CELLS) -> DenseMasks | None:
    """The masks of a small `Grammar.regex`, of a `Grammar.json_schema` that `guard_jax.json_regex` writes as a
    regex, or of a `Grammar.lark` that `guard_jax.lark_fsm` unrolls to a bounded depth, as a dense table on the
    device, or None (another grammar; over `max_cells` = states x V; a pattern interegular cannot compile; or a
    table whose masks differ from llguidance's). Cached per (grammar, max_cells). A CFG's states near its depth
    bound are `unsafe_S` (their masks may allow more than the grammar's): not checked, and left to llguidance's
    masks by the sampler.

    The table is `regex_automaton`'s over valid UTF-8 (`invalid_utf8="reject"`, llguidance's byte rule), with
    llguidance's mask rule (not length-aware: every token that keeps the text a prefix of the language, EOS
    where it is in it), and it is checked against llguidance: for one shortest prefix reaching each state, the
    state's mask equals the grammar's mask after that prefix. Building it walks every token through the DFA
    (0.3 s for an 11-state date regex at V = 8,192; 2.3 s for the 1,054 states of a 4-field JSON schema).
    """
    tables = _DENSE.setdefault(grammar, {})
    if max_cells not in tables:
        tables[max_cells] = _build_dense(grammar, max_cells)
    return tables[max_cells]


def _grammar_fsm(grammar: Grammar):
    """(interegular FSM, its universal states) of a grammar with a dense route, or None."""
    import interegular

    if grammar.kind == "lark":
        return lark_fsm(grammar.source)
    pattern = grammar.source if grammar.kind == "regex" else schema_regex(grammar.source) if grammar.kind == "json_schema" else None
    if pattern is None:
        return None
    try:
        return interegular.parse_pattern(pattern).to_fsm(), frozenset()
    except Exception:  # interegular raises several types for unsupported syntax
        return None


def _build_dense(grammar: Grammar, max_cells: int) -> DenseMasks | None:
    from guard_jax.grammars import mask_of, token_bytes

    V = grammar.vocab_size
    built = _grammar_fsm(grammar)
    if built is None or len(built[0].states) * V > max_cells:
        return None
    fsm, universal = built
    items = {i: t for i, t in token_bytes(grammar.tokenizer, V).items() if i != grammar.eos_id}
    try:
        next_SV, accepting_S, dfa_S = _fsm_table(fsm, items, grammar.eos_id, V, strict=True)
    except ValueError:
        return None
    if next_SV.size > max_cells:
        return None
    steps_S = _steps_to_accept(next_SV, accepting_S)
    allowed_SV = (next_SV >= 0) & (steps_S < UNREACHABLE)[np.maximum(next_SV, 0)]
    past_S = np.isin(dfa_S, list(universal))  # past the depth bound: every text accepted
    unsafe_S = past_S | (allowed_SV & past_S[np.maximum(next_SV, 0)]).any(axis=1)
    if unsafe_S[0]:
        return None  # the bound is a token away from the start: no step would run on the table
    prefixes = {0: ()}  # a shortest prefix to every reachable state
    queue = deque(prefixes)
    while queue:
        s = queue.popleft()
        for v in np.flatnonzero(allowed_SV[s]):
            if v != grammar.eos_id and int(next_SV[s, v]) not in prefixes:
                prefixes[int(next_SV[s, v])] = (*prefixes[s], int(v))
                queue.append(int(next_SV[s, v]))
    for s, prefix in prefixes.items():
        if unsafe_S[s]:
            continue  # its mask may allow more than the grammar's: the sampler hands such rows to llguidance
        m = grammar.matcher()
        if not m.consume_tokens(list(prefix)) or not np.array_equal(mask_of(m, V), allowed_SV[s]):
            return None
    padded_SV = np.zeros((len(next_SV), grammar.mask_words * 32), bool)
    padded_SV[:, :V] = allowed_SV
    return DenseMasks(jnp.asarray(np.packbits(padded_SV, axis=1, bitorder="little").view(np.int32)),
                      jnp.asarray(np.where(allowed_SV, next_SV, -1), jnp.int32), jnp.asarray(0, jnp.int32), jnp.asarray(unsafe_S))


def grammar_masked_sample(key: jax.Array, model: ARM, params: Params, prompt_BP, prompt_mask_BP, grammar: Grammar,
                          max_new_tokens: int, dense: bool | None = None) -> MaskedSamples:
    """Masked ancestral sampling after a left-padded prompt (one row per sample), masks from a `Grammar`
    (numpy fields).

    Same uniforms and inverse-CDF draw as `guard_jax.sampling.sample` (a grammar that allows every token gives
    its samples up to float rounding). The cache grows at the sampler's segment ends (`sampling.segments`), so
    early steps attend over fewer slots, and sampling stops once every row has ended. The masks are not
    length-aware: a row still inside a string after `max_new_tokens` fails b. Two routes, with the same masks
    and so the same samples:

    - the dense table (`dense_masks`: the masks of a small regex, a regular JSON schema or a depth-bounded CFG
      on the device, built once per grammar): each cache segment is one jitted loop that draws, advances the
      rows' states and decodes, and stops early once every row has ended; the host only checks, between
      segments, whether any row still runs; from a step where a running row is in an unsafe state (a CFG's
      depth bound near) llguidance's masks take the batch over;
    - llguidance's masks (any grammar): each step runs two jitted calls, the masked draw, then the model's
      decode step, which is dispatched before the host advances the matchers and computes the next masks (one
      per distinct prefix, llguidance's thread pool), so the two overlap.

    `dense`: None (default) takes the dense table where there is one (`dense_masks` is not None) and
    llguidance's masks otherwise; False always llguidance's; True requires the table.
    """
    if grammar.eos_id != model.eos_id or grammar.vocab_size != model.vocab_size:
        raise ValueError(f"grammar {grammar} must share the model's eos_id={model.eos_id} and vocab_size={model.vocab_size}; "
                         "build it with vocab_size=model.vocab_size")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    table = None if dense is False else dense_masks(grammar)
    if dense and table is None:
        raise ValueError(f"dense=True needs a regex, a regular JSON schema (guard_jax.json_regex) or a CFG in guard_jax.lark_fsm's "
                         f"subset whose table has at most {DENSE_MAX_CELLS} states x V cells, got {grammar}; pass dense=None")
    (B, P), T = prompt_BP.shape, int(max_new_tokens)
    u_TB = uniforms(key, B, T)
    ends = check_segment_ends(T)
    logits_BV, cache = _prefill(model, params, jnp.asarray(prompt_BP), jnp.asarray(prompt_mask_BP), P + ends[0])
    if table is not None:
        tokens, logq, loga, alive = _dense_sample(model, params, grammar, table, logits_BV, cache, u_TB, P, ends)
    else:
        tokens, logq, loga, alive = _llguidance_sample(model, params, grammar, logits_BV, cache, np.asarray(u_TB), P, ends)
    return MaskedSamples(tokens.T, alive.sum(0).astype(np.int32), logq.T, logq.sum(0), loga.T, loga.sum(0))


def _llguidance_sample(model: ARM, params: Params, grammar: Grammar, logits_BV, cache, u_TB: np.ndarray, prompt_len: int,
                       ends: list[int], start=None):
    """The llguidance route after the prefill (cache of prompt_len + ends[0] slots): per step the masked draw,
    then the decode, dispatched before the host advances the matchers and computes the next masks; stops once
    every row has ended -> numpy (tokens_TB, logq_TB, loga_TB, alive_TB). `start` = (t, cache size, the outputs
    of steps < t, done_B) takes over at step t from the dense route (the matchers replay the rows' tokens)."""
    T, B = u_TB.shape
    t0, size, before, done_B = start if start is not None else (0, prompt_len + ends[0], None, jnp.zeros((B,), bool))
    steps = []  # (token_B, logq_B, loga_B, alive_B) per step, left on the device until the end
    matchers = grammar.batch(B)
    for t in range(t0):
        matchers.consume(before[0][t])
    bitmask_BW = np.empty((B, grammar.mask_words), np.int32)
    for t in range(t0, T):
        matchers.fill(bitmask_BW)
        token_B, logq_B, loga_B, alive_B, done_B = _masked_pick(logits_BV, jax.device_put(bitmask_BW), u_TB[t], done_B,
                                                               model.pad_id, model.eos_id)
        if t + 1 < T:  # runs while the host computes masks
            logits_BV, cache, size = _decode_growing(model, params, token_B, cache, t, size, prompt_len, ends)
        steps.append((token_B, logq_B, loga_B, alive_B))
        matchers.consume(np.asarray(token_B))
        if not matchers.running_B.any():
            break
    if before is None:
        tokens = np.full((T, B), model.pad_id, np.int32)
        logq, loga, alive = (np.zeros((T, B), d) for d in (np.float32, np.float32, bool))
    else:
        tokens, logq, loga, alive = (np.array(x) for x in before)
    n = len(steps)
    tokens[t0:t0 + n], logq[t0:t0 + n], loga[t0:t0 + n], alive[t0:t0 + n] = (np.asarray(jnp.stack(x)) for x in zip(*steps))
    return tokens, logq, loga, alive
