"""Monte-Carlo evaluation of a proposal a' against the gold distribution g = a·b / Z, as in the paper.

Draw N_a samples of a and N_a' samples of a'; the b-filtered ones are samples of g and g'. Each sample is
scored by the other model (teacher-forced), and every quantity comes with its confidence interval
(see `guard_jax.estimators`). A model with its conditioning prompt is an `LM`; a CAP proposal is the same
model and params as a with a different prompt.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from guard_jax import estimators as E
from guard_jax.constraints import Constraint
from guard_jax.models.base import ARM, Params
from guard_jax.sampling import check_finite_logp, log_prob, sample


class LM(NamedTuple):
    """A model, its params and the prompt it conditions on (prompt_1P, mask_1P: one row, left-padded)."""

    model: ARM
    params: Params
    prompt_1P: jax.Array
    mask_1P: jax.Array

    @classmethod
    def unconditional(cls, model: ARM, params: Params) -> "LM":
        prompt = jnp.asarray([[model.bos_id]], jnp.int32)
        return cls(model, params, prompt, jnp.ones_like(prompt))

    @classmethod
    def from_text(cls, model: ARM, params: Params, tokenizer, text: str = "") -> "LM":
        """Condition on BOS followed by the tokens of `text` (a context, or a CAP prompt plus context)."""
        ids = [model.bos_id] + (tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])
        prompt = jnp.asarray([ids], jnp.int32)
        return cls(model, params, prompt, jnp.ones_like(prompt))

    def prompt(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
        return jnp.repeat(self.prompt_1P, batch_size, 0), jnp.repeat(self.mask_1P, batch_size, 0)


class Draws(NamedTuple):
    """N samples: tokens_NT, lengths_N, logp_N (under the sampling LM)."""

    tokens_NT: np.ndarray
    lengths_N: np.ndarray
    logp_N: np.ndarray


def draw(key: jax.Array, lm: LM, n: int, max_new_tokens: int, batch_size: int = 1024, progress: bool = True, desc: str = "sampling") -> Draws:
    """`n` ancestral samples of `lm`, in batches of `batch_size` (the last batch is trimmed)."""
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"n and batch_size must be > 0, got n={n}, batch_size={batch_size}")
    prompt_BP, mask_BP = lm.prompt(batch_size)
    parts = []
    with tqdm(total=n, desc=desc, unit="seq", disable=not progress) as bar:
        for i, start in enumerate(range(0, n, batch_size)):
            s = sample(jax.random.fold_in(key, i), lm.model, lm.params, prompt_BP, mask_BP, max_new_tokens)
            take = min(batch_size, n - start)
            check_finite_logp(np.asarray(s.logp_B)[:take], f"{desc}: {type(lm.model).__name__} (batch {i})")
            parts.append([np.asarray(x)[:take] for x in (s.tokens_BT, s.lengths_B, s.logp_B)])
            bar.update(take)
    return Draws(*(np.concatenate(p) for p in zip(*parts)))


def score(lm: LM, tokens_NT: np.ndarray, lengths_N: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """log lm(y) for each row, teacher-forced, in batches of `batch_size` (padded to one shape) -> logp_N."""
    n = len(tokens_NT)
    if n == 0:
        return np.zeros((0,), np.float32)
    prompt_BP, mask_BP = lm.prompt(batch_size)
    out = []
    for start in range(0, n, batch_size):
        tok, length = tokens_NT[start : start + batch_size], lengths_N[start : start + batch_size]
        pad = batch_size - len(tok)
        tok = np.pad(tok, ((0, pad), (0, 0)), constant_values=lm.model.pad_id)
        length = np.pad(length, (0, pad))
        logp_B, _ = log_prob(lm.model, lm.params, prompt_BP, mask_BP, jnp.asarray(tok), jnp.asarray(length))
        out.append(np.asarray(logp_B)[: batch_size - pad])
        check_finite_logp(out[-1], f"scoring with {type(lm.model).__name__} (rows {start}-{start + len(out[-1]) - 1})")
    return np.concatenate(out)


def monte_carlo(
    key: jax.Array,
    a: LM,
    a2: LM,
    constraint: Constraint,
    max_new_tokens: int,
    n_a: int,
    n_a2: int,
    batch_size: int = 1024,
    level: float = 0.95,
    progress: bool = True,
) -> dict[str, E.Estimate]:
    """Z, AR_a', AR gain, KL(g||a), KL(g||a'), KL(g||g'), KL(g'||g) with `level` confidence intervals.

    Raises ValueError when fewer than 2 samples of g or of g' were found (raise n_a / n_a2).
    """
    ka, ka2 = jax.random.split(key)
    da = draw(ka, a, n_a, max_new_tokens, batch_size, progress, "sampling a")
    da2 = draw(ka2, a2, n_a2, max_new_tokens, batch_size, progress, "sampling a'")
    ba, ba2 = np.asarray(constraint(da.tokens_NT, da.lengths_N)), np.asarray(constraint(da2.tokens_NT, da2.lengths_N))
    k_a, k_a2 = int(ba.sum()), int(ba2.sum())
    for name, k, n in (("n_a", k_a, n_a), ("n_a2", k_a2, n_a2)):
        if k < 2:
            raise ValueError(f"only {k} of {n} samples satisfied the constraint: raise {name} to estimate with confidence")
    g_tok, g_len = da.tokens_NT[ba], da.lengths_N[ba]
    g2_tok, g2_len = da2.tokens_NT[ba2], da2.lengths_N[ba2]
    logp_a2_G = score(a2, g_tok, g_len, batch_size)
    logp_a_G2 = score(a, g2_tok, g2_len, batch_size)
    z, ar = E.estimate_ar(k_a, n_a, level), E.estimate_ar(k_a2, n_a2, level)
    gain_var = E.log_proportion_var(k_a, n_a) + E.log_proportion_var(k_a2, n_a2)
    log_gain = E.normal_interval(math.log(ar.value / z.value), gain_var, level, n_a + n_a2)
    return {
        "Z": z,
        "AR_a2": ar,
        "AR_gain": E.Estimate(*(math.exp(x) for x in log_gain[:3]), level, n_a + n_a2),
        "KL(g||a)": E.Estimate(-math.log(z.value), -math.log(z.hi), -math.log(max(z.lo, 1e-300)), level, n_a),
        "KL(g||a2)": E.estimate_kl_g_a2(da.logp_N[ba], logp_a2_G, k_a, n_a, level),
        "KL(g||g2)": E.estimate_kl_g_g2(da.logp_N[ba], logp_a2_G, k_a, n_a, k_a2, n_a2, level),
        "KL(g2||g)": E.estimate_kl_g2_g(da2.logp_N[ba2], logp_a_G2, k_a2, n_a2, k_a, n_a, level),
    }
