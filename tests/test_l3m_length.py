"""Length constraints in L3M: exactly on a toy grid (the barrier solution for each mu satisfies E[len] <= / >=
the target and approaches the constrained optimum as mu -> 0), and the experiment's --quick run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from guard_jax.exact import SequenceSpace, exact_log_prob
from guard_jax.models.toy import TabularARM
from guard_jax.train.l3m import barrier_slope, exact_objective


def _toy(x64):
    model = TabularARM(3, 4, eos_id=0)
    space = SequenceSpace.of(model, 4)
    log_d = np.asarray(exact_log_prob(model, model.init(jax.random.PRNGKey(0), scale=1.0), 4))
    lengths_N, valid_N = (np.asarray(x) for x in space.lengths_and_valid(space.tokens(np.arange(space.size))))
    return log_d, lengths_N.astype(np.float64), valid_N & np.isfinite(log_d)


def _constrained_optimum(d_N, len_N, target, side):
    """argmin -E_D[log pi] s.t. E_pi[len] <= target (side "<=") or >= target: by the KKT conditions
    pi = D / (nu + lam * s * len), s = +1 for "<=" and -1 for ">=", with nu normalising and lam >= 0
    making the constraint tight (found by nested root finding)."""
    sgn = 1.0 if side == "<=" else -1.0
    support = d_N > 0

    def law(lam):
        w = lam * sgn * len_N[support]
        lo = -w.min() + 1e-12
        nu = scipy.optimize.brentq(lambda nu: np.sum(d_N[support] / (nu + w)) - 1.0, lo, lo + 1e6, xtol=1e-14)
        pi = np.zeros_like(d_N)
        pi[support] = d_N[support] / (nu + w)
        return pi

    lam = scipy.optimize.brentq(lambda lam: law(lam) @ len_N - target, 0.0, 1e3, xtol=1e-14)
    return law(lam), lam


@pytest.mark.parametrize("side", ["<=", ">="])
def test_barrier_solutions_satisfy_the_length_constraint_and_approach_the_constrained_optimum(side, x64):
    log_d, len_N, support = _toy(x64)
    d_N = np.where(support, np.exp(log_d), 0.0)
    mean_d = d_N @ len_N
    target = mean_d - 0.4 if side == "<=" else mean_d + 0.4  # binds: the data law violates it
    pi_star, lam_star = _constrained_optimum(d_N, len_N, target, side)
    assert abs(pi_star @ len_N - target) < 1e-9 and lam_star > 0
    T = float(len_N.max())
    # the experiment's rewards: -len/T with threshold -target/T, or len/T with threshold target/T
    r_KN = jnp.asarray((-len_N if side == "<=" else len_N) / T)[None]
    threshold = [(-target if side == "<=" else target) / T]
    idx = np.flatnonzero(support)

    def log_pi(theta):
        return jnp.full(len(d_N), -jnp.inf).at[idx].set(jax.nn.log_softmax(theta))

    tvs, theta = [], jnp.asarray(log_d[idx])
    for mu in (1.0, 0.3, 0.1, 0.03, 0.01):
        fun = jax.jit(jax.value_and_grad(lambda th: exact_objective(log_pi(th), jnp.asarray(log_d), r_KN, threshold, mu)[0]))
        res = scipy.optimize.minimize(lambda th: tuple(np.asarray(v, np.float64) for v in fun(jnp.asarray(th))), np.asarray(theta),
                                      jac=True, method="BFGS", options={"gtol": 1e-10, "maxiter": 5000})
        theta = jnp.asarray(res.x)  # warm start the next mu, as the annealed schedule does
        pi = np.exp(np.asarray(log_pi(theta)))
        mean = pi @ len_N
        if 1 / mu > lam_star * T:  # the linear branch's slope beats the multiplier: an exact penalty, feasible
            assert (mean <= target if side == "<=" else mean >= target), (mu, mean, target)
        if threshold[0] - float(r_KN[0] @ pi) <= -mu * mu:  # on the log branch: a point of the central path
            tvs.append(0.5 * np.abs(pi - pi_star).sum())
    # along the central path, closer to the constrained optimum as mu -> 0 (at mu = 1 the relaxed
    # barrier's solution sits on the linear branch and need not be feasible at all)
    assert len(tvs) >= 3 and all(b < a for a, b in zip(tvs, tvs[1:])), tvs
    assert tvs[-1] < 0.02 and tvs[-1] < tvs[0] / 3, tvs
    c = threshold[0] - float(r_KN[0] @ pi)
    lam = float(barrier_slope(c, 0.01))  # the barrier's multiplier -> the KKT one (rewards scaled by 1/T)
    assert abs(lam - lam_star * T) < 0.1 * lam_star * T, (lam, lam_star * T)


@pytest.mark.slow  # about 1-10 min on 2 cores: trains three models
def test_quick_length_experiment_runs(tmp_path):
    from experiments import l3m_length

    results = l3m_length.main(["--quick", "--out", str(tmp_path)])
    assert set(results["models"]) == {"base", "sft", "l3m_short", "l3m_long"}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    cfg = on_disk["config"]
    for name, m in on_disk["models"].items():
        u = m["unconditional"]
        assert u["mean"]["lo"] <= u["mean"]["value"] <= u["mean"]["hi"]
        assert 1 <= u["mean"]["value"] <= cfg["max_new_tokens"] and sum(u["histogram"]) == cfg["n_eval"]
        assert np.isfinite(m["validation_perplexity"]) and m["validation_perplexity"] > 1
        assert len(m["examples"]) == cfg["n_prompts"]
        if name.startswith("l3m"):
            assert len(m["lambda"]) == cfg["steps"] and all(x > 0 for x in m["lambda"]) and 0 <= u["sample_rate"] <= 1
    text = (tmp_path / "results.md").read_text()
    assert "l3m_short" in text and "validation perplexity" in text
