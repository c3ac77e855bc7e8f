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


def _logits(x_CD, w_VD, temperature: float):
    logits_CV = jnp.einsum("cd,vd->cv", x_CD, w_VD, preferred_element_type=jnp.float32)
    return logits_CV if temperature == 1.0 else logits_CV / temperature


def _forward(x_ND, w_VD, y_N, temperature: float, chunk: int | None):
    """-> (logp_N, lse_N), one chunk of rows at a time."""
    N = x_ND.shape[0]
    n, C = _layout(N, chunk, w_VD.shape[0])

    def one(_, xs):
        x_CD, y_C = xs
        logits_CV = _logits(x_CD, w_VD, temperature)
        max_C = jnp.max(logits_CV, axis=-1)
        lse_C = max_C + jnp.log(jnp.sum(jnp.exp(logits_CV - max_C[:, None]), axis=-1))
        picked_C = jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]
        return None, (picked_C - lse_C, lse_C)

    logp_nC, lse_nC = jax.lax.scan(one, None, (_chunked(x_ND, n, C), _chunked(y_N, n, C)))[1]
    return logp_nC.reshape(-1)[:N], lse_nC.reshape(-1)[:N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def token_log_prob(x_ND: jax.Array, w_VD: jax.Array, y_N: jax.Array, temperature: float = 1.0,
                   chunk: int | None = None) -> jax.Array:
    """log softmax(x_ND @ w_VD.T / temperature)[n, y_N[n]] -> logp_N (float32).

    x_ND: features (any float dtype); w_VD: output embedding (logits = x @ w.T); y_N: int token ids;
    `chunk` rows at a time (default `default_chunk(V)`). Differentiable in x and w (see the module doc).
    """
    return _forward(x_ND, w_VD, y_N, temperature, chunk)[0]


def _fwd(x_ND, w_VD, y_N, temperature, chunk):
    logp_N, lse_N = _forward(x_ND, w_VD, y_N, temperature, chunk)
    return logp_N, (x_ND, w_VD, y_N, lse_N)


def _bwd(temperature, chunk, residuals, g_N):
    x_ND, w_VD, y_N, lse_N = residuals
    (N, D), V = x_ND.shape, w_VD.shape[0]
    n, C = _layout(N, chunk, V)
    g_N = g_N.astype(jnp.float32) / temperature  # d logits / d (x @ w.T) = 1 / temperature
    xs = (_chunked(x_ND, n, C), _chunked(y_N, n, C), _chunked(lse_N, n, C), _chunked(g_N, n, C))  # padded rows: g = 0

    def one(dwT_DV, xs):
        x_CD, y_C, lse_C, g_C = xs
        p_CV = jnp.exp(_logits(x_CD, w_VD, temperature) - lse_C[:, None])
        onehot_CV = (jnp.arange(V)[None, :] == y_C[:, None]).astype(jnp.float32)
        dlogits_CV = (g_C[:, None] * (onehot_CV - p_CV)).astype(w_VD.dtype)
        dx_CD = jnp.einsum("cv,vd->cd", dlogits_CV, w_VD, preferred_element_type=jnp.float32)
        dwT_DV = dwT_DV + jnp.einsum("cd,cv->dv", x_CD.astype(w_VD.dtype), dlogits_CV, preferred_element_type=jnp.float32)
        return dwT_DV, dx_CD

    dwT_DV, dx_nCD = jax.lax.scan(one, jnp.zeros((D, V), jnp.float32), xs)
    return dx_nCD.reshape(-1, D)[:N].astype(x_ND.dtype), dwT_DV.T.astype(w_VD.dtype), None


token_log_prob.defvjp(_fwd, _bwd)
