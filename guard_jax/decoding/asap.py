"""ASAp (Park et al. 2024, grammar-aligned decoding): masked decoding that learns to stop distorting g.

A host-side trie holds every explored prefix u. Its node keeps, for the tokens v the mask allows after u,
the unmasked log P(v | u) and log theta~(uv), an upper bound on P_a(b = 1 | uv) that starts at 0 (theta~ = 1,
the masking over-approximation). The next token is drawn with logits log P(v | u) + log theta~(uv) on the
allowed tokens. After each sample, the leaf gets log b(y) (0 or -inf) and every node on the path is
recomputed up to the root: log theta~(u) = logsumexp_v [log P(v | u) + log theta~(uv)]. The bounds only
fall, the root's toward Z = P_a(b = 1), and once a subtree is fully explored its conditionals are g's.

Model calls are batched and jitted (one call per step for a round of rows); the trie stays on the host.
Rows of one round are drawn from the same trie snapshot and the trie is updated after the round, so
`batch_size=1` is the original one-sample-at-a-time algorithm. The law of a sample given the trie is
q(y) = prod_t P(y_t | u) theta~(u y_t) / theta~(u); `log_theta_levels` exposes the trie to
`guard_jax.decoding.gcd.exact_masked_log_prob`, which gives q exactly on a toy grid.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.decoding.gcd import TokenAutomaton, check_feasible
from guard_jax.exact import SequenceSpace
from guard_jax.grammars import Grammar, mask_of
from guard_jax.models.base import ARM, Params


@dataclasses.dataclass
class Node:
    """One explored prefix: allowed token ids, their unmasked log P(v|u) and log theta~(uv) (float64)."""

    allowed: np.ndarray
    logp: np.ndarray
    log_theta: np.ndarray

    def log_value(self) -> float:
        """log theta~(u) = logsumexp(logp + log_theta) (-inf for a dead end)."""
        return float(np.logaddexp.reduce(self.logp + self.log_theta)) if len(self.allowed) else -np.inf


class AsapSamples(NamedTuple):
    """tokens_NT (pad after the end), lengths_N, logq_N: log-prob under the proposal each sample was drawn
    from, base_logp_N: under a, accepted_N: b(y) (always True with exact masks). log w = base_logp - logq
    is the importance weight a(y) b(y) / q(y) of an accepted sample."""

    tokens_NT: np.ndarray
    lengths_N: np.ndarray
    logq_N: np.ndarray
    base_logp_N: np.ndarray
    accepted_N: np.ndarray


class _AutomatonSets:
    """ASAp's allowed sets from a dense token automaton: states are ints, masks are length-aware."""

    def __init__(self, mask: TokenAutomaton):
        self.next_SV = np.asarray(mask.next_state_SV, np.int64)
        self.steps_S = np.asarray(mask.steps_to_accept_S, np.int64)
        self.accepting_S = np.asarray(mask.accepting_S, bool)
        self.initial = int(mask.initial_state)

    def start(self, batch_size: int) -> list:
        return [self.initial] * batch_size

    def allowed(self, state: int, remaining: int) -> np.ndarray:
        if state < 0:
            return np.zeros(0, np.int64)
        nxt = self.next_SV[state]
        ok = nxt >= 0
        ok[ok] = self.steps_S[nxt[ok]] <= remaining
        return np.flatnonzero(ok)

    def advance(self, state: int, token: int) -> int:
        return int(self.next_SV[state, token]) if state >= 0 else state

    def accepting(self, state: int) -> bool:
        return state >= 0 and bool(self.accepting_S[state])

    def child(self, state: int, token: int) -> int:
        return self.advance(state, token)

    def masks(self, states: list, remaining: list[int]) -> np.ndarray:
        """bool [n, V]: the allowed tokens of each state with its number of tokens left."""
        out = np.zeros((len(states), self.next_SV.shape[1]), bool)
        for i, (state, r) in enumerate(zip(states, remaining)):
            out[i, self.allowed(state, r)] = True
        return out

    def bitmasks(self, states: list, remaining: list[int]) -> np.ndarray:
        """int32 [n, ceil(V/32)]: `masks` packed (bit v % 32 of word v // 32)."""
        allowed_NV = self.masks(states, remaining)
        V = allowed_NV.shape[1]
        padded = np.zeros((len(states), -(-V // 32) * 32), bool)
        padded[:, :V] = allowed_NV
        return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


class _GrammarSets:
    """ASAp's allowed sets from a `Grammar`: states are llguidance matchers (one per row), masks are the
    grammar's (not length-aware: a sample cut off by max_new_tokens fails b, and the trie learns it)."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar

    def start(self, batch_size: int) -> list:
        return [self.grammar.matcher() for _ in range(batch_size)]

    def allowed(self, matcher, remaining: int) -> np.ndarray:
        del remaining
        return np.flatnonzero(mask_of(matcher, self.grammar.vocab_size)) if not matcher.is_error() else np.zeros(0, np.int64)

    def advance(self, matcher, token: int):
        if token != self.grammar.eos_id:
            matcher.consume_token(int(token))
        return matcher

    def accepting(self, matcher) -> bool:
        return not matcher.is_error() and matcher.is_accepting()

    def child(self, matcher, token: int):
        """The state after `token`, leaving `matcher` as it was."""
        return self.advance(matcher.deep_copy(), token)

    def bitmasks(self, matchers: list, remaining: list[int]) -> np.ndarray:
        """int32 [n, ceil(V/32)]: the masks of the matchers (empty for one in error), computed together on
        llguidance's pool (the matchers must be distinct objects)."""
        import llguidance
        import llguidance.numpy as lnp

        from guard_jax.grammars import _executor

        bitmask_NW = np.zeros((len(matchers), self.grammar.mask_words), np.int32)
        live = [(m, i) for i, m in enumerate(matchers) if not m.is_error()]
        if live:
            lnp.fill_next_token_bitmask_par(_executor(llguidance), live, bitmask_NW)
        return bitmask_NW

    def masks(self, matchers: list, remaining: list[int]) -> np.ndarray:
        """bool [n, V]: `bitmasks` unpacked."""
        from guard_jax.grammars import _unpack_bits

        return _unpack_bits(self.bitmasks(matchers, remaining), self.grammar.vocab_size)


class TrieBias:
    """The next-token log weights of ASAp's law q after a prefix u, from a snapshot of the trie (a
    `masked_arm.PrefixBias`): log theta~(uv) on the allowed tokens of an explored u, 0 on the allowed tokens of
    an unexplored one, -inf elsewhere; zeros (a's conditionals) after EOS, off the mask or where nothing is
    allowed (prefixes drawn with probability 0, or after b has already failed). With an empty trie: masking.
    Mask states are memoised by prefix (at most `max_states`, then the memo starts afresh)."""

    def __init__(self, sets, nodes: dict, vocab_size: int, max_new_tokens: int, eos_id: int | None, max_states: int = 50_000):
        self.sets, self.V, self.T, self.eos_id, self.max_states = sets, int(vocab_size), int(max_new_tokens), eos_id, max_states
        self.nodes = {u: (n.allowed.copy(), n.log_theta.astype(np.float32)) for u, n in nodes.items()}
        self._states: dict[tuple[int, ...], object] = {}
        self._lock = threading.Lock()

    def _state(self, prefix: tuple[int, ...]):
        if prefix not in self._states:
            if len(self._states) >= self.max_states:
                self._states.clear()
            self._states[prefix] = self.sets.start(1)[0] if not prefix else self.sets.child(self._state(prefix[:-1]), prefix[-1])
        return self._states[prefix]

    @property
    def bitmask_only(self) -> bool:
        """True for an empty trie (masking): the bias is 0 / -inf, sent as bitmasks (`bitmasks`)."""
        return not self.nodes

    def bitmasks(self, prefixes: list[tuple[int, ...]]) -> np.ndarray:
        """int32 [len(prefixes), ceil(V/32)]: the mask after each prefix (all ones after EOS; a's conditionals),
        the distinct prefixes' masks computed together."""
        out = np.full((len(prefixes), -(-self.V // 32)), -1, np.int32)
        with self._lock:
            fresh = [i for i, u in enumerate(prefixes) if not (self.eos_id is not None and self.eos_id in u)]
            if fresh:
                distinct = list(dict.fromkeys(prefixes[i] for i in fresh))
                rows_UW = self.sets.bitmasks([self._state(u) for u in distinct], [self.T - len(u) - 1 for u in distinct])
                where = {u: k for k, u in enumerate(distinct)}
                out[fresh] = rows_UW[[where[prefixes[i]] for i in fresh]]
        return out

    def log_bias(self, prefixes: list[tuple[int, ...]]) -> np.ndarray:
        out = np.zeros((len(prefixes), self.V), np.float32)
        with self._lock:
            fresh = [i for i, u in enumerate(prefixes) if u not in self.nodes and not (self.eos_id is not None and self.eos_id in u)]
            if fresh:  # unexplored prefixes: the masks of the distinct ones, all at once
                distinct = list(dict.fromkeys(prefixes[i] for i in fresh))
                allowed_UV = self.sets.masks([self._state(u) for u in distinct], [self.T - len(u) - 1 for u in distinct])
                rows_UV = np.full(allowed_UV.shape, -np.inf, np.float32)
                rows_UV[allowed_UV | ~allowed_UV.any(axis=1, keepdims=True)] = 0.0
                where = {u: k for k, u in enumerate(distinct)}
                out[fresh] = rows_UV[[where[prefixes[i]] for i in fresh]]
            for i, u in enumerate(prefixes):
                if u in self.nodes and not (self.eos_id is not None and self.eos_id in u):
                    allowed, w = self.nodes[u]
                    if len(allowed):
                        out[i] = -np.inf
                        out[i, allowed] = w
        return out


@functools.partial(jax.jit, static_argnames=("model",))
def _next_log_probs(model: ARM, params: Params, tokens_BL, mask_BL, position):
    """log softmax of a's logits at `position` of a left-padded buffer -> logp_BV (float32)."""
    logits_BLV = model.apply(params, tokens_BL, mask_BL)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, position, axis=1, keepdims=False)
    return jax.nn.log_softmax(logits_BV.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("model", "prompt_len"))
def _teacher_forced_log_probs(model: ARM, params: Params, tokens_BL, prompt_len: int):
    """log softmax of a's logits at the positions that predict the generated tokens -> logp_BTV (float32)."""
    logits_BLV = model.apply(params, tokens_BL, jnp.ones_like(tokens_BL))
    return jax.nn.log_softmax(logits_BLV[:, prompt_len - 1 : -1].astype(jnp.float32))


class Asap:
    """The ASAp sampler for a model, a mask and a length. The mask is a `TokenAutomaton` (its accepting states
    define b; length-aware masks) or a `guard_jax.grammars.Grammar` (b = the text is in the language; its masks
    are not length-aware, so a sample cut off at `max_new_tokens` fails b and its path's bound drops to 0).

    `prompt_1P` (one row, default [BOS]) is what a conditions on. The trie persists across `sample` calls.
    """

    def __init__(self, model: ARM, params: Params, mask: TokenAutomaton | Grammar, max_new_tokens: int, prompt_1P=None):
        if isinstance(mask, Grammar):
            if mask.eos_id != model.eos_id or mask.vocab_size != model.vocab_size:
                raise ValueError(f"mask {mask} must share the model's eos_id={model.eos_id} and vocab_size={model.vocab_size}")
            self._sets = _GrammarSets(mask)
        else:
            check_feasible(mask, max_new_tokens)
            self._sets = _AutomatonSets(mask)
        self.model, self.params, self.max_new_tokens = model, params, int(max_new_tokens)
        self.prompt_P = np.asarray([model.bos_id] if prompt_1P is None else np.asarray(prompt_1P).reshape(-1), np.int32)
        self.nodes: dict[tuple[int, ...], Node] = {}
        self.history: list[float] = [self.root_log_theta]  # log theta~(root) after each sample

    @property
    def root_log_theta(self) -> float:
        """log theta~ at the root: an upper bound on log Z that never increases (0 before any sample)."""
        root = self.nodes.get(())
        return 0.0 if root is None else root.log_value()

    def sample(self, key: jax.Array, num_samples: int, batch_size: int = 1) -> AsapSamples:
        """Draw `num_samples` sequences, updating the trie after every round of `batch_size` rows."""
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"num_samples and batch_size must be > 0, got {num_samples} and {batch_size}")
        out = []
        for r, start in enumerate(range(0, num_samples, batch_size)):
            out.append(self._round(jax.random.fold_in(key, r), min(batch_size, num_samples - start)))
        return AsapSamples(*(np.concatenate(parts) for parts in zip(*out)))

    def draw(self, key: jax.Array, num_samples: int, batch_size: int = 256) -> AsapSamples:
        """`num_samples` samples of the current law q (`log_prob`'s), without updating the bounds: every row comes
        from the same trie, in rounds of `batch_size` rows."""
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"num_samples and batch_size must be > 0, got {num_samples} and {batch_size}")
        out = [self._round(jax.random.fold_in(key, r), min(batch_size, num_samples - start), update=False)
               for r, start in enumerate(range(0, num_samples, batch_size))]
        return AsapSamples(*(np.concatenate(parts) for parts in zip(*out)))

    def _round(self, key: jax.Array, B: int, update: bool = True) -> AsapSamples:
        model, T, P = self.model, self.max_new_tokens, len(self.prompt_P)
        u_TB = np.asarray(1.0 - jax.random.uniform(key, (T, B)), np.float64)
        buf_BL = np.full((B, P + T), model.pad_id, np.int32)
        buf_BL[:, :P] = self.prompt_P
        mask_BL = np.zeros((B, P + T), np.int32)
        mask_BL[:, :P] = 1
        tokens_BT = np.full((B, T), model.pad_id, np.int32)
        state_B = self._sets.start(B)
        lengths_B = np.zeros(B, np.int32)
        logq_B, loga_B = np.zeros(B), np.zeros(B)
        done_B = np.zeros(B, bool)
        dead_B = np.zeros(B, bool)
        for t in range(T):
            rows = np.flatnonzero(~done_B)
            if not len(rows):
                break
            prefixes = {b: tuple(tokens_BT[b, :t].tolist()) for b in rows}
            if any(p not in self.nodes for p in prefixes.values()):
                logp_BV = np.asarray(_next_log_probs(model, self.params, jnp.asarray(buf_BL), jnp.asarray(mask_BL), P - 1 + t), np.float64)
                for b in rows:
                    if prefixes[b] not in self.nodes:
                        allowed = self._sets.allowed(state_B[b], T - t - 1)
                        self.nodes[prefixes[b]] = Node(allowed, logp_BV[b, allowed], np.zeros(len(allowed)))
            for b in rows:
                node = self.nodes[prefixes[b]]
                if not len(node.allowed):  # only with a mask that is not length-exact: a dead end, b = 0
                    done_B[b] = dead_B[b] = True
                    continue
                w = node.logp + node.log_theta
                logq = w - np.logaddexp.reduce(w)
                cdf = np.cumsum(np.exp(logq))
                k = min(int(np.sum(cdf < u_TB[t, b] * cdf[-1])), len(cdf) - 1)
                v = int(node.allowed[k])
                tokens_BT[b, t], buf_BL[b, P + t], mask_BL[b, P + t] = v, v, 1
                logq_B[b] += logq[k]
                loga_B[b] += node.logp[k]
                lengths_B[b] = t + 1
                state_B[b] = self._sets.advance(state_B[b], v)
                if model.eos_id is not None and v == model.eos_id:
                    done_B[b] = True
        accepted_B = ~dead_B & np.asarray([self._sets.accepting(state) for state in state_B], bool)
        for b in range(B if update else 0):
            self._update(tokens_BT[b, : lengths_B[b]], bool(accepted_B[b]), dead=bool(dead_B[b]))
        return AsapSamples(tokens_BT, lengths_B, logq_B, loga_B, accepted_B)

    def _update(self, path: np.ndarray, accepted: bool, dead: bool) -> None:
        """Set the leaf to log b(y) and recompute theta~ along the path up to the root."""
        path = tuple(path.tolist())
        if dead:  # the last prefix itself has no allowed token: its value is already -inf
            value = -np.inf
            n = len(path)
        else:
            value = 0.0 if accepted else -np.inf
            n = len(path) - 1
            if n < 0:
                return
            node = self.nodes[path[:n]]
            k = int(np.searchsorted(node.allowed, path[n]))
            node.log_theta[k] = min(node.log_theta[k], value)
            value = node.log_value()
        for t in range(n - 1, -1, -1):
            node = self.nodes[path[:t]]
            k = int(np.searchsorted(node.allowed, path[t]))
            node.log_theta[k] = min(node.log_theta[k], value)  # bounds only fall (guards against rounding)
            value = node.log_value()
        self.history.append(self.root_log_theta)

    def as_lm(self, a):
        """The law of the next sample given the current trie (a snapshot: later samples do not change it) as an
        `LM` (`masked_arm.HostMaskedARM` over a's model, params and prompt; its params carry the snapshot's host id), so the samplers, scorers and
        estimators take it as a proposal a'. With an empty trie it is masked decoding by the same mask."""
        from guard_jax.decoding.masked_arm import HostMaskedARM

        if tuple(a.prompt) != tuple(self.prompt_P.tolist()) or a.model != self.model:
            raise ValueError(f"as_lm needs the LM this sampler was built for (its model and prompt {self.prompt_P.tolist()}), "
                             f"got prompt {list(a.prompt)}")
        bias = TrieBias(self._sets, self.nodes, self.model.vocab_size, self.max_new_tokens, self.model.eos_id)
        return dataclasses.replace(a, model=HostMaskedARM(a.model, bias, len(a.prompt), self.max_new_tokens),
                                   params=HostMaskedARM.params_of(a.params, bias))

    def log_prob(self, tokens_NT, lengths_N, batch_size: int = 32) -> np.ndarray:
        """log q(y) of the law the next sample is drawn from (the current trie), for any sequences -> float64 [N].

        q(y_t | u) = P(y_t | u) theta~(u y_t) / sum_{v allowed} P(v | u) theta~(uv), with theta~ = 1 below the
        explored trie (and -inf off the mask). With an empty trie this is the law of masked decoding with the
        same mask, so it scores masking's proposal too. a's conditionals come from one teacher-forced pass per
        `batch_size` rows.
        """
        tokens_NT, lengths_N = np.asarray(tokens_NT, np.int32), np.asarray(lengths_N)
        N, T = tokens_NT.shape
        if T != self.max_new_tokens:
            raise ValueError(f"tokens_NT has {T} positions; this sampler generates max_new_tokens={self.max_new_tokens}")
        P = len(self.prompt_P)
        out = np.zeros(N)
        for start in range(0, N, batch_size):
            rows = tokens_NT[start : start + batch_size]
            full = np.zeros((batch_size, T), np.int32)  # one shape for every chunk: one compilation
            full[: len(rows)] = rows
            buf_BL = np.concatenate([np.broadcast_to(self.prompt_P, (batch_size, P)), full], axis=1)
            logp_BTV = np.asarray(_teacher_forced_log_probs(self.model, self.params, jnp.asarray(buf_BL), P), np.float64)
            states = self._sets.start(len(rows))
            for b, row in enumerate(rows):
                out[start + b] = self._row_log_prob(row[: int(lengths_N[start + b])].tolist(), logp_BTV[b], states[b])
        return out

    def _row_log_prob(self, row: list[int], logp_TV: np.ndarray, state) -> float:
        total, T = 0.0, self.max_new_tokens
        for t, v in enumerate(row):
            node = self.nodes.get(tuple(row[:t]))
            if node is not None:
                allowed, w = node.allowed, node.logp + node.log_theta
            else:
                allowed = self._sets.allowed(state, T - t - 1)
                w = logp_TV[t, allowed]
            k = int(np.searchsorted(allowed, v))
            if k == len(allowed) or allowed[k] != v or not np.isfinite(w[k]):
                return -np.inf
            total += w[k] - np.logaddexp.reduce(w)
            state = self._sets.advance(state, v)
        return total

    def log_theta_levels(self, space: SequenceSpace) -> list[np.ndarray]:
        """The trie as dense log theta~(uv) arrays: element t has shape [V^t, V] (0 where unexplored).

        With `exact_masked_log_prob(space, log_a, b, asap.log_theta_levels(space))` this is the exact law of the
        next ASAp sample on a toy grid (when the mask is the exact reachability mask of b).
        """
        V, T = space.vocab_size, space.max_len
        if T != self.max_new_tokens:
            raise ValueError(f"space.max_len={T} must equal the sampler's max_new_tokens={self.max_new_tokens}")
        levels = [np.zeros((V**t, V)) for t in range(T)]
        for prefix, node in self.nodes.items():
            code = int(np.dot(prefix, V ** np.arange(len(prefix) - 1, -1, -1))) if prefix else 0
            levels[len(prefix)][code, node.allowed] = node.log_theta
        return levels
