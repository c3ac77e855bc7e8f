"""Exact answers on small spaces, by enumeration: the twins of every Monte-Carlo estimate.

A `SequenceSpace` is the grid V^T of token sequences; sequence n has the base-V digits of n as its
tokens (most significant first). With an EOS token, a sequence ends at its first EOS and every later
position must hold `pad`; grid points that break this rule are *invalid* and carry probability 0
(log-prob -inf). All exact laws below are arrays over the grid, in log space (no underflow for tiny Z).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.models.base import ARM, Params
from guard_jax.models.toy import TabularARM

_MAX_GRID = 10**9


@dataclasses.dataclass(frozen=True)
class SequenceSpace:
    """The grid of sequences of exactly T positions over V tokens; optional EOS then `pad`."""

    vocab_size: int
    max_len: int
    eos_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.size > _MAX_GRID:
            raise ValueError(f"V^T = {self.vocab_size}^{self.max_len} = {self.size} sequences is too many to enumerate (max {_MAX_GRID})")
        if self.eos_id is not None and self.pad_id is None:
            object.__setattr__(self, "pad_id", self.eos_id)

    @classmethod
    def of(cls, model: ARM, max_len: int) -> "SequenceSpace":
        return cls(model.vocab_size, max_len, model.eos_id, model.pad_id if model.eos_id is not None else None)

    @property
    def size(self) -> int:
        return self.vocab_size**self.max_len

    def tokens(self, index_N) -> jax.Array:
        """Grid indices -> tokens_NT (int32), base-V digits, most significant first."""
        index_N = jnp.asarray(index_N, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
        powers_T = self.vocab_size ** jnp.arange(self.max_len - 1, -1, -1, dtype=index_N.dtype)
        return ((index_N[:, None] // powers_T[None]) % self.vocab_size).astype(jnp.int32)

    def index(self, tokens_NT) -> np.ndarray:
        """tokens_NT -> grid indices (int64, numpy); the inverse of `tokens`."""
        tokens_NT = np.asarray(tokens_NT, np.int64)
        if tokens_NT.shape[1] != self.max_len:
            raise ValueError(f"tokens_NT must have max_len={self.max_len} positions, got {tokens_NT.shape[1]}")
        powers_T = self.vocab_size ** np.arange(self.max_len - 1, -1, -1, dtype=np.int64)
        return tokens_NT @ powers_T

    def lengths_and_valid(self, tokens_NT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (lengths_N: tokens up to and including the first EOS, valid_N: canonical padding)."""
        N, T = tokens_NT.shape
        if self.eos_id is None:
            return jnp.full((N,), T, jnp.int32), jnp.ones((N,), bool)
        is_eos_NT = tokens_NT == self.eos_id
        first_N = jnp.where(is_eos_NT.any(1), jnp.argmax(is_eos_NT, axis=1), T)
        lengths_N = jnp.minimum(first_N + 1, T).astype(jnp.int32)
        after_NT = jnp.arange(T)[None] >= lengths_N[:, None]
        valid_N = jnp.all(~after_NT | (tokens_NT == self.pad_id), axis=1)
        return lengths_N, valid_N


