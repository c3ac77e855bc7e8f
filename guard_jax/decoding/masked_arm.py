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

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from guard_jax.decoding.gcd import TokenAutomaton
from guard_jax.models.base import ARM


def mask_logits(logits_BV, allowed_BV):
    """log a(v|u) on allowed v (-inf elsewhere), renormalised; rows with nothing allowed keep log a (float32+)."""
    log_a = jax.nn.log_softmax(logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32)))
    masked = jnp.where(allowed_BV, log_a, -jnp.inf)
    return jnp.where(jnp.any(allowed_BV, axis=-1, keepdims=True), jax.nn.log_softmax(masked), log_a)


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
        if S < P:
            raise ValueError(f"MaskedARM.apply got {S} positions, fewer than prompt_len={P}")
        logits_BSV = self.base.apply(params["base"], tokens_BS, mask_BS)

        def step(state_B, token_B):
            return jnp.where(state_B >= 0, mask.advance(jnp.maximum(state_B, 0), token_B), state_B), state_B

        gen_BG = tokens_BS[:, P:].astype(jnp.int32)  # generated tokens seen as inputs (G = S - P)
        last_B, states_GB = jax.lax.scan(step, mask.init_state(B), gen_BG.T)
        states_BG1 = jnp.concatenate([states_GB.T, last_B[:, None]], axis=1)  # state before generated token t
        t_G1 = jnp.arange(S - P + 1)
        allowed_BG1V = jax.vmap(lambda s_B, t: mask.allowed(jnp.maximum(s_B, 0), T - t - 1) & (s_B >= 0)[:, None],
                                in_axes=(1, 0), out_axes=1)(states_BG1, t_G1)
        head = jax.nn.log_softmax(logits_BSV[:, : P - 1].astype(jnp.promote_types(logits_BSV.dtype, jnp.float32)))
        return jnp.concatenate([head, mask_logits(logits_BSV[:, P - 1 :], allowed_BG1V)], axis=1)

    def init_cache(self, batch_size: int, max_len: int):
        return {"base": self.base.init_cache(batch_size, max_len), "state": jnp.zeros((batch_size,), jnp.int32),
                "t": jnp.zeros((), jnp.int32)}

    def grow_cache(self, cache, max_len: int):
        return {**cache, "base": self.base.grow_cache(cache["base"], max_len)}

    def prefill(self, params, tokens_BP, mask_BP, cache):
        if tokens_BP.shape[1] != self.prompt_len:
            raise ValueError(f"MaskedARM was built for prompts of width {self.prompt_len}, got {tokens_BP.shape[1]}")
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


class PrefixBias(Protocol):
    """Host-side next-token weights after a generated prefix (see `HostMaskedARM`)."""

    def log_bias(self, prefixes: list[tuple[int, ...]]) -> np.ndarray:
        """float32 [len(prefixes), V]: log weight added to log a(v | u) after each prefix u (-inf: v not
        allowed); a row of zeros keeps a's conditionals (a prefix after EOS, or one with nothing allowed).
        A bias whose weights are all 0 / -inf may instead say `bitmask_only = True` and give
        `bitmasks(prefixes)`: int32 [len(prefixes), ceil(V/32)] (an empty row: a's conditionals)."""


def bias_logits(logits_BV, bias_BV):
    """log a(v|u) + bias, renormalised; rows where nothing has positive weight keep log a (float32+)."""
    log_a = jax.nn.log_softmax(logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32)))
    w = log_a + bias_BV
    return jnp.where(jnp.any(jnp.isfinite(w), axis=-1, keepdims=True), jax.nn.log_softmax(w), log_a)


