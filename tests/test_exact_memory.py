"""Exact enumeration of 10^8 sequences stays under 2 GB of host memory (slow: about a minute)."""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = """
import resource, jax, numpy as np
from guard_jax.exact import exact_log_prob
from guard_jax.models.toy import TinyTransformerARM
model = TinyTransformerARM(10, 8, d_model=8, num_heads=1)
logp = exact_log_prob(model, model.init(jax.random.PRNGKey(0)), 8)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
assert logp.size == 10**8
total = sum(float(np.exp(logp[i : i + 10**7].astype(np.float64)).sum()) for i in range(0, logp.size, 10**7))
print("total", total, "peak_rss_mb", peak_mb)
"""


@pytest.mark.slow
def test_1e8_sequences_fit_in_2gb():
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=3000)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    total, peak_mb = float(words[1]), float(words[3])
    assert abs(total - 1.0) < 1e-3
    assert peak_mb < 2048, f"peak RSS {peak_mb:.0f} MB"
