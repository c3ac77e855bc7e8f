"""Sequential Monte Carlo over tokens toward g = a·b / Z: particles extended by a′, reweighted, resampled.

Every particle is a prefix x_<=t. The intermediate targets are π_t(x_<=t) = a(x_<=t) ψ(x_<=t) 1[alive], with a
twist ψ (1 without one: the bootstrap filter; sigmoid of a value head R(x_<t)_v, `guard_jax.train.aux`, as a
learned twist; `guard_jax.exact.exact_prefix_values` as the exact one) and 1[alive] the prefix information of a
token mask (`guard_jax.decoding.TokenAutomaton`: tokens after which b is unreachable in the tokens left). A step
draws x_t from a′ (restricted to the allowed tokens, or by another `token_step` such as AWRS), multiplies the
weight by

    w_t = a(x_t | x_<t) ψ(x_<=t) / (q(x_t | x_<t) ψ(x_<t)),   q = a′ restricted and renormalised,

and resamples a run's particles (multinomial) when its ESS falls under `ess_threshold` × N. At the end b(y)
replaces the twist: w ← w · b(y) / ψ(y). The loop over tokens is one jitted `lax.scan` over all particles of all
runs (rows of one batch); resampling gathers rows of every model's cache.

Guarantees: the particles with weight > 0 satisfy b (zero weight otherwise). For any twist and proposal with
a′ > 0 where g > 0, each run's Z estimate Ẑ = prod over resampling epochs of the mean weight is unbiased for Z,
and the weighted particles are properly weighted for g: E[sum_i w_i f(y_i)] = sum_y a(y) b(y) f(y), with the
weights of a run summing to its Ẑ (`SamplerResult.log_weights_N`); the self-normalised law tends to g as N
grows. With the exact prefix value as twist and a′ = the twisted proposal a·ψ (`train.aux.AuxProposal` with
the exact head), every incremental weight is 1: the particles are exact samples of g and Ẑ = Z exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.lm import LM
from guard_jax.models.base import ARM, Params
from guard_jax.samplers.result import SamplerResult, check_positive, effective_sample_size
from guard_jax.sampling import categorical

TokenStep = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


class Twist(NamedTuple):
    """A prefix-value head: a model of the ARM contract whose output at prefix u holds, for each next token v,
    a logit of ψ(uv) ≈ P_a(b = 1 | uv) (the value head R of `guard_jax.train.aux`), and its params. It reads the
    same prompt as a (from `AuxTrainer`: `Twist(trainer.aux.head, state.params["head"])`)."""

    model: ARM
    params: Params


def direct_step(key: jax.Array, log_q_BV: jax.Array, allowed_BV: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row from q restricted to the allowed tokens and renormalised.

    -> (token_B, log_mass_B = log q(allowed), checks_B = V: every token's check is read). A token step returns
    its token and log_mass such that E[exp(log_mass) a(x)/q(x) f(x)] = sum_{v allowed} a(v) f(v)."""
    masked_BV = jnp.where(allowed_BV, log_q_BV, -jnp.inf)
    u_B = 1.0 - jax.random.uniform(key, log_q_BV.shape[:1])
    token_B, _ = categorical(u_B, masked_BV)
    log_mass_B = jax.scipy.special.logsumexp(masked_BV, axis=-1)
    return token_B, log_mass_B, jnp.full(token_B.shape, log_q_BV.shape[1], jnp.int32)


def _take(x_BV, token_B):
    return jnp.take_along_axis(x_BV, token_B[:, None], axis=-1)[:, 0]


def _gather_rows(tree, idx_B, B):
    """Rows idx_B of every leaf whose leading axis is the batch (B); other leaves (a cache's write index) kept."""
    return jax.tree.map(lambda x: x[idx_B] if getattr(x, "ndim", 0) >= 1 and x.shape[0] == B else x, tree)


class _Carry(NamedTuple):
    logits: Any  # (a, q, head) logits_BV at the current prefix (q and head None when absent)
    caches: Any
    state_B: jax.Array
    done_B: jax.Array
    tokens_BT: jax.Array
    lengths_B: jax.Array
    log_w_B: jax.Array
    log_psi_B: jax.Array
    log_z_G: jax.Array
    resamples_G: jax.Array
    checks: jax.Array


