"""The best ARM with a limited context, exactly: a small ARM family that cannot reach g (Theorem 1 on a toy).

The family: pi(y_t | y_<t) depends only on the position t and the last `context` tokens (context = 0: a
position-wise unigram; context = 1: a position-wise bigram; context >= T - 1: every ARM). Within it,
KL(p || pi) = const - sum_t E_p[log pi_t(y_t | c_t)] splits over (t, c_t), so its minimiser is the
conditional of p given (t, c_t): pi_t(v | c) = p(y_t = v, c_t = c) / p(c_t = c). Nothing is trained.
"""

from __future__ import annotations

import numpy as np

from guard_jax.exact import SequenceSpace, prefix_log_marginals
from guard_jax.models.toy import TabularARM


def best_limited_context_arm(space: SequenceSpace, log_p, context: int) -> tuple[TabularARM, dict]:
    """argmin_pi KL(p || pi) over ARMs that see only the last `context` tokens (and the position).

    `log_p`: a law over the grid (e.g. `log_gold(log_a, b)`). -> (TabularARM, params) over the same space;
    contexts of zero p-mass get uniform conditionals.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0 (the number of previous tokens the ARM sees), got {context}")
    V, T = space.vocab_size, space.max_len
    m = prefix_log_marginals(space, log_p)
    rows = []
    for t in range(T):
        k = min(context, t)
        joint_UV = m[t + 1].reshape(V**t, V)  # log p(prefix u of length t, then v)
        ctx_U = np.arange(V**t) % (V**k)  # the last k tokens of u, as a base-V code
        log_joint_CV = np.full((V**k, V), -np.inf)
        np.logaddexp.at(log_joint_CV, ctx_U, joint_UV)
        norm_C = np.logaddexp.reduce(log_joint_CV, axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):
            cond_CV = np.where(np.isfinite(norm_C), log_joint_CV - norm_C, -np.log(V))
        rows.append(np.maximum(cond_CV, -1e30)[ctx_U])  # finite logits: -1e30 stands for probability 0
    return TabularARM(V, T, space.eos_id), {"logits_NV": np.concatenate(rows, axis=0)}
