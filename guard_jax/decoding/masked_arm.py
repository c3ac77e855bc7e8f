"""Masked decoding as an ARM: the law q of `gcd.masked_sample`, with the model contract (sample AND score).

    q(y_t | y_<t) = a(y_t | y_<t) 1[y_t allowed] / sum_{v allowed} a(v | y_<t)

where "allowed" is the length-aware mask of a `TokenAutomaton` (`gcd.TokenAutomaton.allowed`) after the
generated tokens y_<t, with `max_new_tokens - t - 1` tokens left. Wrapping the mask as an ARM lets every
tool that takes an LM (the plain sampler, teacher-forced scoring, the experiments' estimators of
KL(g||q) and AR_q) use masking as a proposal a'. The wrapper is static (hashable, a `jax.jit` static
argument); its params are {"base": a's params, "mask": the TokenAutomaton} (a pytree of arrays).

A prefix where no token is allowed (only after the sequence has ended, or off the automaton) keeps a's
conditionals instead of 0/0, as `train.aux.AuxProposal.combine` does, so log-probs stay finite there.

`HostMaskedARM` is the same contract for masks that live on the host (a `guard_jax.grammars.Grammar`'s
llguidance matchers, ASAp's trie): a `PrefixBias` gives the next-token log weights of a batch of generated
prefixes, fetched by `jax.pure_callback` inside the jitted sampler and scorer. `Asap.as_lm` builds it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
import weakref
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.decoding.gcd import TokenAutomaton
from guard_jax.models.base import ARM
from guard_jax.sampling import unpack_bitmask


def mask_logits(logits_BV, allowed_BV):
    """Logits of the masked law (not normalised; `jax.nn.log_softmax` of them is log q): a's logits on allowed v,
    -inf elsewhere; rows with nothing allowed keep a's logits (float32+)."""
    x_BV = logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32))
    return jnp.where(allowed_BV | ~jnp.any(allowed_BV, axis=-1, keepdims=True), x_BV, -jnp.inf)


def mask_logits_bits(logits_BV, bits_BW):
    """`mask_logits` of the allowed tokens of an int32 bitmask [B, ceil(V/32)] (bit v % 32 of word v // 32): the
    rows with nothing allowed are found on the words, not on the unpacked [B, V] mask (a pass XLA:CPU does
    not fuse into the select)."""
    V = logits_BV.shape[-1]
    x_BV = logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32))
    valid_W = np.clip(V - 32 * np.arange(bits_BW.shape[-1]), 0, 32)  # how many bits of each word are tokens < V
    below_W = np.where(valid_W == 32, -1, (1 << valid_W) - 1).astype(np.int32)
    none_B1 = ~jnp.any((bits_BW & below_W) != 0, axis=-1, keepdims=True)
    return jnp.where(unpack_bitmask(bits_BW, V) | none_B1, x_BV, -jnp.inf)


class _WrappedARM:
    """What the wrappers of a base ARM share: the base's token ids, and prompt_len, max_new_tokens >= 1
    (checked when a dataclass subclass is built)."""

    def __post_init__(self):
        if self.prompt_len < 1 or self.max_new_tokens < 1:
            raise ValueError(f"prompt_len and max_new_tokens must be >= 1, got {self.prompt_len}, {self.max_new_tokens}")

    vocab_size = property(lambda self: self.base.vocab_size)
    bos_id = property(lambda self: self.base.bos_id)
    eos_id = property(lambda self: self.base.eos_id)
    pad_id = property(lambda self: self.base.pad_id)

    def grow_cache(self, cache, max_len: int):
        return {**cache, "base": self.base.grow_cache(cache["base"], max_len)}

    def _check_positions(self, tokens_BS) -> None:
        """Refuse a teacher-forced input narrower than the prompt."""
        if tokens_BS.shape[1] < self.prompt_len:
            raise ValueError(f"{type(self).__name__}.apply got {tokens_BS.shape[1]} positions, fewer than prompt_len={self.prompt_len}")

    def _check_prompt(self, tokens_BP) -> None:
        """Refuse a prompt of another width than the one the wrapper was built for."""
        if tokens_BP.shape[1] != self.prompt_len:
            raise ValueError(f"{type(self).__name__} was built for prompts of width {self.prompt_len}, got {tokens_BP.shape[1]}")

    def _teacher_forced(self, logits_BSV, generated_BGV):
        """The base's log-probs at the prompt's first P - 1 positions joined with the wrapper's `generated_BGV`
        (log-probs at positions >= P - 1) -> logprobs_BSV."""
        head = jax.nn.log_softmax(logits_BSV[:, : self.prompt_len - 1].astype(jnp.promote_types(logits_BSV.dtype, jnp.float32)))
        return jnp.concatenate([head, generated_BGV], axis=1)


