"""DPG: train a policy pi toward g = a·b / Z by distributional policy gradient (Khalifa et al.; GUARD §4).

For samples y ~ q, the gradient of KL(g || pi) is estimated by

    grad = -E_q[(P(y) / (Z q(y)) - pi(y) / q(y)) grad log pi(y)],   P = a·b,

the pi/q term being the baseline of disco v1 (= 1 on-policy, where q = pi). Z-hat is the running
importance-sampling mean of P/q over every sample seen so far, kept in log space in the train state.
With `z_hat="running"` (the default) a step's Z-hat includes its own samples, which
correlates it with their weights: the expected step gradient is off by O(1/N) in direction as well as
size (measured at N = 128 in 4 minibatches, first step, on-policy, 2,000 trials against the exact gradient:
0.41 |grad| away on a tabular toy ARM, 0.50 on a tiny transformer; off-policy from q = a it is unbiased, as
the weights are then b itself). `z_hat="leave_one_batch_out"` gives minibatch m the Z-hat of the earlier
steps and the other minibatches (needs >= 2 minibatches): its weights are then independent of its Z-hat,
and as the baseline term has mean 0, the expected step gradient is the exact one times the scalar
Z E[1 / Z-hat_-m] >= 1. The direction is unbiased (tests/test_reliability.py); the scale is large and noisy
while few samples are seen and the policy is far from g (3.0 and 6.2 at the first step above) and tends to
1 as samples accumulate (Adam is insensitive to a common scale).
The metrics `steps_without_b` and
`no_b_warning` (1 after `warn_after` steps in a row without a sample satisfying b, with a RuntimeWarning)
flag a run that carries on while Z-hat only decays.
Samples with b = 0 (log P = -inf) get weight 0, never NaN. On-policy, q is the current policy; off-policy
q is a frozen proposal (e.g. a CAP-prompted a, or an SFT model) replaced by pi whenever the estimated
KL(g || pi) beats KL(g || q), checked every `swap_every` steps. The step right after a swap samples pi itself, so
it takes the on-policy update (exact; `DPG.q_is_policy`); its two KL estimates are then equal, so it never swaps.
`n_samples` per update are drawn and
differentiated in minibatches with gradient accumulation, so memory is bounded by the minibatch. Only the
samples with b = 1 are scored under a (`DPG.log_P`): P = a·b is 0 on the others whatever a says, and at the
acceptance rates GUARD is for (a few percent) that skips most of a teacher-forced pass over the step's samples.
The gradient pass (`dpg_gradient`) takes the rows sorted by length in groups cut to a few widths, so padding
after EOS costs no layer work, and on-policy takes log pi's value from the sampler (no head matmul forward).
The update sees only the Z-hat part of the state and the policy's own (unpadded) prompt, so on- and off-policy DPG
of one model and optimizer, whatever q's prompt, compile two update programs between them.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guard_jax.lm import LM, common_prompt_length
from guard_jax.models.base import ARM
from guard_jax.parallel import check_divisible, shard_params, split_batch
from guard_jax.sampling import check_finite_logp, log_prob, per_iteration, score
from guard_jax.train.common import (a_params, adam, apply_updates, check_frozen_base, check_split, host_constraint, init_opt_state, jit_step,
                                    repeat_prompt, sample_many, trainable, trainable_value_and_grad)
from guard_jax.train.loop import TrainState


Z_HATS = ("running", "leave_one_batch_out")
UPDATE_EXTRA = ("log_z_sum", "n_seen", "steps_without_b")  # the part of a state's extra the update reads and returns


@dataclasses.dataclass(frozen=True)
class DPGConfig:
    """n_samples per update (the paper: 10,000) in minibatches (the paper: 500); lr 1.41e-5 is the paper's
    (disco's) default for GPT-2/Gemma-size models; toy models need larger."""

    n_samples: int = 10_000
    minibatch: int = 500
    max_new_tokens: int = 30
    learning_rate: float = 1.41e-5
    warmup_steps: int = 0
    on_policy: bool = True
    swap_every: int = 10
    z_hat: str = "running"  # or "leave_one_batch_out" (see the module docstring)
    warn_after: int = 5  # steps in a row without a sample satisfying b before the `no_b_warning` metric is 1

    def __post_init__(self):
        M = check_split(self.n_samples, self.minibatch)
        if self.z_hat not in Z_HATS:
            raise ValueError(f"z_hat must be one of {', '.join(Z_HATS)}, got {self.z_hat!r}")
        if self.z_hat == "leave_one_batch_out" and M < 2:
            raise ValueError(f"z_hat='leave_one_batch_out' needs at least 2 minibatches per step (n_samples // minibatch = {M}); "
                             f"lower minibatch to n_samples // 2 = {self.n_samples // 2} or less")
        if self.warn_after < 1:
            raise ValueError(f"warn_after must be >= 1, got {self.warn_after}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_new_tokens < 1 or self.swap_every < 1:
            raise ValueError(f"max_new_tokens and swap_every must be >= 1, got {self.max_new_tokens}, {self.swap_every}")


class DPG:
    """DPG trainer for the shared loop: the policy pi (params from `init_state`) conditions on `base.prompt`,
    and a = base (its model and params, frozen) defines g = a·b / Z.

    Off-policy (`config.on_policy=False`), q starts as `proposal`, a frozen first proposal with the model of
    `base` (its params and prompt: e.g. `base.with_prefix(cap_prompt)` for CAP, or an SFT model's params;
    default: pi's initial params on base's prompt). The mesh is `base.mesh` (`guard_jax.parallel.make_mesh`
    or `data_mesh`): the state and a's params are sharded by the rules of guard_jax.parallel (replicated on a
    1-D data mesh) and each minibatch is split over the devices for sampling, scoring and the gradient (XLA
    sums the gradients across them). A LoRA `base` (guard_jax.lora.with_lora) trains the adapters only; a is the
    base with its initial (zero-delta) adapters on the policy's own frozen weights, and an off-policy q keeps only
    its adapters."""

    def __init__(self, base: LM, constraint, config: DPGConfig, *, proposal: LM | None = None):
        if proposal is not None:
            if config.on_policy:
                raise ValueError("proposal needs config.on_policy=False (off-policy DPG); on-policy, q is the policy itself")
            if proposal.model != base.model:
                raise ValueError(f"proposal must have the model of base ({base.model}), got {proposal.model}: "
                                 "the policy, a and q share one architecture")
        mesh = base.mesh
        if proposal is not None:
            check_frozen_base(base.params, proposal.params, "proposal.params")
        if mesh is not None:
            check_divisible(config.minibatch, mesh.size, "minibatch")
            base = base.with_params(shard_params(mesh, base.params))
        self.mesh = mesh
        self.base, self.model, self.constraint, self.config = base, base.model, constraint, config
        q = base if proposal is None else proposal
        length = common_prompt_length(base, q)
        (self.prompt, self.mask), (self.q_prompt, self.q_mask) = base.prompt_arrays(1, length), q.prompt_arrays(1, length)
        self.policy_prompt, self.policy_mask = base.prompt_arrays(1)  # the update's: unpadded, so every DPG shares its program
        self.proposal_params = None if proposal is None else trainable(proposal.params)
        self.optimizer = adam(config.learning_rate, config.warmup_steps)

    def init_state(self, params) -> TrainState:
        check_frozen_base(self.base.params, params)
        extra = {"log_z_sum": jnp.asarray(-jnp.inf, jnp.float32), "n_seen": jnp.asarray(0.0, jnp.float32),
                 "steps_without_b": jnp.asarray(0, jnp.int32)}
        if not self.config.on_policy:
            proposal = trainable(params) if self.proposal_params is None else self.proposal_params
            extra |= {"proposal": proposal, "q_prompt": self.q_prompt, "q_mask": self.q_mask}
        state = TrainState(jnp.asarray(0, jnp.int32), params, init_opt_state(self.optimizer, params), extra)
        return shard_params(self.mesh, state)

    def log_P(self, tokens_NT: np.ndarray, lengths_N: np.ndarray, b_N: np.ndarray) -> np.ndarray:
        """log P = log a + log b of each sample -> logP_N (float32): a's teacher-forced log-prob where b holds, -inf
        elsewhere. Only the rows with b = 1 are scored (P = 0 needs no model call), in the batches of
        `score_batches`, so a step with few accepted samples scores a few rows instead of n_samples and at most a
        handful of shapes compile."""
        logP_N = np.full(len(b_N), -np.inf, np.float32)
        keep = np.flatnonzero(b_N)
        start = 0
        for size in score_batches(keep.size, self.config.minibatch, 1 if self.mesh is None else self.mesh.size):
            rows = keep[start : start + size]
            logP_N[rows] = score(self.base, tokens_NT[rows], lengths_N[rows], batch_size=size)
            start += size
        return logP_N

    def q_is_policy(self, state: TrainState) -> bool:
        """Whether an off-policy state's q is the policy itself, as in the step right after a swap (or the first step
        with the default q, the initial policy): the proposal holds the very arrays of the policy's trainable params
        and q's prompt equals the policy's. Then the step is on-policy exactly (its samples come from pi), so `step`
        takes the on-policy update (log pi's value from the sampler, no head forward). Params are compared by
        identity: a restored or copied state takes the general path."""
        if self.config.on_policy:
            return True
        mine, q = jax.tree.leaves(trainable(state.params)), jax.tree.leaves(state.extra["proposal"])
        same_prompt = all(np.array_equal(np.asarray(state.extra[k]), np.asarray(v)) for k, v in (("q_prompt", self.prompt), ("q_mask", self.mask)))
        return same_prompt and len(mine) == len(q) and all(x is y for x, y in zip(mine, q))

    def step(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        c = self.config
        M = c.n_samples // c.minibatch
        if c.on_policy:
            q_params, q_prompt, q_mask = state.params, self.prompt, self.mask
        else:
            q_params, q_prompt, q_mask = a_params(state.extra["proposal"], state.params), state.extra["q_prompt"], state.extra["q_mask"]
        tokens, lengths, logq = sample_many(key, self.model, q_params, q_prompt, q_mask, M, c.minibatch, c.max_new_tokens, self.mesh)
        check_finite_logp(logq, f"DPG step {int(state.step)}: samples of the {'policy' if c.on_policy else 'proposal q'}")
        tokens_NT, lengths_N = np.asarray(tokens), np.asarray(lengths)
        b = host_constraint(self.constraint, tokens_NT, lengths_N)
        if not b.any() and float(state.extra["n_seen"]) == 0.0:
            raise ValueError(f"no sample of the proposal satisfied the constraint in the first DPG step ({c.n_samples} samples): "
                             "Z-hat = 0 gives no gradient. Warm-start the policy (SFT or a CAP proposal) or raise n_samples.")
        logP_N = self.log_P(tokens_NT, lengths_N, b)
        T = c.max_new_tokens
        update_state = state._replace(extra={k: state.extra[k] for k in UPDATE_EXTRA})
        new, metrics = _update(update_state, self.policy_prompt, self.policy_mask, tokens.reshape(M, c.minibatch, T),
                               lengths.reshape(M, c.minibatch), logq.reshape(M, c.minibatch), jnp.asarray(logP_N).reshape(M, c.minibatch),
                               jnp.asarray(b).reshape(M, c.minibatch), model=self.model, optimizer=self.optimizer, mesh=self.mesh,
                               leave_one_out=c.z_hat == "leave_one_batch_out", on_policy=c.on_policy or self.q_is_policy(state))
        state = new._replace(extra=state.extra | new.extra)
        metrics["samples"] = c.n_samples
        without_b = 0 if b.any() else int(state.extra["steps_without_b"]) + 1
        state = state._replace(extra=state.extra | {"steps_without_b": jnp.asarray(without_b, jnp.int32)})
        metrics["steps_without_b"] = float(without_b)
        metrics["no_b_warning"] = float(without_b >= c.warn_after)
        if without_b == c.warn_after:
            warnings.warn(f"DPG step {int(state.step) - 1}: no sample satisfied the constraint in the last {without_b} steps "
                          f"({without_b * c.n_samples:,} samples); Z-hat only decays and the gradient is the baseline's. "
                          f"Warm-start the policy, use a proposal closer to g, or raise n_samples", RuntimeWarning, stacklevel=2)
        if not c.on_policy:
            swap = int(state.step) % c.swap_every == 0 and float(metrics["kl_g_pi"]) < float(metrics["kl_g_q"])
            if swap:
                state = state._replace(extra=state.extra | {"proposal": trainable(state.params), "q_prompt": self.prompt, "q_mask": self.mask})
            metrics["swapped"] = float(swap)
        return state, metrics


def score_batches(n: int, cap: int, multiple: int = 1) -> list[int]:
    """The batch sizes `DPG.log_P` scores n rows in: as many batches of `cap` (the minibatch) as n fills, then the
    rest in the smallest power of two >= 32 that holds it (at most cap), each rounded up to a multiple of `multiple`
    (a mesh's size). At most log2(cap / 32) + 2 shapes compile, and only the last batch has padding rows: 300 rows
    at cap 256 are [256, 64], not [256, 256]."""
    sizes = [cap] * (n // cap)
    if rest := n - sum(sizes):
        size = min(cap, 32)
        while size < rest:
            size *= 2
        sizes.append(min(size, cap))
    return [-(-s // multiple) * multiple for s in sizes]


def dpg_loss(params, model: ARM, prompt_BP, mask_BP, tokens_BT, lengths_B, logq_B, logP_B, log_z, on_policy: bool = False):
    """-mean[(P/(Z q) - pi/q) log pi] on samples of q; its gradient estimates grad KL(g || pi). -> (loss, log pi_B).

    log_z: a scalar or one log Z-hat per row (log_z_B). `on_policy` (q = pi, logq_B the sampler's log-probs under
    these very params): log pi is logq in value (so pi/q = 1) and only its gradient is computed
    (`sampling.log_prob(known_B=)`: no head matmul in the forward pass); equal to the general path to float rounding."""
    logpi_B = log_prob(model, params, prompt_BP, mask_BP, tokens_BT, lengths_B, known_B=logq_B if on_policy else None)[0]
    w_B = jnp.exp(logP_B - log_z - logq_B)  # g / q; 0 where b = 0
    baseline_B = jnp.exp(jax.lax.stop_gradient(logpi_B) - logq_B)  # pi / q
    return -jnp.mean((w_B - baseline_B) * logpi_B), logpi_B


GROUP_ROWS = 64  # rows per gradient group (at most the minibatch)
WIDTHS = 4  # truncation widths per max_new_tokens: the compiled gradient pass holds this many branches


def truncation_widths(max_new_tokens: int) -> tuple[int, ...]:
    """The continuation widths a gradient group is cut to: T j / WIDTHS rounded up to a multiple of 8 (at most T),
    j = 1..WIDTHS, without repeats (T = 30: 8, 16, 24, 30)."""
    T = max_new_tokens
    return tuple(sorted({min(T, -(-T * j // (WIDTHS * 8)) * 8) for j in range(1, WIDTHS + 1)}))


def group_rows(minibatch: int, mesh=None) -> int:
    """Rows per gradient group: the largest divisor of the minibatch that is at most GROUP_ROWS and (on a mesh) a
    multiple of its size; the minibatch itself when it has none."""
    n = 1 if mesh is None else mesh.size
    return max([d for d in range(n, min(minibatch, GROUP_ROWS) + 1, n) if minibatch % d == 0 and d % n == 0] or [minibatch])


def minibatch_log_z(log_z_sum, n_seen, logw_MB, leave_one_out: bool):
    """log Z-hat for each of M minibatches of importance weights logw_MB = log P - log q, given the running
    log-sum `log_z_sum` of the n_seen weights of earlier steps -> (log_z_M, new log_z_sum, new n_seen).

    "running" (leave_one_out=False): every minibatch uses the mean over all weights so far, this step's
    included. Leave-one-batch-out: minibatch m uses the mean over the earlier steps and the other
    minibatches, so its weights are independent of its Z-hat; where those hold no positive weight
    (log-sum -inf) it falls back to the running mean.
    """
    M, B = logw_MB.shape
    lse_M = jax.scipy.special.logsumexp(logw_MB, axis=1)
    total = jnp.logaddexp(log_z_sum, jax.scipy.special.logsumexp(lse_M))
    n_total = n_seen + M * B
    running = total - jnp.log(n_total)
    if not leave_one_out:
        return jnp.full((M,), running), total, n_total
    # log(exp(total) - exp(lse_m)), computed as the log-sum of everything but m (no cancellation)
    others_M = jnp.stack([jnp.logaddexp(log_z_sum, jax.scipy.special.logsumexp(jnp.where(jnp.arange(M) == m, -jnp.inf, lse_M)))
                          for m in range(M)])
    loo_M = others_M - jnp.log(n_total - B)
    return jnp.where(jnp.isfinite(loo_M), loo_M, running), total, n_total


def dpg_gradient(params, model: ARM, prompt, mask, tokens_MBT, lengths_MB, logq_MB, logP_MB, log_z_M, mesh=None, on_policy: bool = False):
    """The DPG step gradient: the mean over M minibatches of grad dpg_loss with minibatch m's log Z-hat
    log_z_M[m] -> (grads, loss_M, logpi_MB). With a `mesh`, each group of rows is split over its devices.

    As every minibatch has B rows, that mean is the sum over all M B rows divided by M B, whatever rows a
    minibatch holds: the rows (each with its minibatch's log Z-hat) are sorted by length and taken in groups of
    `group_rows(B)` rows, each group cut to the narrowest of `truncation_widths(T)` holding its longest row (a
    `lax.switch` among those widths: one compiled program whatever the lengths), so positions after a group's
    longest row cost no layer or head work. The same gradient to float rounding; loss_M is then the groups'
    mean loss in each of M equal parts (its mean is the step's loss), logpi_MB is in the rows' own order."""
    M, B, T = tokens_MBT.shape
    N, g = M * B, group_rows(B, mesh)
    order_N = jnp.argsort(lengths_MB.reshape(-1), stable=True)
    log_z_MB = jnp.broadcast_to(log_z_M[:, None], (M, B))
    xs = tuple(x.reshape(N, *x.shape[2:])[order_N].reshape(N // g, g, *x.shape[2:])
               for x in (tokens_MBT, lengths_MB, logq_MB, logP_MB, log_z_MB))
    prompt_g, mask_g = repeat_prompt(prompt, mask, g, mesh)
    widths = truncation_widths(T)

    def group(grad_sum, xs):
        p, xs = per_iteration(params, xs)
        tokens_gT, lengths_g, *rest = (split_batch(x, mesh) for x in xs)

        def cut(width):
            return lambda p: trainable_value_and_grad(dpg_loss, p, model, prompt_g, mask_g, tokens_gT[:, :width], lengths_g, *rest,
                                                      on_policy, has_aux=True)

        k = jnp.searchsorted(jnp.asarray(widths), jnp.max(lengths_g))
        (loss, logpi), gr = jax.lax.switch(k, [cut(w) for w in widths], p) if len(widths) > 1 else cut(T)(p)
        return jax.tree.map(jnp.add, grad_sum, gr), (loss, logpi)

    zeros = jax.tree.map(jnp.zeros_like, trainable(params))
    grad_sum, (loss_G, logpi_Gg) = jax.lax.scan(group, zeros, xs)
    logpi_MB = jnp.zeros((N,), logpi_Gg.dtype).at[order_N].set(logpi_Gg.reshape(-1), unique_indices=True).reshape(M, B)
    return jax.tree.map(lambda x: x / loss_G.shape[0], grad_sum), loss_G.reshape(M, -1).mean(1), logpi_MB


@jit_step(("model", "optimizer", "mesh", "leave_one_out", "on_policy"))
def _update(state, prompt, mask, tokens_MBT, lengths_MB, logq_MB, logP_MB, b_MB, *, model, optimizer, mesh=None, leave_one_out=False,
            on_policy=False):
    tokens_MBT, lengths_MB, logq_MB, logP_MB, b_MB = (split_batch(x, mesh, axis=1) for x in (tokens_MBT, lengths_MB, logq_MB, logP_MB, b_MB))
    log_z_M, log_z_sum, n_seen = minibatch_log_z(state.extra["log_z_sum"], state.extra["n_seen"], logP_MB - logq_MB, leave_one_out)
    log_z = log_z_sum - jnp.log(n_seen)
    grads, loss_M, logpi_MB = dpg_gradient(state.params, model, prompt, mask, tokens_MBT, lengths_MB, logq_MB, logP_MB, log_z_M, mesh, on_policy)
    params, opt_state = apply_updates(optimizer, state.params, state.opt_state, grads, mesh)
    w = jnp.exp(logP_MB - logq_MB - log_z)
    finite = jnp.isfinite(logP_MB)
    kl_g = lambda log_r: -log_z + jnp.mean(jnp.where(finite, w * (logP_MB - log_r), 0.0))  # IS estimate of KL(g || r)
    metrics = {
        "loss": jnp.mean(loss_M),
        "log_z": log_z,
        "z": jnp.exp(log_z),
        "ar": jnp.mean(b_MB.astype(jnp.float32)),  # fraction of this step's samples (of q) satisfying b
        "ar_pi": jnp.mean(jnp.exp(logpi_MB - logq_MB) * b_MB),  # AR of pi, by importance sampling
        "kl_g_pi": kl_g(logpi_MB),
        "kl_g_q": kl_g(logq_MB),
        "grad_norm": optax.tree.norm(grads),
    }
    extra = state.extra | {"log_z_sum": log_z_sum, "n_seen": n_seen}
    return TrainState(state.step + 1, params, opt_state, extra), metrics
