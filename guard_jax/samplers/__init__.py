"""Samplers beyond plain rejection, all toward g = a·b / Z from a proposal a′, all returning `SamplerResult`.

- `qrs`: quasi-rejection sampling; always satisfies b; law ∝ min(P, β a′), exact for β >= max P/a′.
- `imh`: independent Metropolis–Hastings from GUARD starts; always satisfies b; law -> g as steps grow.
- `smc`: sequential Monte Carlo over tokens (bootstrap, learned or exact twists, token masks); weighted
  particles properly weighted for g, unbiased Z; exact samples of g with the exact prefix-value twist
  and the twisted proposal a·ψ.
- `awrs`: SMC whose token step is adaptive weighted rejection against a token mask; properly weighted for g.
"""

from guard_jax.samplers.awrs import awrs, awrs_from_order, awrs_step
from guard_jax.samplers.imh import IMHExact, guard_start, imh, imh_exact
from guard_jax.samplers.qrs import QRSExact, qrs, qrs_exact
from guard_jax.samplers.result import SamplerResult, effective_sample_size
from guard_jax.samplers.smc import Twist, direct_step, smc

__all__ = [
    "IMHExact", "QRSExact", "SamplerResult", "Twist", "awrs", "awrs_from_order", "awrs_step", "direct_step",
    "effective_sample_size", "guard_start", "imh", "imh_exact", "qrs", "qrs_exact", "smc",
]