@dataclasses.dataclass(frozen=True)
class MaskedARM(_WrappedARM):
    """a masked by a token automaton. `prompt_len`: the width P of the (left-padded) prompt every call uses;
    `max_new_tokens`: T, the length the masks are exact for (as in `masked_sample`)."""

    base: ARM
    prompt_len: int
    max_new_tokens: int

    @staticmethod
    def params_of(base_params, mask: TokenAutomaton) -> dict:
        return {"base": base_params, "mask": mask}

    def apply(self, params, tokens_BS, mask_BS=None):
        """Teacher-forced: positions >= P - 1 (those that predict generated tokens) are masked -> logprobs_BSV."""
        mask: TokenAutomaton = params["mask"]
        P, T = self.prompt_len, self.max_new_tokens
        B, S = tokens_BS.shape
        self._check_positions(tokens_BS)
        logits_BSV = self.base.apply(params["base"], tokens_BS, mask_BS)

        def step(state_B, token_B):
            return jnp.where(state_B >= 0, mask.advance(jnp.maximum(state_B, 0), token_B), state_B), state_B

        gen_BG = tokens_BS[:, P:].astype(jnp.int32)  # generated tokens seen as inputs (G = S - P)
        last_B, states_GB = jax.lax.scan(step, mask.init_state(B), gen_BG.T)
        states_BG1 = jnp.concatenate([states_GB.T, last_B[:, None]], axis=1)  # state before generated token t
        t_G1 = jnp.arange(S - P + 1)
        allowed_BG1V = jax.vmap(lambda s_B, t: mask.allowed(jnp.maximum(s_B, 0), T - t - 1) & (s_B >= 0)[:, None],
                                in_axes=(1, 0), out_axes=1)(states_BG1, t_G1)
        return self._teacher_forced(logits_BSV, jax.nn.log_softmax(mask_logits(logits_BSV[:, P - 1 :], allowed_BG1V)))

    def init_cache(self, batch_size: int, max_len: int):
        return {"base": self.base.init_cache(batch_size, max_len), "state": jnp.zeros((batch_size,), jnp.int32),
                "t": jnp.zeros((), jnp.int32)}

    def prefill(self, params, tokens_BP, mask_BP, cache):
        self._check_prompt(tokens_BP)
        mask: TokenAutomaton = params["mask"]
        logits_BV, base_cache = self.base.prefill(params["base"], tokens_BP, mask_BP, cache["base"])
        state_B = mask.init_state(tokens_BP.shape[0])
        out = mask_logits(logits_BV, mask.allowed(state_B, self.max_new_tokens - 1))
        return out, {"base": base_cache, "state": state_B, "t": jnp.zeros((), jnp.int32)}

    def decode(self, params, token_B, cache):
        mask: TokenAutomaton = params["mask"]
        logits_BV, base_cache = self.base.decode(params["base"], token_B, cache["base"])
        state_B = cache["state"]
        state_B = jnp.where(state_B >= 0, mask.advance(jnp.maximum(state_B, 0), token_B), state_B)
        t = cache["t"] + 1
        allowed_BV = mask.allowed(jnp.maximum(state_B, 0), self.max_new_tokens - t - 1) & (state_B >= 0)[:, None]
        return mask_logits(logits_BV, allowed_BV), {"base": base_cache, "state": state_B, "t": t}


