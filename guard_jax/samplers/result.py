"""The one result type every sampler returns, and the batched draw / score helpers they share.

Cost is counted in *model calls*: one call is one model (a, a′ or a twist head) run over one sequence of
`max_new_tokens` positions, whether it draws the sequence or scores it (teacher-forced). Drawing N sequences
from a′ costs N calls; scoring them under a another N; an SMC run with N particles costs N calls per model it
steps (a′, a, and the twist head when there is one). A model equal to another (a′ is a) is run once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.lm import LM
from guard_jax.sampling import log_prob, sample


class SamplerResult(NamedTuple):
    """What every sampler in `guard_jax.samplers` returns.

    tokens_NT, lengths_N: the N samples (padding after each length). log_weights_N: log importance weights for
    weighted samplers (SMC, AWRS), normalised so that the weights of one run sum to that run's estimate of Z
    (then mean over runs of sum_i w_i f(y_i) estimates sum_y a(y) b(y) f(y) without bias); None for samplers
    whose samples are equally weighted draws of their output law (QRS, IMH). satisfied_N: b(y) per sample
    (weighted samplers may return particles with b = 0, always with weight 0). model_calls: see the module
    docstring. constraint_calls: evaluations of b or of a token-level check (a whole-sequence b(y) counts 1,
    a token mask over V tokens counts V). acceptance_rate: QRS's accepted / drawn, IMH's accepted moves /
    proposed; None for SMC. ess: the effective sample size, (sum w)^2 / sum w^2 for weighted samplers, N for
    unweighted ones. log_z: the method's estimate of log Z (None where it gives none). info: method-specific
    diagnostics (documented by each sampler).
    """

    method: str
    tokens_NT: np.ndarray
    lengths_N: np.ndarray
    log_weights_N: np.ndarray | None
    satisfied_N: np.ndarray
    model_calls: int
    constraint_calls: int
    acceptance_rate: float | None
    ess: float
    log_z: float | None
    info: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return int(len(self.tokens_NT))

    @property
    def calls_per_effective_sample(self) -> float:
        """model_calls / ess (inf when ess = 0)."""
        return float(self.model_calls / self.ess) if self.ess > 0 else float("inf")

    def normalized_weights(self) -> np.ndarray:
        """Self-normalised weights w_N (sum 1); uniform for unweighted samplers."""
        if self.log_weights_N is None:
            return np.full(self.num_samples, 1.0 / max(self.num_samples, 1))
        return np.exp(self.log_weights_N - np.logaddexp.reduce(self.log_weights_N))


def effective_sample_size(log_weights_N) -> float:
    """Kish's ESS (sum w)^2 / sum w^2 of log weights (0 when every weight is 0)."""
    log_w = np.asarray(log_weights_N, np.float64)
    if log_w.size == 0 or not np.any(np.isfinite(log_w)):
        return 0.0
    w = np.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / np.sum(w**2))


def check_positive(**values) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if int(value) != value or int(value) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def batch_rows(n: int, batch_size: int) -> int:
    """The batch shape used for n rows: batch_size, or the power of two >= n when n is smaller (few shapes,
    few compilations)."""
    return min(batch_size, 1 << max(0, int(n) - 1).bit_length())


def draw_sequences(key: jax.Array, lm: LM, n: int, max_new_tokens: int, batch_size: int = 1024
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` ancestral samples of `lm` -> (tokens_NT, lengths_N, logp_N under lm), numpy.

    Batch i uses `fold_in(key, i)` and the shape `batch_rows(n, batch_size)` (the last batch is trimmed), so the
    same arguments give the same samples."""
    check_positive(n=n, batch_size=batch_size, max_new_tokens=max_new_tokens)
    B = batch_rows(n, batch_size)
    prompt_BP, mask_BP = lm.prompt_arrays(B)
    parts = []
    for i, start in enumerate(range(0, n, B)):
        s = sample(jax.random.fold_in(key, i), lm.model, lm.params, prompt_BP, mask_BP, max_new_tokens)
        take = min(B, n - start)
        parts.append([np.asarray(x)[:take] for x in (s.tokens_BT, s.lengths_B, s.logp_B)])
    tokens, lengths, logp = (np.concatenate(p) for p in zip(*parts))
    return tokens, lengths, logp.astype(np.float64)


def score_sequences(lm: LM, tokens_NT, lengths_N, batch_size: int = 1024) -> np.ndarray:
    """log lm(y) per row (teacher-forced, batches padded to one shape) -> logp_N float64."""
    tokens_NT, lengths_N = np.asarray(tokens_NT), np.asarray(lengths_N)
    n = len(tokens_NT)
    if n == 0:
        return np.zeros((0,), np.float64)
    B = batch_rows(n, batch_size)
    prompt_BP, mask_BP = lm.prompt_arrays(B)
    out = []
    for start in range(0, n, B):
        tok, length = tokens_NT[start : start + B], lengths_N[start : start + B]
        pad = B - len(tok)
        tok = np.pad(tok, ((0, pad), (0, 0)), constant_values=lm.model.pad_id)
        logp_B, _ = log_prob(lm.model, lm.params, prompt_BP, mask_BP, jnp.asarray(tok), jnp.asarray(np.pad(length, (0, pad))))
        out.append(np.asarray(logp_B, np.float64)[: B - pad])
    return np.concatenate(out)


def log_target(a: LM, a2: LM, constraint, tokens_NT, lengths_N, logp_a2_N, batch_size: int = 1024
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """log P(y) = log a(y) + log b(y) for draws of a′ whose log a′ is known -> (log_p_N, b_N, model calls).

    Scores under a only when a′ is not a (then log a = log a′ and no call is spent)."""
    b_N = np.asarray(constraint(tokens_NT, lengths_N), bool)
    if a2 is a:
        logp_a_N, calls = np.asarray(logp_a2_N, np.float64), 0
    else:
        logp_a_N, calls = score_sequences(a, tokens_NT, lengths_N, batch_size), len(tokens_NT)
    return np.where(b_N, logp_a_N, -np.inf), b_N, calls