@functools.partial(jax.jit, static_argnames=("models", "T", "G", "N", "ess_threshold", "token_step"))
def smc_scan(key, models, params, prompts, mask, *, T: int, G: int, N: int, ess_threshold: float, token_step: TokenStep):
    """The particle loop: G runs of N particles over T tokens, one `lax.scan` (traceable, jitted).

    models = (a, a′ or None when a′ is a, twist head or None); params likewise; prompts = ((tokens_BP, mask_BP) of
    a, of a′ or None); mask: a TokenAutomaton or None. -> (tokens_BT, lengths_B, log_w_B, log_psi_B, log_z_G,
    resamples_G, checks, ess_TG) with B = G·N rows, run g = rows g·N .. g·N + N - 1; log_w is the weight since the
    last resampling (the final b(y)/ψ(y) factor not yet applied) and log_z_G the log of the product of mean
    weights at the resamplings."""
    model_a, model_q, model_h = models
    B = G * N
    logits, caches = [], []
    for model, p, prompt in zip(models, params, (prompts[0], prompts[1], prompts[0])):
        if model is None:
            logits.append(None), caches.append(None)
            continue
        cache = model.init_cache(B, prompt[0].shape[1] + T)
        lg, cache = model.prefill(p, prompt[0], prompt[1], cache)
        logits.append(lg), caches.append(cache)
    zeros_B = jnp.zeros((B,), jnp.float32)
    carry = _Carry(tuple(logits), tuple(caches), mask.init_state(B) if mask is not None else jnp.zeros((B,), jnp.int32),
                   jnp.zeros((B,), bool), jnp.full((B, T), model_a.pad_id, jnp.int32), jnp.zeros((B,), jnp.int32),
                   zeros_B, zeros_B, jnp.zeros((G,), jnp.float32), jnp.zeros((G,), jnp.int32), jnp.zeros((), jnp.int32))

    def step(c: _Carry, xs):
        t, key_t = xs
        key_tok, key_res = jax.random.split(key_t)
        lg_a, lg_q, lg_h = c.logits
        log_a_BV = jax.nn.log_softmax(lg_a.astype(jnp.float32))
        log_q_BV = log_a_BV if lg_q is None else jax.nn.log_softmax(lg_q.astype(jnp.float32))
        allowed_BV = mask.allowed(c.state_B, T - t - 1) if mask is not None else jnp.ones(log_q_BV.shape, bool)
        token_B, log_mass_B, checks_B = token_step(key_tok, log_q_BV, allowed_BV)
        log_psi_new_B = c.log_psi_B if lg_h is None else jax.nn.log_sigmoid(_take(lg_h.astype(jnp.float32), token_B))
        inc_B = log_mass_B + _take(log_a_BV, token_B) - _take(log_q_BV, token_B) + log_psi_new_B - c.log_psi_B
        inc_B = jnp.where(jnp.isfinite(c.log_psi_B), inc_B, -jnp.inf)  # a prefix of value 0 keeps weight 0
        done_B = c.done_B
        token_B = jnp.where(done_B, model_a.pad_id, token_B)
        inc_B = jnp.where(done_B, 0.0, inc_B)
        log_psi_B = jnp.where(done_B, c.log_psi_B, log_psi_new_B)
        state_B = c.state_B if mask is None else jnp.where(done_B, c.state_B, mask.advance(c.state_B, token_B))
        lengths_B = c.lengths_B + (~done_B).astype(jnp.int32)
        if model_a.eos_id is not None:
            done_B = done_B | (token_B == model_a.eos_id)
        new_logits, new_caches = [], []
        for model, p, cache in zip(models, params, c.caches):
            if model is None:
                new_logits.append(None), new_caches.append(None)
                continue
            lg, cache = model.decode(p, token_B, cache)
            new_logits.append(lg), new_caches.append(cache)
        tokens_BT = jax.lax.dynamic_update_slice(c.tokens_BT, token_B[:, None], (0, t))
        log_w_B = c.log_w_B + inc_B
        # resample a run when its ESS falls under the threshold (not after the last token: the weights are returned)
        lw_GN = log_w_B.reshape(G, N)
        lse_G = jax.scipy.special.logsumexp(lw_GN, axis=1)
        ess_G = jnp.exp(2 * lse_G - jax.scipy.special.logsumexp(2 * lw_GN, axis=1))
        ess_G = jnp.where(jnp.isfinite(lse_G), ess_G, 0.0)
        do_G = (ess_G < ess_threshold * N) & jnp.isfinite(lse_G) & (t < T - 1)
        pick_NG = jax.random.categorical(key_res, jnp.where(jnp.isfinite(lse_G)[:, None], lw_GN, 0.0), shape=(N, G))
        idx_GN = jnp.where(do_G[:, None], pick_NG.T + (jnp.arange(G) * N)[:, None], jnp.arange(B).reshape(G, N))
        idx_B = idx_GN.reshape(B)
        do_B = jnp.repeat(do_G, N)
        rows = _gather_rows((tuple(new_logits), tuple(new_caches), state_B, done_B, tokens_BT, lengths_B, log_psi_B), idx_B, B)
        new = _Carry(rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], jnp.where(do_B, 0.0, log_w_B[idx_B]), rows[6],
                     c.log_z_G + jnp.where(do_G, lse_G - math.log(N), 0.0), c.resamples_G + do_G.astype(jnp.int32),
                     c.checks + jnp.sum(jnp.where(c.done_B, 0, checks_B)))
        return new, ess_G

    keys_T = jax.random.split(key, T)
    out, ess_TG = jax.lax.scan(step, carry, (jnp.arange(T), keys_T))
    return out.tokens_BT, out.lengths_B, out.log_w_B, out.log_psi_B, out.log_z_G, out.resamples_G, out.checks, ess_TG


