"""Writes the notebooks of this folder from the cell sources below (run it after editing a cell).

Each notebook is Colab-ready: its first cell installs guard_jax when it is not importable.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).parent
INSTALL = """# Colab / a fresh kernel: make guard_jax importable. In Colab, clone the repository first
# (!git clone <its URL> guard_jax) and set GUARD_JAX_REPO to that folder.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("guard_jax") is None:
    repo = os.environ.get("GUARD_JAX_REPO", "..")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", repo], check=True)"""

# Small settings by default; the test suite runs the notebook as it is.
THEOREM2 = [
    new_markdown_cell("""# Theorem 2 on a toy ARM: exact vs Monte Carlo

GUARD samples the gold distribution $g(y) = a(y)\\,b(y)/Z$ by drawing $y \\sim a'$ until $b(y)=1$.
Its output law is $g'(y) \\propto a'(y) b(y)$ and Theorem 2 says

$$\\mathrm{KL}(g\\|a') = -\\log \\mathrm{AR}_{a'} + \\mathrm{KL}(g\\|g').$$

On a toy ARM every term is computable exactly by enumerating $V^T$; here we compare each exact value with
its Monte-Carlo estimate (the estimators of the paper's code) as the number of samples $N$ grows."""),
    new_code_cell(INSTALL),
    new_code_cell("""import jax, numpy as np, matplotlib.pyplot as plt
from guard_jax.toy_demo import toy_problem
from guard_jax.evaluate import monte_carlo

p = toy_problem(seed=0, vocab_size=5, max_len=5, beta=0.3)
ex = p.exact
print(f"exact: Z={ex.z:.4f}  AR_a'={ex.ar:.4f}  KL(g||a')={ex.kl_g_a2:.4f}  KL(g||g')={ex.kl_g_g2:.4f}")
print(f"Theorem 2: {ex.kl_g_a2:.10f} = {-ex.log_ar + ex.kl_g_g2:.10f}")"""),
    new_code_cell("""sizes = [500, 2000, 8000, 32000]
rows = [monte_carlo(jax.random.PRNGKey(n), p.a, p.a2, p.constraint, 5, n, n, batch_size=4096, progress=False) for n in sizes]
exact = {"Z": ex.z, "AR_a2": ex.ar, "KL(g||a2)": ex.kl_g_a2, "KL(g||g2)": ex.kl_g_g2}
fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
for ax, (name, truth) in zip(axes, exact.items()):
    v = np.array([r[name].value for r in rows]); lo = np.array([r[name].lo for r in rows]); hi = np.array([r[name].hi for r in rows])
    ax.fill_between(sizes, lo, hi, alpha=0.3, label="95% CI")
    ax.plot(sizes, v, "o-", label="estimate"); ax.axhline(truth, color="k", ls="--", label="exact")
    ax.set_xscale("log"); ax.set_title(name.replace("a2", "a'").replace("g2", "g'")); ax.set_xlabel("N samples")
axes[0].legend(); plt.tight_layout(); plt.show()
inside = {name: [r[name].contains(t) for r in rows] for name, t in exact.items()}
print(inside)"""),
    new_markdown_cell("""## Moving a' toward g

With $a' = (1-\\beta) a + \\beta h$ the acceptance rate rises with $\\beta$, and the two terms of Theorem 2 trade
off: the sampling cost $-\\log \\mathrm{AR}_{a'}$ falls while the distortion $\\mathrm{KL}(g\\|g')$ grows, since $h$ is
not $g$. A proposal trained toward $g$ (DPG) lowers both at once."""),
    new_code_cell("""betas = np.linspace(0, 1, 11)
qs = [toy_problem(seed=0, vocab_size=5, max_len=5, beta=float(b)).exact for b in betas]
plt.figure(figsize=(6, 3.5))
plt.plot(betas, [q.kl_g_a2 for q in qs], "o-", label="KL(g||a')")
plt.plot(betas, [-q.log_ar for q in qs], "s-", label="-log AR_a'")
plt.plot(betas, [q.kl_g_g2 for q in qs], "^-", label="KL(g||g')")
plt.xlabel("beta"); plt.legend(); plt.tight_layout(); plt.show()
assert max(abs(q.kl_g_a2 - (-q.log_ar + q.kl_g_g2)) for q in qs) < 1e-9"""),
]

NOTEBOOKS = {"theorem2_toy.ipynb": THEOREM2}


def write_all() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write_all()