class _HostJobs:
    """Host work started by one callback of a jitted program and collected by a later one, so the device runs what
    lies between them (the model's forward pass) while one host thread computes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._jobs: dict[int, concurrent.futures.Future] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, fn, *args) -> int:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="host-bias")
            job = next(self._ids) % 2**31
            self._jobs[job] = self._pool.submit(fn, *args)
        return job

    def result(self, job: int) -> np.ndarray:
        with self._lock:
            future = self._jobs.pop(job)
        return future.result()


_JOBS = _HostJobs()


class PrefixBias(Protocol):
    """Host-side next-token weights after a generated prefix (see `HostMaskedARM`)."""

    def log_bias(self, prefixes: list[tuple[int, ...]]) -> np.ndarray:
        """float32 [len(prefixes), V]: log weight added to log a(v | u) after each prefix u (-inf: v not
        allowed); a row of zeros keeps a's conditionals (a prefix after EOS, or one with nothing allowed).
        A bias whose weights are all 0 / -inf may instead say `bitmask_only = True` and give
        `bitmasks(prefixes)`: int32 [len(prefixes), ceil(V/32)] (an empty row: a's conditionals)."""


def _written(cache) -> jax.Array:
    """One element of every leaf of a cache the forward pass has written: a value that exists only after the
    pass's cache updates (waiting on it, rather than on the logits, leaves XLA's fusion of the logits, and so
    the samples, bit for bit as without the host bias)."""
    return jnp.stack([jnp.ravel(x)[:1].astype(jnp.float32) for x in jax.tree.leaves(cache)])


def bias_logits(logits_BV, bias_BV):
    """Logits of the reweighted law (not normalised; `jax.nn.log_softmax` of them is log q): a's logits + bias;
    rows where nothing has positive weight keep a's logits (float32+)."""
    x_BV = logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32))
    w_BV = x_BV + bias_BV
    return jnp.where(jnp.any(jnp.isfinite(w_BV), axis=-1, keepdims=True), w_BV, x_BV)


_BIASES: "weakref.WeakValueDictionary[int, PrefixBias]" = weakref.WeakValueDictionary()  # id -> bias, alive while a model holds it
_BIAS_IDS = itertools.count(1)


def _bias_work(bias_id: int, prefixes: list[tuple[int, ...]], shape: tuple[int, ...]) -> np.ndarray:
    """The host side of a `HostMaskedARM` step: the bias of `prefixes` as int32 bitmasks [*shape, W] (a
    `bitmask_only` bias) or float32 [*shape, V]."""
    bias = _BIASES[bias_id]
    if getattr(bias, "bitmask_only", False):
        return np.asarray(bias.bitmasks(prefixes), np.int32).reshape(*shape, -1)
    return np.asarray(bias.log_bias(prefixes), np.float32).reshape(*shape, -1)