def enumerate_sequences(vocab_size: int, max_len: int, eos_id: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every grid point of V^T: -> (tokens_NT, lengths_N, valid_N) with N = V^T (small spaces only)."""
    space = SequenceSpace(vocab_size, max_len, eos_id)
    tokens_NT = space.tokens(jnp.arange(space.size))
    return (tokens_NT, *space.lengths_and_valid(tokens_NT))


def _chunk_size(space: SequenceSpace, prompt_len: int, budget_bytes: int) -> int:
    """Stems per chunk: a stem's V sequences hold about three [P + T, V] float32 arrays (logits, their
    log-softmax, its repeat's gather) and three [V, T] ones (the tokens, their log-probs, the masked ones)."""
    per_stem = 4 * space.vocab_size * (3 * (prompt_len + space.max_len) + 3 * space.max_len)
    return int(max(1, min(budget_bytes // per_stem, space.size // space.vocab_size)))


@functools.partial(jax.jit, static_argnames=("model", "space", "chunk"))
def _log_prob_chunk(model, params, space, prompt_P, start, chunk):
    """Log-probs of the V * chunk sequences whose first T-1 tokens ("stems") are stems start..start+chunk-1.

    One forward pass per stem gives the conditionals at every position, so the last token is free.
    """
    V, T = space.vocab_size, space.max_len
    stem_C = start + jnp.arange(chunk, dtype=start.dtype)
    seq_CV = stem_C[:, None] * V + jnp.arange(V, dtype=start.dtype)[None]
    tokens_NT = space.tokens(seq_CV.reshape(-1))
    lengths_N, valid_N = space.lengths_and_valid(tokens_NT)
    stems_CT = tokens_NT.reshape(chunk, V, T)[:, 0, :-1]
    inputs_CS = jnp.concatenate([jnp.broadcast_to(prompt_P, (chunk, prompt_P.shape[0])), stems_CT], axis=1)
    P = prompt_P.shape[0]
    logits_CTV = model.apply(params, inputs_CS, jnp.ones_like(inputs_CS))[:, P - 1 :]
    logits_CTV = logits_CTV.astype(jnp.promote_types(logits_CTV.dtype, jnp.float32))
    logp_CTV = jax.nn.log_softmax(logits_CTV)
    logp_NT = jnp.take_along_axis(jnp.repeat(logp_CTV, V, axis=0), tokens_NT[..., None], axis=-1)[..., 0]
    logp_NT = jnp.where(jnp.arange(T)[None] < lengths_N[:, None], logp_NT, 0.0)
    return jnp.where(valid_N, logp_NT.sum(1), -jnp.inf)


def exact_log_prob(model: ARM, params: Params, max_len: int, prompt_P=None, budget_bytes: int = 256 << 20) -> np.ndarray:
    """log a(y) for every y of the grid V^T (-inf on invalid points) -> numpy array of V^T floats.

    Chunked over stems so device memory stays under `budget_bytes` per chunk whatever the grid size;
    the result alone takes 4 bytes (8 in x64) per sequence. `prompt_P` defaults to [BOS].
    """
    space = SequenceSpace.of(model, max_len)
    prompt_P = jnp.asarray([model.bos_id] if prompt_P is None else prompt_P, jnp.int32)
    num_stems = space.size // space.vocab_size
    chunk = _chunk_size(space, prompt_P.shape[0], budget_bytes)
    dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    out = np.empty(space.size, dtype)
    idx_dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    for start in range(0, num_stems, chunk):
        first = min(start, num_stems - chunk)  # the last chunk overlaps the previous one: one shape, one compile
        logp = _log_prob_chunk(model, params, space, prompt_P, jnp.asarray(first, idx_dtype), chunk)
        out[first * space.vocab_size : (first + chunk) * space.vocab_size] = np.asarray(logp)
    return out


def grid_log_prob(model: ARM, params: Params, max_len: int, prompt_P=None) -> jax.Array:
    """log a(y) over the whole grid in one jitted, differentiable call (small spaces: exact objectives).

    The same values as `exact_log_prob`, as a jax array that `jax.grad` can go through.
    """
    space = SequenceSpace.of(model, max_len)
    prompt_P = jnp.asarray([model.bos_id] if prompt_P is None else prompt_P, jnp.int32)
    start = jnp.asarray(0, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    return _log_prob_chunk(model, params, space, prompt_P, start, space.size // space.vocab_size)


def exact_constraint(space: SequenceSpace, constraint, chunk: int = 1 << 16) -> np.ndarray:
    """b(y) on every grid point (False on invalid points) -> bool numpy array of V^T."""
    out = np.zeros(space.size, bool)
    for start in range(0, space.size, chunk):
        index = np.arange(start, min(start + chunk, space.size))
        tokens_NT = space.tokens(index)
        lengths_N, valid_N = space.lengths_and_valid(tokens_NT)
        out[index] = np.asarray(constraint(np.asarray(tokens_NT), np.asarray(lengths_N))) & np.asarray(valid_N)
    return out


class ExactQuantities(NamedTuple):
    """Every quantity of the paper for (a, a', b), exactly. Logs are natural; KLs in nats."""

    log_z: float  # log Z = log AR_a
    log_ar: float  # log AR_{a'}
    kl_g_a: float  # = -log Z
    kl_g_a2: float
    kl_g_g2: float
    kl_g2_g: float
    tv_g_g2: float

    @property
    def z(self) -> float:
        return float(np.exp(self.log_z))

    @property
    def ar(self) -> float:
        return float(np.exp(self.log_ar))


def _logsumexp(x) -> float:
    return float(jax.scipy.special.logsumexp(jnp.asarray(x)))


def _kl(log_p, log_q) -> float:
    """KL(p||q) = sum_p p (log p - log q) over the support of p (inf where q = 0 < p)."""
    log_p, log_q = jnp.asarray(log_p), jnp.asarray(log_q)
    support = log_p > -jnp.inf
    terms = jnp.where(support, jnp.exp(log_p) * (log_p - jnp.where(support, log_q, 0.0)), 0.0)
    return float(jnp.sum(terms))


def log_gold(log_a, b) -> np.ndarray:
    """log g = log a + log b - log Z over the grid (-inf where b = 0)."""
    log_ab = np.where(b, log_a, -np.inf)
    return log_ab - _logsumexp(log_ab)


def exact_quantities(log_a, log_a2, b) -> ExactQuantities:
    """All exact quantities from log a, log a' and b over one grid. Raises if b is never satisfied."""
    b = np.asarray(b, bool)
    if b.shape != np.shape(log_a) or b.shape != np.shape(log_a2):
        raise ValueError(f"log_a {np.shape(log_a)}, log_a2 {np.shape(log_a2)} and b {b.shape} must share one grid")
    log_ab, log_a2b = np.where(b, log_a, -np.inf), np.where(b, log_a2, -np.inf)
    log_z, log_ar = _logsumexp(log_ab), _logsumexp(log_a2b)
    if not np.isfinite(log_z):
        raise ValueError("the constraint b has zero probability under a: g is undefined (Z = 0)")
    log_g, log_g2 = log_ab - log_z, log_a2b - log_ar
    return ExactQuantities(
        log_z=log_z,
        log_ar=log_ar,
        kl_g_a=_kl(log_g, log_a),
        kl_g_a2=_kl(log_g, log_a2),
        kl_g_g2=_kl(log_g, log_g2),
        kl_g2_g=_kl(log_g2, log_g),
        tv_g_g2=float(0.5 * np.sum(np.abs(np.exp(log_g) - np.exp(log_g2)))),
    )


def prefix_log_marginals(space: SequenceSpace, log_p) -> list[np.ndarray]:
    """Log mass of every prefix under a law over the grid: element t has shape [V^t], t = 0..T."""
    V, T = space.vocab_size, space.max_len
    levels = [np.asarray(log_p, np.float64).reshape((V,) * T)]
    for _ in range(T):
        levels.append(np.asarray(jax.scipy.special.logsumexp(jnp.asarray(levels[-1]), axis=-1)))
    return [levels[T - t].reshape(V**t) for t in range(T + 1)]


def _tabular(space: SequenceSpace, rows: list[np.ndarray]) -> tuple[TabularARM, dict]:
    return TabularARM(space.vocab_size, space.max_len, space.eos_id), {"logits_NV": jnp.asarray(np.concatenate(rows, axis=0))}


def arm_from_law(space: SequenceSpace, log_p) -> tuple[TabularARM, dict]:
    """The tabular ARM whose law is exactly `log_p` (a law over the grid): p(x_t | x_<t) by summing over
    all completions.

    For `log_p = log_gold(log_a, b)` this is the ARM that equals g: it exists for every (a, b) but costs
    the whole grid to build, the point of Theorem 1. Prefixes of zero mass (never visited) get uniform
    conditionals. -> (TabularARM, params).
    """
    V, T = space.vocab_size, space.max_len
    m = prefix_log_marginals(space, log_p)
    rows = []
    for t in range(T):  # prefixes of length t
        child, parent = m[t + 1].reshape(V**t, V), m[t].reshape(V**t, 1)
        with np.errstate(invalid="ignore"):
            rows.append(np.where(np.isfinite(parent), child - parent, 0.0))
    return _tabular(space, rows)


def exact_prefix_values(space: SequenceSpace, log_a, b) -> tuple[TabularARM, dict]:
    """The exact prefix values V(x_<=t) = P_a(b = 1 | x_<=t) as a tabular value head.

    Row u of the head holds logit V(u v) for each next token v (the "R(x_<t)_v" of an auxiliary model);
    with them, log a(v | u) + log sigmoid(logit V(uv)) normalised is exactly g(v | u).
    Prefixes of zero a-mass get logit 0. -> (TabularARM, params) used as a head, not as an ARM.
    """
    V, T = space.vocab_size, space.max_len
    m_ab = prefix_log_marginals(space, np.where(np.asarray(b, bool), np.asarray(log_a, np.float64), -np.inf))
    m_a = prefix_log_marginals(space, log_a)
    rows = []
    for t in range(T):
        with np.errstate(invalid="ignore", divide="ignore"):
            log_v = np.minimum(m_ab[t + 1] - m_a[t + 1], 0.0)  # log V(child) <= 0
            logit = log_v - np.log1p(-np.exp(log_v))
        rows.append(np.where(np.isfinite(m_a[t + 1]), logit, 0.0).reshape(V**t, V))
    return _tabular(space, rows)


def log_rl_ideal(log_a, b, beta: float) -> np.ndarray:
    """The ideal law of KL-regularized RL with reward b and KL coefficient beta: a(y) exp(b(y)/beta) / Z_beta.

    It keeps mass (1 - AR) > 0 on b = 0 for every beta > 0; GUARD's g keeps none. On b = 1 it is
    proportional to a, so rejection sampling with it as proposal returns g exactly.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the KL coefficient), got {beta}")
    log_a = np.asarray(log_a, np.float64)
    log_tilted = log_a + np.where(np.asarray(b, bool), 1.0 / beta, 0.0)
    return log_tilted - _logsumexp(log_tilted)
