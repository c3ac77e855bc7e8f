"""SMC over tokens on the toy grid: Ẑ unbiased (mean over runs within its CI of the exact Z), the weighted
particles properly weighted for g (Hotelling's test of E[sum_i w_i 1[y_i = y]] = a(y) b(y)), and exact samples
of g with Ẑ = Z when the twist is the exact prefix value and a′ the twisted proposal."""

import jax
import numpy as np
import pytest

from guard_jax.decoding import reachability_automaton
from guard_jax.exact import exact_prefix_values
from guard_jax.lm import LM
from guard_jax.samplers import Twist, smc
from guard_jax.train.aux import AuxProposal
from tests.samplers_toy import T, check_unbiased_and_properly_weighted, chi_square_p, toy


@pytest.fixture(scope="module")
def problem():
    return toy()


@pytest.fixture(scope="module")
def exact_twist(problem):
    with jax.enable_x64(True):
        head, head_params = exact_prefix_values(problem.space, problem.log_a, problem.b)
    return Twist(head, jax.tree.map(lambda x: np.asarray(x, np.float32), head_params))


def noisy_twist(twist: Twist, seed: int = 0) -> Twist:
    """The exact twist with N(0, 1) noise on its finite logits: a learned twist's stand-in."""
    logits = np.asarray(twist.params["logits_NV"])
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), logits.shape))
    return Twist(twist.model, {"logits_NV": np.where(np.isfinite(logits), logits + noise, logits).astype(np.float32)})


@pytest.mark.parametrize("variant", ["bootstrap", "noisy_twist", "mask"])
def test_smc_z_is_unbiased_and_particles_are_properly_weighted(problem, exact_twist, variant):
    runs, particles = 3000, 4
    twist = noisy_twist(exact_twist) if variant == "noisy_twist" else None
    mask = reachability_automaton(problem.space, problem.b) if variant == "mask" else None
    out = smc(jax.random.PRNGKey(7), problem.a, problem.a2, problem.constraint, particles, max_new_tokens=T,
              ess_threshold=0.9, twist=twist, mask=mask, num_runs=runs)
    assert out.method == "smc" and out.tokens_NT.shape == (runs * particles, T) and out.acceptance_rate is None
    assert out.info["resamples"].mean() > 0.5  # the test exercises resampling
    assert out.model_calls == runs * particles * (3 if twist else 2)
    if mask is not None:
        assert out.satisfied_N.all()  # exact masks: every particle satisfies b
    check_unbiased_and_properly_weighted(problem, out, runs, particles)


def test_smc_with_the_exact_twist_and_twisted_proposal_samples_g_exactly(problem, exact_twist):
    a = problem.a
    twisted = LM.of(AuxProposal(a.model, exact_twist.model), {"base": a.params, "head": exact_twist.params}, a.prompt)
    runs, particles = 50, 64
    out = smc(jax.random.PRNGKey(3), a, twisted, problem.constraint, particles, max_new_tokens=T, twist=exact_twist,
              num_runs=runs)
    log_z = np.logaddexp.reduce(problem.log_p)
    np.testing.assert_allclose(out.info["log_z_runs"], log_z, atol=1e-4)  # every run's Ẑ is Z
    assert out.satisfied_N.all() and np.ptp(out.log_weights_N) < 1e-4  # equal weights
    assert out.ess == pytest.approx(runs * particles, rel=1e-6) and out.info["resamples"].sum() == 0
    assert chi_square_p(problem.index(out.tokens_NT), np.exp(problem.log_g)) > 1e-3


def test_smc_bootstrap_with_a_as_proposal_spends_one_call_per_particle(problem):
    out = smc(jax.random.PRNGKey(0), problem.a, problem.a, problem.constraint, 8, max_new_tokens=T, num_runs=2)
    assert out.model_calls == 16 and out.constraint_calls == 16 and len(out.info["log_z_runs"]) == 2
    with pytest.raises(ValueError, match="ess_threshold"):
        smc(jax.random.PRNGKey(0), problem.a, problem.a, problem.constraint, 8, max_new_tokens=T, ess_threshold=2.0)