@dataclasses.dataclass(frozen=True)
class HostMaskedARM(_WrappedARM):
    """a reweighted by a host-side `PrefixBias` of the generated prefix: the law

        q(y_t | y_<t) = a(y_t | y_<t) exp(bias(y_<t)[y_t]) / sum_v a(v | y_<t) exp(bias(y_<t)[v]),

    with the model contract (sample AND score), so masking by a `Grammar` and ASAp's law after N samples
    are LMs every sampler, scorer and estimator takes. The model's work stays jitted; the bias comes back
    from the host through `jax.pure_callback`: one callback starts the host work for the batch (a decode
    step's prefixes, or every position of a teacher-forced pass) on a host thread before the model's forward
    pass, a second one collects it after, so the two overlap. `prompt_len`: the width P of the (left-padded)
    prompt every call uses; `max_new_tokens`: T.

    Params are `params_of(a's params, bias)`: the bias is found on the host by the id its params carry, so the
    wrapper is static and compares by (base, prompt_len, max_new_tokens) alone, and every HostMaskedARM of
    one base and shape shares one compiled sampler and scorer (masking by a grammar, ASAp's laws after any
    number of samples). `bias` is kept here only so the bias lives as long as the model.
    """

    base: ARM
    bias: PrefixBias = dataclasses.field(compare=False, repr=False)
    prompt_len: int
    max_new_tokens: int

    @staticmethod
    def params_of(base_params, bias: PrefixBias) -> dict:
        """{"base": a's params, "bias": int32 [2] = (the bias's host id, 1 for a `bitmask_only` bias)}."""
        bias_id = next(_BIAS_IDS) % 2**31
        _BIASES[bias_id] = bias
        return {"base": base_params, "bias": jnp.asarray([bias_id, int(bool(getattr(bias, "bitmask_only", False)))], jnp.int32)}

    def _start_bias(self, params, prefixes_fn, shape: tuple[int, ...], passed, *args):
        """Start computing the bias of the prefixes `prefixes_fn(*numpy args)` lists on a host thread -> (job, passed).

        `passed` comes back unchanged: what consumes it (the model's forward pass) cannot start before the host
        work has, so the two run at the same time; `_finish_bias` waits for the result."""

        def start(bias_2, passed, *xs):
            xs = [np.array(x) for x in xs]  # copies: the callback's buffers are not ours after it returns
            return np.int32(_JOBS.submit(lambda: _bias_work(int(bias_2[0]), prefixes_fn(*xs), shape))), passed

        out = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct(passed.shape, passed.dtype))
        return jax.pure_callback(start, out, params["bias"], passed, *args, vmap_method="sequential")

    def _finish_bias(self, params, job, shape: tuple[int, ...], after, logits=None):
        """The bias of `job` -> float32 [*shape, V], fetched once `after` (an output of the forward pass) exists. A
        `bitmask_only` bias (0 / -inf: a mask) comes back as int32 bitmasks, 32 times fewer bytes. With a decode
        step's `logits` [*shape, V]: q's logits (`mask_logits` of the mask, or `bias_logits`) instead,
        so a mask never becomes a float bias."""
        V = self.vocab_size
        wait = lambda job, after: _JOBS.result(int(job))

        def bits(job, logits):
            bits_W = jax.pure_callback(wait, jax.ShapeDtypeStruct((*shape, -(-V // 32)), jnp.int32), job, after, vmap_method="sequential")
            if logits is not None:
                return mask_logits_bits(logits, bits_W)
            return jnp.where(unpack_bitmask(bits_W, V), 0.0, -jnp.inf).astype(jnp.float32)

        def floats(job, logits):
            bias = jax.pure_callback(wait, jax.ShapeDtypeStruct((*shape, V), jnp.float32), job, after, vmap_method="sequential")
            return bias if logits is None else bias_logits(logits, bias)

        return jax.lax.cond(params["bias"][1] == 1, bits, floats, job, logits)

    @staticmethod
    def _prefixes_after(gen_BT, t):
        return [tuple(row[: int(t)].tolist()) for row in gen_BT]

    def apply(self, params, tokens_BS, mask_BS=None):
        """Teacher-forced: positions >= P - 1 (those that predict generated tokens) are reweighted -> logprobs_BSV."""
        P = self.prompt_len
        B, S = tokens_BS.shape
        self._check_positions(tokens_BS)
        G = S - P
        job, tokens_BS = self._start_bias(params, lambda gen_BG: [tuple(r[:t]) for r in gen_BG.tolist() for t in range(G + 1)],
                                          (B, G + 1), tokens_BS, tokens_BS[:, P:].astype(jnp.int32))
        logits_BSV = self.base.apply(params["base"], tokens_BS, mask_BS)  # while the host computes the bias
        bias_BG1V = self._finish_bias(params, job, (B, G + 1), logits_BSV[:1, -1, :1])
        return self._teacher_forced(logits_BSV, jax.nn.log_softmax(bias_logits(logits_BSV[:, P - 1 :], bias_BG1V)))

    def init_cache(self, batch_size: int, max_len: int):
        return {"base": self.base.init_cache(batch_size, max_len), "gen": jnp.full((batch_size, self.max_new_tokens), self.pad_id, jnp.int32),
                "t": jnp.zeros((), jnp.int32)}

    def prefill(self, params, tokens_BP, mask_BP, cache):
        self._check_prompt(tokens_BP)
        B = tokens_BP.shape[0]
        t = jnp.zeros((), jnp.int32)
        job, tokens_BP = self._start_bias(params, self._prefixes_after, (B,), tokens_BP, cache["gen"], t)
        logits_BV, base_cache = self.base.prefill(params["base"], tokens_BP, mask_BP, cache["base"])
        out_BV = self._finish_bias(params, job, (B,), _written(base_cache), logits_BV)
        return out_BV, {"base": base_cache, "gen": cache["gen"], "t": t}

    def decode(self, params, token_B, cache):
        """token_B is generated token number t (cache["t"]); -> q's logits (not normalised) after the t + 1
        generated tokens."""
        t = cache["t"]
        gen_BT = jax.lax.dynamic_update_slice(cache["gen"], token_B.astype(jnp.int32)[:, None], (jnp.zeros((), jnp.int32), jnp.minimum(t, self.max_new_tokens - 1).astype(jnp.int32)))
        t = t + 1
        job, token_B = self._start_bias(params, self._prefixes_after, (token_B.shape[0],), token_B, gen_BT, t)
        logits_BV, base_cache = self.base.decode(params["base"], token_B, cache["base"])  # while the host computes the masks
        out_BV = self._finish_bias(params, job, (token_B.shape[0],), _written(base_cache), logits_BV)
        return out_BV, {"base": base_cache, "gen": gen_BT, "t": t}