@dataclasses.dataclass(frozen=True, eq=False)
class HostMaskedARM(_WrappedARM):
    """a reweighted by a host-side `PrefixBias` of the generated prefix: the law

        q(y_t | y_<t) = a(y_t | y_<t) exp(bias(y_<t)[y_t]) / sum_v a(v | y_<t) exp(bias(y_<t)[v]),

    with the model contract (sample AND score), so masking by a `Grammar` and ASAp's law after N samples
    are LMs every sampler, scorer and estimator takes. The model's work stays jitted; the bias comes back
    from the host through `jax.pure_callback` (one call per decode step for the batch, one per teacher-forced
    pass for all positions). `prompt_len`: the width P of the (left-padded) prompt every call uses;
    `max_new_tokens`: T. Static and hashed by identity (a `jax.jit` static argument); params are a's.
    """

    base: ARM
    bias: PrefixBias
    prompt_len: int
    max_new_tokens: int

    def _host_bias(self, prefixes_fn, shape: tuple[int, ...], *args):
        """The bias of the prefixes `prefixes_fn(*numpy args)` lists, fetched from the host -> float32 [*shape, V].
        A bias with `bitmask_only` (0 / -inf: a mask) comes back as int32 bitmasks, 32 times fewer bytes."""
        V = self.vocab_size
        if getattr(self.bias, "bitmask_only", False):
            W = -(-V // 32)

            def host(*xs):
                return np.asarray(self.bias.bitmasks(prefixes_fn(*xs)), np.int32).reshape(*shape, W)

            bits = jax.pure_callback(host, jax.ShapeDtypeStruct((*shape, W), jnp.int32), *args, vmap_method="sequential")
            v_V = jnp.arange(V)
            allowed = ((bits[..., v_V // 32] >> (v_V % 32)) & 1).astype(bool)
            return jnp.where(allowed, 0.0, -jnp.inf).astype(jnp.float32)

        def host(*xs):
            return np.asarray(self.bias.log_bias(prefixes_fn(*xs)), np.float32).reshape(*shape, V)

        return jax.pure_callback(host, jax.ShapeDtypeStruct((*shape, V), jnp.float32), *args, vmap_method="sequential")

    def _bias_after(self, gen_BT, t):
        """bias after the first t generated tokens of each row -> float32 [B, V] (host callback)."""
        return self._host_bias(lambda gen_BT, t: [tuple(row[: int(t)].tolist()) for row in np.asarray(gen_BT)], (gen_BT.shape[0],), gen_BT, t)

    def apply(self, params, tokens_BS, mask_BS=None):
        """Teacher-forced: positions >= P - 1 (those that predict generated tokens) are reweighted -> logprobs_BSV."""
        P = self.prompt_len
        B, S = tokens_BS.shape
        if S < P:
            raise ValueError(f"HostMaskedARM.apply got {S} positions, fewer than prompt_len={P}")
        logits_BSV = self.base.apply(params, tokens_BS, mask_BS)
        G = S - P
        bias_BG1V = self._host_bias(lambda gen_BG: [tuple(r[:t]) for r in np.asarray(gen_BG).tolist() for t in range(G + 1)], (B, G + 1),
                                    tokens_BS[:, P:].astype(jnp.int32))
        head = jax.nn.log_softmax(logits_BSV[:, : P - 1].astype(jnp.promote_types(logits_BSV.dtype, jnp.float32)))
        return jnp.concatenate([head, bias_logits(logits_BSV[:, P - 1 :], bias_BG1V)], axis=1)

    def init_cache(self, batch_size: int, max_len: int):
        return {"base": self.base.init_cache(batch_size, max_len), "gen": jnp.full((batch_size, self.max_new_tokens), self.pad_id, jnp.int32),
                "t": jnp.zeros((), jnp.int32)}

    def grow_cache(self, cache, max_len: int):
        return {**cache, "base": self.base.grow_cache(cache["base"], max_len)}

    def prefill(self, params, tokens_BP, mask_BP, cache):
        if tokens_BP.shape[1] != self.prompt_len:
            raise ValueError(f"HostMaskedARM was built for prompts of width {self.prompt_len}, got {tokens_BP.shape[1]}")
        logits_BV, base_cache = self.base.prefill(params, tokens_BP, mask_BP, cache["base"])
        cache = {"base": base_cache, "gen": cache["gen"], "t": jnp.zeros((), jnp.int32)}
        return bias_logits(logits_BV, self._bias_after(cache["gen"], cache["t"])), cache

    def decode(self, params, token_B, cache):
        """token_B is generated token number t (cache["t"]); -> log q after the t + 1 generated tokens."""
        logits_BV, base_cache = self.base.decode(params, token_B, cache["base"])
        t = cache["t"]
        gen_BT = jax.lax.dynamic_update_slice(cache["gen"], token_B.astype(jnp.int32)[:, None], (jnp.zeros((), jnp.int32), jnp.minimum(t, self.max_new_tokens - 1).astype(jnp.int32)))
        t = t + 1
        return bias_logits(logits_BV, self._bias_after(gen_BT, t)), {"base": base_cache, "gen": gen_BT, "t": t}
