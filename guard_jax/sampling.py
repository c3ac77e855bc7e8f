"""Jit-compiled, vectorized ancestral sampling and teacher-forced scoring for any guard_jax ARM.

The low-level functions (`sample`, `log_prob`) take a model, params and prompt arrays. On top of them,
the one batch-drawing driver takes an `LM` (guard_jax.lm): `draw_batches` (endless batches; batch i uses
`fold_in(key, i)`), `draw` (N samples) and `score` (teacher-forced log-probs); the GUARD sampler, the
evaluation and the trainers' host loops all draw through it. With `lm.mesh`, each batch is split over the
mesh's devices and the params are sharded by guard_jax.parallel's rules (the same samples as one device, up
to float rounding: see guard_jax.parallel).

Sampling runs `prefill` once, then `lax.scan`s over `max_new_tokens` steps with a `done` mask; tokens after
EOS are `pad_id` and contribute 0 to the log-probs. The cache starts short and grows between scans (every
32 or more new tokens, at most 8 scans; a short run in up to 3 scans of 10 or more, see `segments`), so
early steps attend over fewer slots. Sequence log-probs are returned with the samples, so nothing
downstream re-scores them. Temperature 1 is the model's own law `a`; any other temperature is a different
distribution and must be asked for explicitly.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from guard_jax.lm import LM
from guard_jax.logprob import sequence_first, token_log_prob, token_log_prob_backward_only
from guard_jax.models.base import ARM, Params


class Samples(NamedTuple):
    """tokens_BT: new tokens (pad after the end); lengths_B: new tokens including EOS;
    logp_BT: per-token log-probs under the sampling law (0 after the end); logp_B: their sum."""

    tokens_BT: jax.Array
    lengths_B: jax.Array
    logp_BT: jax.Array
    logp_B: jax.Array


def bos_prompt(model: ARM, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """The unconditional prompt [BOS] for each row: (tokens_B1, mask_B1)."""
    tokens_B1 = jnp.full((batch_size, 1), model.bos_id, jnp.int32)
    return tokens_B1, jnp.ones_like(tokens_B1)


def unpack_bitmask(bitmask_W: jax.Array, vocab_size: int) -> jax.Array:
    """int32 bitmask [..., ceil(V/32)] -> bool allowed [..., V] (jit-able): bit v % 32 of word v // 32 (llguidance's
    layout). Shifts and a reshape, no gather (XLA's CPU gather over V cost more)."""
    bits_W32 = (bitmask_W[..., None] >> jnp.arange(32, dtype=bitmask_W.dtype)) & 1
    return bits_W32.reshape(*bitmask_W.shape[:-1], -1)[..., :vocab_size] != 0


def categorical(u_B: jax.Array, logits_BV: jax.Array, block: int = 128, allowed_BV: jax.Array | None = None,
                allowed_bits_BW: jax.Array | None = None):
    """One draw per row by inverse CDF from one uniform u in (0, 1] per row -> (token_B int32, logp_B), or with
    `allowed_BV` or `allowed_bits_BW` -> (token_B, logq_B, loga_B).

    logp_B is the token's log-probability under softmax(logits_BV) (-inf logits have probability 0), NaN
    for a row whose logits hold a NaN or +inf or are all -inf (see `check_finite_logp`). The
    search is two-level, so no cumulative sum runs over the whole vocabulary (XLA's CPU cumsum over V = 8192
    cost more than a transformer layer): sum the weights in blocks of `block` tokens, find the block where
    the cumulative mass first reaches u * total, then the token inside it. A token of probability zero is
    never returned (rounding can only move a draw to the block's last token of positive weight).

    Two passes over the [B, V] logits: their max, then the block sums of exp(logits - max). The [B, V] weights
    are never stored: the chosen block's `block` weights are recomputed from its logits, and the finiteness
    test reads the total (a NaN or +inf logit makes it NaN or inf, all -inf logits make it NaN), not the logits.

    `allowed_BV` (bool [B, V]): draw from softmax(logits_BV) restricted to the allowed tokens (masked
    decoding's q) in the same two passes: the weights exp(logits - max) give q's block sums (the allowed
    ones) and a's normaliser (all of them). logq_B is the token's log-prob under q (NaN also for a row with
    nothing allowed), loga_B under softmax(logits_BV). With every token allowed, token_B is the unmasked draw's
    and logq_B its logp (bit for bit at V = 300; XLA may fuse the two sums differently at V = 8,192: 1 ulp). Rows whose allowed weights sum under 1e-30 (the best allowed logit more than
    about 69 below the max: they could underflow) are drawn again, exactly, from the allowed logits alone.

    `allowed_bits_BW` (int32 [B, ceil(V/32)], bit v % 32 of word v // 32: llguidance's bitmasks): the same draw
    (the same tokens and log-probs as `allowed_BV` of the unpacked bits) with the bit test inside the block
    sums' pass, so no [B, V] bool is stored; the chosen block's mask and the underflow fallback read the words.
    """
    B, V = logits_BV.shape
    C = min(block, V)
    N = -(-V // C)
    if allowed_bits_BW is not None:
        if allowed_BV is not None or allowed_bits_BW.shape != (B, -(-V // 32)):
            raise ValueError(f"allowed_bits_BW must be int32 [{B}, {-(-V // 32)}] for logits [{B}, {V}], without allowed_BV; "
                             f"got {allowed_bits_BW.shape}")
        if C % 32:  # blocks that are not whole words: unpack
            allowed_BV = unpack_bitmask(allowed_bits_BW, V)
            allowed_bits_BW = None
    logits_BV = logits_BV.astype(jnp.float32)
    max_B = jnp.max(logits_BV, axis=-1)
    logits_BNC = jnp.pad(logits_BV, ((0, 0), (0, N * C - V)), constant_values=-jnp.inf).reshape(B, N, C)
    e_BNC = jnp.exp(logits_BNC - max_B[:, None, None])
    if allowed_BV is None and allowed_bits_BW is None:
        cum_BN = jnp.cumsum(e_BNC.sum(-1), axis=-1)
        finite_B = jnp.isfinite(max_B) & jnp.isfinite(cum_BN[:, -1])
    else:
        if allowed_bits_BW is not None:  # the words of each block, then its bits
            words_BNK = jnp.pad(allowed_bits_BW, ((0, 0), (0, N * C // 32 - allowed_bits_BW.shape[1]))).reshape(B, N, C // 32)
            allowed_BNC = unpack_bitmask(words_BNK, C)
        else:
            allowed_BNC = jnp.pad(allowed_BV, ((0, 0), (0, N * C - V))).reshape(B, N, C)
        cum_BN = jnp.cumsum(jnp.where(allowed_BNC, e_BNC, 0.0).sum(-1), axis=-1)
        all_B = e_BNC.sum((-2, -1))  # a's normaliser
        finite_B = jnp.isfinite(max_B) & jnp.isfinite(all_B) & (cum_BN[:, -1] > 0)
    total_B = cum_BN[:, -1]
    target_B = u_B * total_B
    blk_B = jnp.minimum(jnp.sum(cum_BN < target_B[:, None], axis=-1), N - 1)
    before_B = jnp.where(blk_B > 0, jnp.take_along_axis(cum_BN, jnp.maximum(blk_B - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    logits_BC = jnp.take_along_axis(logits_BNC, blk_B[:, None, None], axis=1)[:, 0]
    if allowed_bits_BW is not None:
        chosen_BC = unpack_bitmask(jnp.take_along_axis(words_BNK, blk_B[:, None, None], axis=1)[:, 0], C)
        logits_BC = jnp.where(chosen_BC, logits_BC, -jnp.inf)
    elif allowed_BV is not None:
        logits_BC = jnp.where(jnp.take_along_axis(allowed_BNC, blk_B[:, None, None], axis=1)[:, 0], logits_BC, -jnp.inf)
    w_BC = jnp.exp(logits_BC - max_B[:, None])
    # the block's last token of positive weight; were the recomputed weights all to round to 0 where the block
    # sum did not, its last token of finite logit (never a -inf one: a block of positive sum has one)
    last_B = C - 1 - jnp.argmax(jnp.where(jnp.any(w_BC > 0, axis=-1, keepdims=True), w_BC > 0, logits_BC > -jnp.inf)[:, ::-1], axis=-1)
    idx_B = jnp.minimum(jnp.sum(jnp.cumsum(w_BC, axis=-1) < (target_B - before_B)[:, None], axis=-1), last_B)
    token_B = (blk_B * C + idx_B).astype(jnp.int32)
    rel_B = jnp.take_along_axis(logits_BC, idx_B[:, None], axis=-1)[:, 0] - max_B  # log weight of the token
    # a row with a NaN or +inf logit, or no finite one, has no law to draw from: its logp is NaN, so the
    # host-side `check_finite_logp` refuses the sample instead of returning a token drawn from garbage
    logp_B = jnp.where(finite_B, rel_B - jnp.log(total_B), jnp.nan)
    if allowed_BV is None and allowed_bits_BW is None:
        return token_B, logp_B
    loga_B = rel_B - jnp.log(all_B)
    small_B = ~(total_B > 1e-30)
    mask = allowed_BV if allowed_bits_BW is None else allowed_bits_BW  # the fallback's operand: the words when given

    def again(drawn, mask):  # rows whose allowed weights could underflow: the unmasked draw on the allowed logits
        allowed_BV = mask if allowed_bits_BW is None else unpack_bitmask(mask, V)
        token2_B, logq2_B = categorical(u_B, jnp.where(allowed_BV, logits_BV, -jnp.inf), block)
        loga2_B = jnp.take_along_axis(logits_BV, token2_B[:, None], axis=-1)[:, 0] - max_B - jnp.log(all_B)
        logq2_B = jnp.where(jnp.isfinite(max_B) & jnp.isfinite(all_B), logq2_B, jnp.nan)  # a NaN anywhere: no law
        return tuple(jnp.where(small_B, new, old) for new, old in zip((token2_B, logq2_B, loga2_B), drawn))

    return jax.lax.cond(jnp.any(small_B), again, lambda drawn, mask: drawn, (token_B, logp_B, loga_B), mask)


def uniforms(key: jax.Array, batch_size: int, max_new_tokens: int) -> jax.Array:
    """All the randomness of one `sample` call: u_TB in (0, 1], one per step and row.

    Drawing it up front makes the samples independent of how the batch is split across devices.
    """
    return 1.0 - jax.random.uniform(key, (max_new_tokens, batch_size))


def segments(max_new_tokens: int, min_len: int = 32, max_segments: int = 8, short: tuple[int, int] = (3, 10)) -> list[int]:
    """Where the sampler grows its cache: the numbers of new tokens that end each scan.

    Equal segments of at least `min_len` steps, at most `max_segments` of them: 512 -> [64, 128, ..., 512],
    128 -> [32, 64, 96, 128]. A shorter run still gets up to short[0] segments of at least short[1] steps:
    30 -> [10, 20, 30], 64 -> [21, 42, 64]; under 20, one scan. Each segment compiles its own scan body (about
    0.5 s more compilation each at 6 layers x 384, 1-2 s at 4 x 128) and copies the cache once when it grows;
    a step attends over the slots filled so far plus at most one segment instead of the whole buffer
    (measured on 2 CPU cores: tiny GPT-2 T=512 per step 1.36 -> 0.75 ms; small GPT-2 T=128 2 -> 4 segments
    5% faster, 8 another 3%; the embedded 4 x 128 model at T=30, B=128 and 512, 1 -> 3 segments 12% faster).
    """
    n = max(1, min(max_segments, max(max_new_tokens // min_len, min(short[0], max_new_tokens // short[1]))))
    return [max_new_tokens * (i + 1) // n for i in range(n)]


def check_segment_ends(max_new_tokens: int, segment_ends=None) -> list[int]:
    """`segment_ends` (default `segments(max_new_tokens)`) checked: increasing, > 0, the last = max_new_tokens."""
    ends = list(segments(max_new_tokens) if segment_ends is None else segment_ends)
    if not ends or ends[-1] != max_new_tokens or any(b <= a for a, b in zip([0] + ends, ends)):
        raise ValueError(f"segment_ends must increase from > 0 to max_new_tokens={max_new_tokens}, got {segment_ends}")
    return ends


def scan_segments(model: ARM, step, carry, xs_T, prompt_len: int, ends: list[int]):
    """`lax.scan(step, carry, xs_T)` in segments ending at `ends`, growing the cache (carry[1], sized for
    prompt_len + ends[0]) to prompt_len + end before each segment -> the stacked per-step outputs."""
    outs, start = [], 0
    for end in ends:
        if outs:
            carry = (carry[0], model.grow_cache(carry[1], prompt_len + end), *carry[2:])
        carry, out = jax.lax.scan(step, carry, jax.tree.map(lambda x: x[start:end], xs_T))
        outs.append(out)
        start = end
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs)


def per_iteration(params, xs):
    """Inside a loop body: (params, xs) through an optimization barrier (an identity) -> (params, xs), so the
    params' uses depend on the iteration's inputs xs. Without it XLA hoists what depends on the params alone out of
    the loop (the all-gathers of sharded weights, their casts or layout copies) and holds the results for the whole
    loop: every layer's at once instead of one layer's while it is used. XLA:CPU, which has no bfloat16 matmul,
    otherwise keeps a float32 copy of every bfloat16 weight through the sampler's decode loop (gemma-2b: 9.3 GiB)."""
    return jax.lax.optimization_barrier((params, xs))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (1.0 samples the model itself), got {temperature}")


def prefill_shared(model: ARM, params: Params, prompt_BP, mask_BP, batch_size: int, max_len: int):
    """`model.prefill` into an empty cache of `max_len` slots for `batch_size` rows -> (logits_BV, cache).

    A one-row prompt (prompt_1P, mask_1P) shared by every row is consumed once, by one row, and its logits and
    cache are broadcast to the batch, wherever the model's cache keeps the batch as the leading axis of each
    array that depends on it (the models of guard_jax do); otherwise, or for a prompt of batch_size rows, the
    prefill runs on every row. A shared prompt of P tokens thus costs one row's prefill instead of B (the CAP
    prompt's 13 tokens at B = 512: about a third of sampling's time before)."""
    if prompt_BP.shape[0] != batch_size:
        one, full = (jax.eval_shape(functools.partial(model.init_cache, b, max_len)) for b in (1, batch_size))
        if jax.tree.structure(one) == jax.tree.structure(full) and all(
                x.shape == y.shape or (x.ndim >= 1 and x.shape == (1, *y.shape[1:])) for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(full))):
            logits_1V, cache = model.prefill(params, prompt_BP, mask_BP, model.init_cache(1, max_len))
            cache = jax.tree.map(lambda x, y: x if x.shape == y.shape else jnp.broadcast_to(x, y.shape), cache, full)
            return jnp.broadcast_to(logits_1V, (batch_size, logits_1V.shape[1])), cache
        prompt_BP, mask_BP = (jnp.repeat(x, batch_size, 0) for x in (prompt_BP, mask_BP))  # a cache not batch-leading
    return model.prefill(params, prompt_BP, mask_BP, model.init_cache(batch_size, max_len))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "batch_size"))
def sample(
    key: jax.Array,
    model: ARM,
    params: Params,
    prompt_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> Samples:
    """Ancestral sampling of `max_new_tokens` tokens after a left-padded prompt, one row per sample; or, with
    `batch_size`, `batch_size` samples after a one-row prompt shared by all (prompt_1P: its prefill runs once)."""
    u_TB = uniforms(key, prompt_BP.shape[0] if batch_size is None else batch_size, max_new_tokens)
    return sample_from_uniforms(u_TB, model, params, prompt_BP, prompt_mask_BP, temperature)


def sample_from_uniforms(
    u_TB: jax.Array, model: ARM, params: Params, prompt_BP: jax.Array, prompt_mask_BP: jax.Array, temperature: float = 1.0,
    segment_ends: tuple[int, ...] | None = None,
) -> Samples:
    """`sample` given its uniforms u_TB (see `uniforms`); T = number of new tokens. Traceable, not jitted.

    `segment_ends` (increasing, last = T; default `segments(T)`) are where the cache grows; they change the
    cost, never the samples. A one-row prompt (prompt_1P) is shared by all B = u_TB.shape[1] rows
    (`prefill_shared`).
    """
    _check_temperature(temperature)
    B, P = u_TB.shape[1], prompt_BP.shape[1]
    if prompt_BP.shape[0] not in (1, B):
        raise ValueError(f"prompt_BP has {prompt_BP.shape[0]} rows for {B} samples: give one row per sample or one shared row")
    ends = check_segment_ends(u_TB.shape[0], segment_ends)
    logits_BV, cache = prefill_shared(model, params, prompt_BP, prompt_mask_BP, B, P + ends[0])

    def draw(logits_BV, u_B, done_B):
        token_B, logp_B = categorical(u_B, logits_BV.astype(jnp.float32) / temperature)
        token_B = jnp.where(done_B, model.pad_id, token_B)
        logp_B = jnp.where(done_B, 0.0, logp_B)
        alive_B = ~done_B
        if model.eos_id is not None:
            done_B = done_B | (token_B == model.eos_id)
        return token_B, logp_B, alive_B, done_B

    def step(carry, u_B):
        p, carry = per_iteration(params, carry)  # no weight casts/copies hoisted out of the decode loop and held
        token_B, cache, done_B = carry
        logits_BV, cache = model.decode(p, token_B, cache)
        token_B, logp_B, alive_B, done_B = draw(logits_BV, u_B, done_B)
        return (token_B, cache, done_B), (token_B, logp_B, alive_B)

    # The first token comes from the prefill's logits; step t decodes token t - 1 and draws token t, so the
    # logits never ride in the scan's carry (XLA copied them every step) and no step decodes the last token
    # for nothing. Step t writes slot P + t - 1: the cache grows at the same sizes P + end as before.
    first = draw(logits_BV, u_TB[0], jnp.zeros((B,), bool))
    rest = scan_segments(model, step, (first[0], cache, first[3]), u_TB[1:], P + 1, [end - 1 for end in ends])
    tokens_TB, logp_TB, alive_TB = (jnp.concatenate([x_B[None], x_TB]) for x_B, x_TB in zip(first[:3], rest))
    return Samples(tokens_TB.T, alive_TB.sum(0).astype(jnp.int32), logp_TB.T, logp_TB.sum(0))


@functools.partial(jax.jit, static_argnames=("model", "temperature"))
def log_prob(
    model: ARM,
    params: Params,
    prompt_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    tokens_BT: jax.Array,
    lengths_B: jax.Array,
    temperature: float = 1.0,
    known_B: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Teacher-forced log-probs of continuations: -> (logp_B, logp_BT); positions >= length count 0.

    A model with `apply_features` (features and output embedding, logits = features @ w.T, soft-capped by
    the model's `logit_softcap` when it has one) is scored by
    `guard_jax.logprob.token_log_prob`, which never holds the B×T×V logits and runs the output head only on
    the positions before each row's length (padding after EOS costs no head matmul); any other through its logits.
    `known_B`: these log-probs, known already (an on-policy trainer's samples, from the sampler under the same
    params): -> (known_B, None), with the gradient of logp_B, and the head runs only in the backward pass
    (`token_log_prob_backward_only`; a model without `apply_features` computes logp_B and returns known_B in value).
    """
    _check_temperature(temperature)
    (B, P), T = prompt_BP.shape, tokens_BT.shape[1]
    inputs_BS = jnp.concatenate([prompt_BP, tokens_BT[:, :-1]], axis=1).astype(jnp.int32)
    mask_BS = jnp.concatenate([prompt_mask_BP, jnp.ones_like(tokens_BT[:, :-1])], axis=1)
    tokens_BT = tokens_BT.astype(jnp.int32)
    valid_BT = jnp.arange(T)[None] < lengths_B[:, None]
    if hasattr(model, "apply_features"):
        x_BSD, w_VD = model.apply_features(params, inputs_BS, mask_BS)
        x_ND = x_BSD[:, P - 1 : P - 1 + T].reshape(B * T, -1)
        order_N, rows = sequence_first(valid_BT.reshape(-1))  # the head runs on the positions inside the continuations
        head = token_log_prob if known_B is None else token_log_prob_backward_only
        logp_N = head(x_ND[order_N], w_VD, tokens_BT.reshape(-1)[order_N], float(temperature), rows=rows,
                      softcap=getattr(model, "logit_softcap", None))
        logp_BT = jnp.zeros_like(logp_N).at[order_N].set(logp_N, unique_indices=True).reshape(B, T)
    else:
        logits_BTV = model.apply(params, inputs_BS, mask_BS)[:, P - 1 : P - 1 + T]
        logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32)) / temperature
        logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), tokens_BT[..., None], axis=-1)[..., 0]
    logp_BT = jnp.where(valid_BT, logp_BT, 0.0)
    if known_B is not None:  # the known value, the gradient of logp_B
        logp_B = logp_BT.sum(-1)
        return jax.lax.stop_gradient(known_B).astype(jnp.float32) + (logp_B - jax.lax.stop_gradient(logp_B)), None
    return logp_BT.sum(-1), logp_BT


class NonFiniteError(FloatingPointError):
    """A model produced NaN/Inf (logits, log-probs or a training metric); the message names the model and where."""


def check_finite_logp(logp_N, where: str) -> None:
    """Raise NonFiniteError when a sequence log-prob is NaN or +inf (its logits were not finite).

    `where` names the model and the call, e.g. "sampling GPT2 (batch 3)". Cheap: one pass over N numbers on
    the host, next to the transfer of the samples that is made anyway.
    """
    logp_N = np.asarray(logp_N)
    bad_N = np.isnan(logp_N) | (logp_N == np.inf)
    if bad_N.any():
        raise NonFiniteError(f"{where}: {int(bad_N.sum())} of {logp_N.size} sequence log-probs are NaN/inf because the model's "
                             f"logits are not finite; no sample is returned. Check the weights for NaN/Inf (guard_jax.models.hf.load "
                             f"names a bad tensor), or lower the learning rate of the run that produced them")


# --- the batch-drawing driver over an LM ----------------------------------------------------------------


class Draws(NamedTuple):
    """N samples of an LM (numpy): tokens_NT (pad after the end), lengths_N (new tokens including EOS),
    logp_N (sequence log-probs under the sampling LM)."""

    tokens_NT: np.ndarray
    lengths_N: np.ndarray
    logp_N: np.ndarray


def _check_positive(**values) -> None:
    for name, value in values.items():
        if int(value) <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _placed(lm: LM, batch_size: int):
    """(params, prompt_BP, mask_BP, split): on lm.mesh, params sharded by the rules of guard_jax.parallel
    and batches split over every device by `split`."""
    prompt_BP, mask_BP = lm.prompt_arrays(batch_size)
    if lm.mesh is None:
        return lm.params, prompt_BP, mask_BP, lambda *arrays: arrays
    from guard_jax import parallel  # imported here: parallel builds on this module's sampler

    parallel.check_divisible(batch_size, lm.mesh.size, "batch_size")
    split = functools.partial(parallel.shard_batch, lm.mesh)
    return (parallel.shard_params(lm.mesh, lm.params), *split(prompt_BP, mask_BP), split)


def draw_batches(key: jax.Array, lm: LM, batch_size: int, max_new_tokens: int) -> Iterator[Draws]:
    """Endless batches of `batch_size` samples of `lm` (batch i uses `fold_in(key, i)`), as numpy `Draws`.

    With `lm.mesh`, batch_size must be divisible by the mesh size; each batch is split over its devices.
    The arguments are checked when it is called, not at the first batch.
    """
    _check_positive(batch_size=batch_size, max_new_tokens=max_new_tokens)
    if lm.mesh is None:  # one prompt row shared by the batch: its prefill runs once (`prefill_shared`)
        (prompt_BP, mask_BP), params = lm.prompt_arrays(1), lm.params
    else:
        params, prompt_BP, mask_BP, _ = _placed(lm, batch_size)

    def batches():
        for i in itertools.count():
            s = sample(jax.random.fold_in(key, i), lm.model, params, prompt_BP, mask_BP, max_new_tokens, batch_size=batch_size)
            logp_B = np.asarray(s.logp_B)
            check_finite_logp(logp_B, f"sampling {type(lm.model).__name__} (batch {i})")
            yield Draws(np.asarray(s.tokens_BT), np.asarray(s.lengths_B), logp_B)

    return batches()


def draw(key: jax.Array, lm: LM, n: int, *, max_new_tokens: int, batch_size: int = 1024, progress: bool = True,
         desc: str = "sampling") -> Draws:
    """`n` ancestral samples of `lm`: the first n rows of `draw_batches(key, lm, batch_size, max_new_tokens)`."""
    _check_positive(n=n, batch_size=batch_size)
    parts, got = [], 0
    with tqdm(total=n, desc=desc, unit="seq", disable=not progress) as bar:
        for d in draw_batches(key, lm, batch_size, max_new_tokens):
            take = min(batch_size, n - got)
            parts.append(Draws(*(x[:take] for x in d)))
            got += take
            bar.update(take)
            if got == n:
                break
    return Draws(*(np.concatenate(p) for p in zip(*parts)))


def score(lm: LM, tokens_NT, lengths_N, *, batch_size: int = 1024) -> np.ndarray:
    """log lm(y) of each row (teacher-forced), in batches of `batch_size` padded to one shape -> logp_N.

    tokens_NT: continuations after lm's prompt (pad after the end); lengths_N: their lengths. With
    `lm.mesh`, each batch is split over its devices (batch_size divisible by the mesh size).
    """
    _check_positive(batch_size=batch_size)
    tokens_NT, lengths_N = np.asarray(tokens_NT), np.asarray(lengths_N)
    if tokens_NT.ndim != 2 or lengths_N.shape != tokens_NT.shape[:1]:
        raise ValueError(f"tokens_NT must be [N, T] and lengths_N [N], got {tokens_NT.shape} and {lengths_N.shape}")
    n = len(tokens_NT)
    if n == 0:
        return np.zeros((0,), np.float32)
    params, prompt_BP, mask_BP, split = _placed(lm, batch_size)
    out = []
    for start in range(0, n, batch_size):
        tokens_BT, lengths_B = tokens_NT[start : start + batch_size], lengths_N[start : start + batch_size]
        pad = batch_size - len(tokens_BT)
        tokens_BT = np.pad(tokens_BT, ((0, pad), (0, 0)), constant_values=lm.model.pad_id)
        lengths_B = np.pad(lengths_B, (0, pad))
        tokens_BT, lengths_B = split(jnp.asarray(tokens_BT, jnp.int32), jnp.asarray(lengths_B, jnp.int32))
        logp_B, _ = log_prob(lm.model, params, prompt_BP, mask_BP, tokens_BT, lengths_B)
        out.append(np.asarray(logp_B)[: batch_size - pad])
        check_finite_logp(out[-1], f"scoring with {type(lm.model).__name__} (rows {start}-{start + len(out[-1]) - 1})")
    return np.concatenate(out)
