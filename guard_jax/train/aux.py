"""Attribute-controlled fine-tuning with an auxiliary prefix-value model (NADO-style, Meng et al. 2024).

A value head R reads a prefix and outputs one logit per next token v, an estimate of
logit P_a(b = 1 | x_<t, v). The proposal it defines is

    q(v | x_<t) ∝ a(v | x_<t) · sigmoid(R(x_<t)_v),

which equals g(v | x_<t) exactly when sigmoid(R) is the true prefix value (see
`guard_jax.exact.exact_prefix_values`): the ARM of Theorem 1's "exists but intractable". The head is trained
by binary cross-entropy on the sequence labels b(y) of base samples, at every position in parallel; a
policy p_theta can then be fine-tuned toward q with the per-token closed-form KL(q(.|x_<t) || p_theta(.|x_<t)).
`AuxTrainer` does both in the shared training loop, in one of two modes:

- distillation (no corpus): the KL is taken on the base samples' prefixes, loss = BCE + kl_weight · KL;
- attribute-controlled fine-tuning (a `corpus` is given, the method of Meng et al.): the policy minimises

      L(theta) = NLL_corpus(theta) + lambda · mean_t KL(q(.|x_<t) || p_theta(.|x_<t)),  x ~ corpus,

  (lambda = `kl_weight`), while the head keeps learning by BCE on base samples. For a tabular policy the
  minimiser is, prefix by prefix, p(.|u) = (D(.|u) + lambda q(.|u)) / (1 + lambda) with D the corpus's
  conditionals: plain SFT at lambda = 0, q (= g with exact values) as lambda -> infinity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guard_jax.data.packing import batch_indices
from guard_jax.lm import LM
from guard_jax.models import lora
from guard_jax.models.base import ARM
from guard_jax.parallel import shard_params, split_batch
from guard_jax.sampling import check_finite_logp, per_iteration
from guard_jax.train.common import (adam, apply_updates, check_mesh_batch, check_split, host_constraint, jit_step, repeat_prompt,
                                    sample_many)
from guard_jax.train.loop import TrainState
from guard_jax.train.sft import nll_per_token


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

    def grow_cache(self, cache, max_len: int):
        return {"base": self.base.grow_cache(cache["base"], max_len), "head": self.head.grow_cache(cache["head"], max_len)}

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


def value_bce_loss(head: ARM, head_params, prompt_BP, mask_BP, tokens_BT, lengths_B, labels_B, normalizer=None):
    """Mean BCE of sigmoid(R(x_<t)_{y_t}) against the sequence label b(y), over every real position.

    `normalizer`: divide the sum by it instead of this batch's number of real positions (a minibatch's share
    of a larger batch's mean)."""
    value_BTV = _teacher_forced(head, head_params, prompt_BP, mask_BP, tokens_BT)
    logit_BT = jnp.take_along_axis(value_BTV, tokens_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    y_B1 = labels_B.astype(logit_BT.dtype)[:, None]
    bce_BT = -(y_B1 * jax.nn.log_sigmoid(logit_BT) + (1 - y_B1) * jax.nn.log_sigmoid(-logit_BT))
    return _position_mean(bce_BT, tokens_BT, lengths_B, normalizer)


def _position_mean(x_BT, tokens_BT, lengths_B, normalizer=None):
    w_BT = _positions_BT(tokens_BT, lengths_B)
    return jnp.sum(x_BT * w_BT) / (jnp.maximum(jnp.sum(w_BT), 1.0) if normalizer is None else normalizer)


def token_kl_loss(policy: ARM, policy_params, aux: AuxProposal, aux_params, prompt_BP, mask_BP, tokens_BT, lengths_B,
                  normalizer=None):
    """Mean over real positions of the closed-form KL(q(.|x_<t) || p_theta(.|x_<t)), q fixed (no gradient);
    `normalizer` as in `value_bce_loss`."""
    logq_BTV = jax.lax.stop_gradient(_teacher_forced(aux, aux_params, prompt_BP, mask_BP, tokens_BT))
    logp_BTV = jax.nn.log_softmax(_teacher_forced(policy, policy_params, prompt_BP, mask_BP, tokens_BT))
    kl_BT = jnp.sum(jnp.exp(logq_BTV) * jnp.where(jnp.isfinite(logq_BTV), logq_BTV - logp_BTV, 0.0), axis=-1)
    return _position_mean(kl_BT, tokens_BT, lengths_B, normalizer)


def corpus_objective(policy: ARM, policy_params, aux: AuxProposal, aux_params, prompt_BP, mask_BP, tokens_BT, lengths_B,
                     kl_weight):
    """The attribute-controlled fine-tuning loss on corpus rows tokens_BT / lengths_B (continuations of the
    prompt): NLL per token (exactly the SFT loss) + kl_weight · the mean over the same positions of
    KL(q(.|x_<t) || p_theta(.|x_<t)), q = a · sigmoid(R) held fixed. -> (loss, {"nll", "token_kl"})."""
    nll = nll_per_token(policy, policy_params, prompt_BP, mask_BP, tokens_BT, lengths_B)
    kl = token_kl_loss(policy, policy_params, aux, aux_params, prompt_BP, mask_BP, tokens_BT, lengths_B)
    return nll + kl_weight * kl, {"nll": nll, "token_kl": kl}


@dataclasses.dataclass(frozen=True)
class AuxConfig:
    """n_samples: base samples per step (labelled by b, the head's BCE data), processed `minibatch` at a
    time (gradients accumulated: the same update, memory bounded by the minibatch; None = all at once);
    kl_weight: lambda, the weight of the per-token KL toward q (without a corpus, 0 trains the value head
    only); corpus_batch: corpus rows per step when the trainer has a corpus, drawn by (seed, step)."""

    n_samples: int = 256
    max_new_tokens: int = 30
    learning_rate: float = 1e-4
    kl_weight: float = 1.0
    minibatch: int | None = None
    corpus_batch: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n_samples and max_new_tokens must be >= 1, got {self.n_samples}, {self.max_new_tokens}")
        check_split(self.n_samples, self.minibatch or self.n_samples)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.corpus_batch < 1:
            raise ValueError(f"corpus_batch must be >= 1, got {self.corpus_batch}")


class AuxTrainer:
    """Value head R by BCE on labels b(y) of base samples, plus a policy p_theta pulled toward
    q = a · sigmoid(R) by the per-token closed-form KL(q || p_theta): on the same base samples (no corpus),
    or on corpus rows with the corpus NLL (`corpus` = (tokens_NT, lengths_N), continuations of base's
    prompt: attribute-controlled fine-tuning, loss NLL + kl_weight · KL).

    Concurrent updates: each step computes the head's gradient (BCE on this step's base samples) and the
    policy's (on this step's corpus rows, toward q built from the head as it is at the start of the step)
    from the same state, and applies both in one optimizer update. Neither waits for the other, so one
    step costs one backward pass through each model; the policy's target lags the head by one step, which
    Adam's small steps make immaterial. The head learns from base samples, not corpus rows, because its
    target is P_a(b = 1 | prefix): the prefix value under a that makes a · sigmoid(R) equal g.

    State params: {"head": R's params, "policy": p_theta's params} ({"head"} alone when kl_weight = 0 and
    there is no corpus); the base a stays frozen. Both the head and the policy are proposals: q
    (`proposal(state)`, two forward passes per token) and p_theta (one model). Metrics: loss, bce,
    token_kl, ar (fraction of the step's base samples with b = 1), grad_norm, samples (= n_samples base
    samples drawn); with a corpus also nll (the corpus NLL per token).

    `base`: a (its model and params, frozen) and the prompt that a, R, q and p_theta condition on; `head`:
    R's model; `policy`: p_theta's model (default a's). On `base.mesh`, the state and a's params are sharded
    by guard_jax.parallel's rules and each minibatch is split over the devices (minibatch divisible by the
    mesh size).
    """

    def __init__(self, base: LM, head: ARM, constraint, config: AuxConfig, *, policy: ARM | None = None, corpus=None):
        check_mesh_batch(base.mesh, **{"config.minibatch": config.minibatch or config.n_samples})
        self.base, self.mesh = base, base.mesh
        self.aux = AuxProposal(base.model, head)
        self.base_params, self.constraint, self.config = shard_params(base.mesh, base.params), constraint, config
        self.policy = base.model if policy is None else policy
        if self.policy.vocab_size != base.model.vocab_size:
            raise ValueError(f"policy must share the base vocabulary ({base.model.vocab_size}), got {self.policy.vocab_size}")
        self.prompt, self.mask = base.prompt_arrays(1)
        self.optimizer = adam(config.learning_rate)
        self.corpus = None
        if corpus is not None:
            tokens_NT, lengths_N = (np.asarray(x, np.int32) for x in corpus)
            if tokens_NT.ndim != 2 or lengths_N.shape != tokens_NT.shape[:1]:
                raise ValueError(f"corpus must be (tokens_NT [N, T], lengths_N [N]), got {tokens_NT.shape} and {lengths_N.shape}")
            if not config.corpus_batch <= len(tokens_NT):
                raise ValueError(f"config.corpus_batch must be in [1, N={len(tokens_NT)}] (the corpus rows), got {config.corpus_batch}")
            check_mesh_batch(base.mesh, **{"config.corpus_batch": config.corpus_batch})
            self.corpus = (tokens_NT, lengths_N)
            self.corpus_prompt, self.corpus_mask = base.prompt_arrays(config.corpus_batch)

    @property
    def trains_policy(self) -> bool:
        return self.corpus is not None or self.config.kl_weight > 0

    def init_state(self, params) -> TrainState:
        if lora.has_adapters(params):
            raise ValueError("AuxTrainer trains the head (and policy) in full: pass params without LoRA adapters "
                             "(guard_jax.lora.merge the LM first)")
        if "head" not in params or self.trains_policy != ("policy" in params):
            need = '{"head": ..., "policy": ...}' if self.trains_policy else '{"head": ...}'
            raise ValueError(f"params must be {need} (kl_weight={self.config.kl_weight}, "
                             f"corpus={'given' if self.corpus is not None else 'none'}), got keys {sorted(params)}")
        return shard_params(self.mesh, TrainState(jnp.asarray(0, jnp.int32), params, self.optimizer.init(params), {}))

    def proposal(self, state: TrainState) -> LM:
        """q = a · sigmoid(R) as an LM on base's prompt (model `AuxProposal`, params {"base", "head"}), for the
        GUARD sampler or exact evaluation."""
        return dataclasses.replace(self.base, model=self.aux, params={"base": self.base_params, "head": state.params["head"]})

    def policy_lm(self, state: TrainState) -> LM:
        """p_theta as an LM on base's prompt (needs kl_weight > 0: the state holds its params)."""
        if "policy" not in state.params:
            raise ValueError("this AuxTrainer trains no policy (config.kl_weight = 0 and no corpus): use proposal(state), q = a · sigmoid(R)")
        return dataclasses.replace(self.base, model=self.policy, params=state.params["policy"])

    def step(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        c = self.config
        mb = c.minibatch or c.n_samples
        M = c.n_samples // mb
        tokens, lengths, logp = sample_many(key, self.aux.base, self.base_params, self.prompt, self.mask, M, mb, c.max_new_tokens, self.mesh)
        check_finite_logp(logp, f"aux step {int(state.step)}: samples of the base model")
        labels = jnp.asarray(host_constraint(self.constraint, tokens, lengths))
        tokens, lengths, labels = tokens.reshape(M, mb, -1), lengths.reshape(M, mb), labels.reshape(M, mb)
        corpus = None
        if self.corpus is not None:
            idx = batch_indices(len(self.corpus[0]), c.corpus_batch, c.seed, int(state.step))
            corpus = (self.corpus_prompt, self.corpus_mask, jnp.asarray(self.corpus[0][idx]), jnp.asarray(self.corpus[1][idx]))
        state, metrics = _aux_update(state, self.base_params, self.prompt, self.mask, tokens, lengths, labels,
                                     jnp.asarray(c.kl_weight, jnp.float32), corpus, aux=self.aux, policy=self.policy,
                                     optimizer=self.optimizer, mesh=self.mesh)
        return state, metrics | {"ar": jnp.mean(labels.astype(jnp.float32)), "samples": c.n_samples}


@jit_step(("aux", "policy", "optimizer", "mesh"))
def _aux_update(state, base_params, prompt_1P, mask_1P, tokens_MBT, lengths_MB, labels_MB, kl_weight, corpus=None, *, aux, policy,
                optimizer, mesh=None):
    """One update on M minibatches of B base samples: each minibatch's losses are its share of the whole
    batch's position means (divided by the batch's total number of real positions), so the summed
    gradients are those of the whole batch. `corpus` = (prompt_CP, mask_CP, tokens_CT, lengths_C) or None:
    with it the base samples train the head only and the policy's gradient is that of `corpus_objective`
    on the corpus rows, from the same pre-step params (concurrent update). On a `mesh`, every batch is
    split over its devices."""
    tokens_MBT, lengths_MB, labels_MB = (split_batch(x, mesh, axis=1) for x in (tokens_MBT, lengths_MB, labels_MB))
    B = tokens_MBT.shape[1]
    prompt_B, mask_B = repeat_prompt(prompt_1P, mask_1P, B, mesh)
    total = jnp.maximum(jnp.sum(jnp.minimum(lengths_MB, tokens_MBT.shape[2])).astype(jnp.float32), 1.0)

    def loss_fn(params, tokens_BT, lengths_B, labels_B):
        bce = value_bce_loss(aux.head, params["head"], prompt_B, mask_B, tokens_BT, lengths_B, labels_B, total)
        if "policy" not in params or corpus is not None:
            return bce, {"bce": bce, "token_kl": jnp.zeros_like(bce)}
        aux_params = {"base": base_params, "head": params["head"]}
        kl = token_kl_loss(policy, params["policy"], aux, aux_params, prompt_B, mask_B, tokens_BT, lengths_B, total)
        return bce + kl_weight * kl, {"bce": bce, "token_kl": kl}

    def minibatch(grad_sum, xs):
        params, xs = per_iteration(state.params, xs)
        xs = tuple(split_batch(x, mesh) for x in xs)
        (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(params, *xs)
        return jax.tree.map(jnp.add, grad_sum, g), parts | {"loss": loss}

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, parts_M = jax.lax.scan(minibatch, zeros, (tokens_MBT, lengths_MB, labels_MB))
    parts = jax.tree.map(jnp.sum, parts_M)
    loss = parts.pop("loss")
    if corpus is not None:
        corpus = tuple(split_batch(x, mesh) for x in corpus)

        def policy_loss(policy_params):
            return corpus_objective(policy, policy_params, aux, {"base": base_params, "head": state.params["head"]}, *corpus, kl_weight)

        (corpus_loss, corpus_parts), g = jax.value_and_grad(policy_loss, has_aux=True)(state.params["policy"])
        grads = {**grads, "policy": g}
        parts, loss = parts | corpus_parts, loss + corpus_loss
    params, opt_state = apply_updates(optimizer, state.params, state.opt_state, grads, mesh)
    return TrainState(state.step + 1, params, opt_state, state.extra), parts | {"loss": loss, "grad_norm": optax.tree.norm(grads)}