def smc(key: jax.Array, a: LM, a2: LM, constraint, num_particles: int, *, max_new_tokens: int, ess_threshold: float = 0.5,
        twist: Twist | None = None, mask=None, num_runs: int = 1, token_step: TokenStep = direct_step,
        method: str = "smc") -> SamplerResult:
    """SMC toward g with proposal a′ = `a2`: `num_runs` independent runs of `num_particles` particles (all rows of
    one batch) over `max_new_tokens` tokens; `twist` (default none: bootstrap), `mask` (a TokenAutomaton giving
    prefix information, default none), `token_step` (default `direct_step`; `guard_jax.samplers.awrs` passes AWRS).

    -> SamplerResult with every particle of every run (run r = rows r·N .. r·N + N - 1), log_weights_N summing to
    each run's Ẑ, log_z = log mean_r Ẑ_r (unbiased for Z before the log), ess over all particles, model calls =
    particles × (a, a′ unless it is a, the head), constraint calls = the token checks (with a mask) + one b(y) per
    particle. info: `log_z_runs`, `resamples` (per run), `ess_by_step` (mean over runs), `num_runs`."""
    check_positive(num_particles=num_particles, max_new_tokens=max_new_tokens, num_runs=num_runs)
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be in [0, 1] (a fraction of num_particles; 0 never resamples), got {ess_threshold}")
    if a2.model.vocab_size != a.model.vocab_size or (twist is not None and twist.model.vocab_size != a.model.vocab_size):
        raise ValueError(f"a2 and twist must share a's vocabulary ({a.model.vocab_size} tokens)")
    N, G = num_particles, num_runs
    B = N * G
    same = a2 is a
    models = (a.model, None if same else a2.model, None if twist is None else twist.model)
    params = (a.params, None if same else a2.params, None if twist is None else twist.params)
    prompts = (a.prompt_arrays(B), None if same else a2.prompt_arrays(B))
    tokens, lengths, log_w, log_psi, log_z_acc, resamples, checks, ess_TG = smc_scan(
        key, models, params, prompts, mask, T=max_new_tokens, G=G, N=N, ess_threshold=float(ess_threshold), token_step=token_step)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    b = np.asarray(constraint(tokens, lengths), bool)
    log_w, log_psi = np.asarray(log_w, np.float64), np.asarray(log_psi, np.float64)
    with np.errstate(invalid="ignore"):
        final = np.where(b & np.isfinite(log_psi) & np.isfinite(log_w), log_w - log_psi, -np.inf)
    final_GN = final.reshape(G, N)
    lse_G = np.logaddexp.reduce(final_GN, axis=1)
    log_z_G = np.asarray(log_z_acc, np.float64) + lse_G - math.log(N)
    with np.errstate(invalid="ignore"):
        log_weights = np.where(np.isfinite(final_GN), final_GN - lse_G[:, None] + log_z_G[:, None], -np.inf).reshape(B)
    log_z = float(np.logaddexp.reduce(log_z_G) - math.log(G))
    calls = B * sum(m is not None for m in models)
    constraint_calls = (int(checks) if mask is not None else 0) + B
    return SamplerResult(
        method, tokens, lengths, log_weights, b, calls, constraint_calls, None, effective_sample_size(log_weights), log_z,
        {"log_z_runs": log_z_G, "resamples": np.asarray(resamples), "ess_by_step": np.asarray(ess_TG).mean(1),
         "num_runs": G, "twist": twist is not None, "mask": mask is not None},
    )
