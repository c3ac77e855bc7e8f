"""Token log-probabilities through a linear output head, in chunks, without the [N, V] logits held whole.

For features x_ND, an output embedding w_VD, a temperature τ and target tokens y_N (logits = x @ w.T / τ),

    logp_n = logits_{n, y_n} - logsumexp_v logits_{n, v}.

`token_log_prob` computes it `chunk` rows at a time and has its own VJP: the backward pass recomputes each
chunk's logits from x and w (one more head matmul) instead of keeping the N×V float32 logits, their
softmax and the scatter of the one-hot cotangent alive between the passes, and forms both gradients,
dx = g (w_y - p @ w) / τ and dw += x^T g (onehot(y) - p) / τ, while the chunk's [chunk, V] block is in
cache. The head gradient is accumulated as dw^T [D, V], so the only transpose is of x (chunk × D), never
of a [chunk, V] block: the log_softmax path's gradient transposed the whole N×V cotangent (XLA's largest op
in the embedded model's gradient pass) and scattered the one-hot into an N×V array of zeros. Measured on
the shared 2-core CPU (embedded model, 128 × 30 tokens, bench_dpg, torch in the same run): forward +
backward 0.67x -> 1.39x PyTorch's, scoring 1.16x -> 2.57x; keeping the softmax instead of recomputing it
(3 head matmuls instead of 4, N×V floats held) measured within noise of this. Values and gradients agree
with log_softmax + take_along_axis up to float rounding (tests/test_logprob.py).
`token_log_prob_backward_only` has the same VJP and the value 0, for log-probs known already (an on-policy
trainer's, from its sampler): its forward pass runs no head matmul, and the backward takes each chunk's
log-sum-exp from the logits it recomputes. With `rows`, only the first `rows` rows are computed, chunk by chunk in a loop of that many chunks:
`sampling.log_prob` puts the positions inside the continuations first (`sequence_first`), so the padding
after EOS (about a quarter of the positions of the embedded model's 30-token samples) costs no head
matmul, forward or backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK_FLOATS = 1 << 21  # one chunk's logits: 8 MB of float32 (V = 8,192 -> 256 rows)


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk: about CHUNK_FLOATS logits, a multiple of 8 rows, at least 8."""
    return max(8, CHUNK_FLOATS // vocab_size // 8 * 8)


def _chunked(x, n: int, C: int):
    """The rows of x, zero-padded to n * C, as [n, C, ...]."""
    pad = n * C - x.shape[0]
    return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(n, C, *x.shape[1:])


def _layout(N: int, chunk: int | None, V: int) -> tuple[int, int]:
    C = min(default_chunk(V) if chunk is None else chunk, N)
    if C < 1:
        raise ValueError(f"chunk must be >= 1 row, got {chunk}")
    return -(-N // C), C


def _logits(x_CD, w_VD, temperature: float, softcap: float | None):
    """-> (logits_CV, dlogits/dz_CV or None): z = x @ w.T, logits = softcap(z) / temperature."""
    z_CV = jnp.einsum("cd,vd->cv", x_CD, w_VD, preferred_element_type=jnp.float32)
    slope_CV = None
    if softcap:
        t_CV = jnp.tanh(z_CV / softcap)
        z_CV, slope_CV = t_CV * softcap, 1.0 - t_CV * t_CV
    return (z_CV if temperature == 1.0 else z_CV / temperature), slope_CV


def _count(rows, N: int, C: int):
    """Chunks to compute: all n of them, or (with a traced `rows`) those holding the first `rows` rows."""
    n = -(-N // C)
    return n if rows is None else jnp.minimum((rows + C - 1) // C, n)


def _forward(x_ND, w_VD, y_N, rows, temperature: float, chunk: int | None, softcap: float | None):
    """-> (logp_N, lse_N), one chunk of rows at a time; with `rows`, rows >= rows are 0 (their chunks skipped)."""
    N = x_ND.shape[0]
    n, C = _layout(N, chunk, w_VD.shape[0])
    x_nCD, y_nC = _chunked(x_ND, n, C), _chunked(y_N, n, C)

    def one(i, out):
        logp_nC, lse_nC = out
        x_CD, y_C = x_nCD[i], y_nC[i]
        logits_CV = _logits(x_CD, w_VD, temperature, softcap)[0]
        max_C = jnp.max(logits_CV, axis=-1)
        lse_C = max_C + jnp.log(jnp.sum(jnp.exp(logits_CV - max_C[:, None]), axis=-1))
        picked_C = jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]
        return logp_nC.at[i].set(picked_C - lse_C), lse_nC.at[i].set(lse_C)

    zeros = jnp.zeros((n, C), jnp.float32)
    logp_nC, lse_nC = jax.lax.fori_loop(0, _count(rows, N, C), one, (zeros, zeros))
    logp_N, lse_N = logp_nC.reshape(-1)[:N], lse_nC.reshape(-1)[:N]
    return (logp_N if rows is None else jnp.where(jnp.arange(N) < rows, logp_N, 0.0)), lse_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _token_log_prob(x_ND, w_VD, y_N, rows, temperature, chunk, softcap):
    return _forward(x_ND, w_VD, y_N, rows, temperature, chunk, softcap)[0]


def token_log_prob(x_ND: jax.Array, w_VD: jax.Array, y_N: jax.Array, temperature: float = 1.0,
                   chunk: int | None = None, rows: jax.Array | None = None, softcap: float | None = None) -> jax.Array:
    """log softmax(softcap(x_ND @ w_VD.T) / temperature)[n, y_N[n]] -> logp_N (float32).

    x_ND: features (any float dtype); w_VD: output embedding (logits = x @ w.T); y_N: int token ids;
    `chunk` rows at a time (default `default_chunk(V)`). `rows` (an int scalar, may be traced): only the
    first `rows` rows are wanted; the others are 0 with zero gradient and chunks holding none of the first
    `rows` are not computed (`log_prob` puts the positions inside the continuations first). Differentiable
    in x and w (see the module doc). `softcap` c (Gemma 2's final logit soft-cap): z -> c tanh(z / c) before
    the temperature; None: no cap.
    """
    return _token_log_prob(x_ND, w_VD, y_N, rows, temperature, chunk, softcap)


def _fwd(x_ND, w_VD, y_N, rows, temperature, chunk, softcap):
    logp_N, lse_N = _forward(x_ND, w_VD, y_N, rows, temperature, chunk, softcap)
    return logp_N, (x_ND, w_VD, y_N, rows, lse_N)


def _bwd(temperature, chunk, softcap, residuals, g_N):
    """The VJP in x and w; with lse_N None (`token_log_prob_backward_only`) each chunk's log-sum-exp is taken
    from its recomputed logits."""
    x_ND, w_VD, y_N, rows, lse_N = residuals
    (N, D), V = x_ND.shape, w_VD.shape[0]
    n, C = _layout(N, chunk, V)
    g_N = g_N.astype(jnp.float32) / temperature  # d logits / d (x @ w.T) = 1 / temperature
    if rows is not None:
        g_N = jnp.where(jnp.arange(N) < rows, g_N, 0.0)  # rows >= rows are the constant 0
    x_nCD, y_nC, g_nC = (_chunked(a, n, C) for a in (x_ND, y_N, g_N))  # padded rows: g = 0
    lse_nC = None if lse_N is None else _chunked(lse_N, n, C)

    def one(i, out):
        dwT_DV, dx_nCD = out
        x_CD, y_C, g_C = x_nCD[i], y_nC[i], g_nC[i]
        logits_CV, slope_CV = _logits(x_CD, w_VD, temperature, softcap)
        if lse_nC is None:
            max_C = jnp.max(logits_CV, axis=-1)
            p_CV = jnp.exp(logits_CV - max_C[:, None])
            p_CV = p_CV / jnp.sum(p_CV, axis=-1, keepdims=True)
        else:
            p_CV = jnp.exp(logits_CV - lse_nC[i][:, None])
        onehot_CV = (jnp.arange(V)[None, :] == y_C[:, None]).astype(jnp.float32)
        dlogits_CV = g_C[:, None] * (onehot_CV - p_CV)
        dlogits_CV = (dlogits_CV if slope_CV is None else dlogits_CV * slope_CV).astype(w_VD.dtype)  # d/dz of the cap
        dx_CD = jnp.einsum("cv,vd->cd", dlogits_CV, w_VD, preferred_element_type=jnp.float32)
        dwT_DV = dwT_DV + jnp.einsum("cd,cv->dv", x_CD.astype(w_VD.dtype), dlogits_CV, preferred_element_type=jnp.float32)
        return dwT_DV, dx_nCD.at[i].set(dx_CD)

    init = (jnp.zeros((D, V), jnp.float32), jnp.zeros((n, C, D), jnp.float32))
    dwT_DV, dx_nCD = jax.lax.fori_loop(0, _count(rows, N, C), one, init)
    return dx_nCD.reshape(-1, D)[:N].astype(x_ND.dtype), dwT_DV.T.astype(w_VD.dtype), None, None


_token_log_prob.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _backward_only(x_ND, w_VD, y_N, rows, temperature, chunk, softcap):
    return jnp.zeros(y_N.shape, jnp.float32)


def _backward_only_fwd(x_ND, w_VD, y_N, rows, temperature, chunk, softcap):
    return jnp.zeros(y_N.shape, jnp.float32), (x_ND, w_VD, y_N, rows, None)


_backward_only.defvjp(_backward_only_fwd, _bwd)


def token_log_prob_backward_only(x_ND: jax.Array, w_VD: jax.Array, y_N: jax.Array, temperature: float = 1.0,
                                 chunk: int | None = None, rows: jax.Array | None = None, softcap: float | None = None) -> jax.Array:
    """0_N in value with the gradient of `token_log_prob` (same arguments): for log-probs whose values are known
    already (an on-policy trainer's samples carry them from the sampler), `known + token_log_prob_backward_only(...)`
    has the known value and the exact gradient while the forward pass runs no head matmul: the head costs three
    [chunk, D] x [D, V] matmuls per chunk (logits recomputed, dx, dw) instead of four."""
    return _backward_only(x_ND, w_VD, y_N, rows, temperature, chunk, softcap)


def sequence_first(valid_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A permutation putting the True rows of valid_N first, in order -> (order_N, number of True rows):
    x_ND[order_N] holds the valid rows first (by prefix sums, no sort)."""
    valid_N = valid_N.astype(bool)
    rows = jnp.sum(valid_N, dtype=jnp.int32)
    dest_N = jnp.where(valid_N, jnp.cumsum(valid_N) - 1, rows + jnp.cumsum(~valid_N) - 1).astype(jnp.int32)
    order_N = jnp.zeros_like(dest_N).at[dest_N].set(jnp.arange(valid_N.shape[0], dtype=jnp.int32), unique_indices=True)
    return order_N, rows
