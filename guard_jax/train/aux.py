"""Attribute-controlled fine-tuning with an auxiliary prefix-value model (NADO-style, Meng et al. 2024).

A value head R reads a prefix and outputs one logit per next token v, an estimate of
logit P_a(b = 1 | x_<t, v). The proposal it defines is

    q(v | x_<t) ∝ a(v | x_<t) · sigmoid(R(x_<t)_v),

which equals g(v | x_<t) exactly when sigmoid(R) is the true prefix value (see
`guard_jax.exact.exact_prefix_values`): the ARM of Theorem 1's "exists but intractable". The head is trained
by binary cross-entropy on the sequence labels b(y) of base samples, at every position in parallel; a
policy p_theta can then be fine-tuned toward q with the per-token closed-form KL(q(.|x_<t) || p_theta(.|x_<t)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from guard_jax.models.base import ARM


@dataclasses.dataclass(frozen=True)
class AuxProposal:
    """The ARM q ∝ a · sigmoid(R): params = {"base": a's params (frozen), "head": R's params}.

    `head` is any model of the ARM contract whose output size is the base's vocabulary; its outputs are
    read as value logits, not as a distribution.
    """

    base: ARM
    head: ARM

    def __post_init__(self):
        if self.head.vocab_size != self.base.vocab_size:
            raise ValueError(f"head must output one value logit per token of the base vocabulary ({self.base.vocab_size}), "
                             f"got {self.head.vocab_size}")

    vocab_size = property(lambda self: self.base.vocab_size)
    bos_id = property(lambda self: self.base.bos_id)
    eos_id = property(lambda self: self.base.eos_id)
    pad_id = property(lambda self: self.base.pad_id)

    @staticmethod
    def combine(logits_a, value_logits):
        """log a(v|u) + log sigmoid(R_v), normalised over v (float32 or wider).

        A prefix whose every continuation has value 0 is never reached by q; it keeps a's conditionals
        (instead of 0/0) so that log-probs of other sequences stay finite.
        """
        dtype = jnp.promote_types(logits_a.dtype, jnp.float32)
        log_a = jax.nn.log_softmax(logits_a.astype(dtype))
        x = log_a + jax.nn.log_sigmoid(value_logits.astype(dtype))
        z = jax.scipy.special.logsumexp(x, axis=-1, keepdims=True)
        return jnp.where(jnp.isfinite(z), x - jnp.where(jnp.isfinite(z), z, 0.0), log_a)

    def apply(self, params, tokens_BT, mask_BT=None):
        return self.combine(self.base.apply(params["base"], tokens_BT, mask_BT), self.head.apply(params["head"], tokens_BT, mask_BT))

    def init_cache(self, batch_size: int, max_len: int):
        return {"base": self.base.init_cache(batch_size, max_len), "head": self.head.init_cache(batch_size, max_len)}

    def prefill(self, params, tokens_BP, mask_BP, cache):
        la, ca = self.base.prefill(params["base"], tokens_BP, mask_BP, cache["base"])
        lr, cr = self.head.prefill(params["head"], tokens_BP, mask_BP, cache["head"])
        return self.combine(la, lr), {"base": ca, "head": cr}

    def decode(self, params, token_B, cache):
        la, ca = self.base.decode(params["base"], token_B, cache["base"])
        lr, cr = self.head.decode(params["head"], token_B, cache["head"])
        return self.combine(la, lr), {"base": ca, "head": cr}


def _teacher_forced(model: ARM, params, prompt_BP, mask_BP, tokens_BT):
    """Outputs at the positions that predict tokens_BT[:, t] -> [B, T, V] (float32 or wider)."""
    P, T = prompt_BP.shape[1], tokens_BT.shape[1]
    inputs = jnp.concatenate([prompt_BP, tokens_BT[:, :-1]], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([mask_BP, jnp.ones_like(tokens_BT[:, :-1])], axis=1)
    out = model.apply(params, inputs, mask)[:, P - 1 : P - 1 + T]
    return out.astype(jnp.promote_types(out.dtype, jnp.float32))


def _positions_BT(tokens_BT, lengths_B):
    return (jnp.arange(tokens_BT.shape[1])[None] < lengths_B[:, None]).astype(jnp.float32)


def value_bce_loss(head: ARM, head_params, prompt_BP, mask_BP, tokens_BT, lengths_B, labels_B):
    """Mean BCE of sigmoid(R(x_<t)_{y_t}) against the sequence label b(y), over every real position."""
    value_BTV = _teacher_forced(head, head_params, prompt_BP, mask_BP, tokens_BT)
    logit_BT = jnp.take_along_axis(value_BTV, tokens_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    y_B1 = labels_B.astype(logit_BT.dtype)[:, None]
    bce_BT = -(y_B1 * jax.nn.log_sigmoid(logit_BT) + (1 - y_B1) * jax.nn.log_sigmoid(-logit_BT))
    w_BT = _positions_BT(tokens_BT, lengths_B)
    return jnp.sum(bce_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)


def token_kl_loss(policy: ARM, policy_params, aux: AuxProposal, aux_params, prompt_BP, mask_BP, tokens_BT, lengths_B):
    """Mean over real positions of the closed-form KL(q(.|x_<t) || p_theta(.|x_<t)), q fixed (no gradient)."""
    logq_BTV = jax.lax.stop_gradient(_teacher_forced(aux, aux_params, prompt_BP, mask_BP, tokens_BT))
    logp_BTV = jax.nn.log_softmax(_teacher_forced(policy, policy_params, prompt_BP, mask_BP, tokens_BT))
    kl_BT = jnp.sum(jnp.exp(logq_BTV) * jnp.where(jnp.isfinite(logq_BTV), logq_BTV - logp_BTV, 0.0), axis=-1)
    w_BT = _positions_BT(tokens_BT, lengths_B)
    return jnp.sum(kl_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)
