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

SETUP = """import os, pathlib, sys, tempfile
REPO = pathlib.Path(os.environ.get("GUARD_JAX_REPO", "..")).resolve()
sys.path.insert(0, str(REPO))  # the experiments/ scripts live beside the package
# The embedded base LM, or any local GPT-2/Gemma Hugging Face folder (set GUARD_JAX_MODEL or edit this line).
MODEL = os.environ.get("GUARD_JAX_MODEL", str(REPO / "guard_jax" / "assets" / "base_lm"))
OUT = pathlib.Path(os.environ.get("GUARD_JAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="guard_jax_notebook_"))  # results folder"""

QUICKSTART = [
    new_markdown_cell("""# GUARD in five minutes

GUARD samples the gold distribution $g(y) = a(y)\\,b(y)/Z$ of a language model $a$ under a hard constraint
$b$: draw $y \\sim a'$ until $b(y) = 1$. Every returned sample satisfies $b$; the cost is $1/\\mathrm{AR}_{a'}$
draws per sample. This notebook loads the embedded base LM (a small GPT-2 trained on fortune cookies, shipped in
the repository) or your own checkpoint, and runs the GUARD sampler with $a' = a$ and with a CAP proposal.

Colab: Runtime → Change runtime type picks CPU, GPU or TPU; JAX uses whatever it finds."""),
    new_code_cell(INSTALL),
    new_code_cell("""import jax
print("JAX backend:", jax.default_backend(), jax.devices())"""),
    new_code_cell(SETUP),
    new_code_cell("""from guard_jax.models import hf
from guard_jax import constraints as C
from guard_jax.rejection import guard_sample
from guard_jax.constraints import decode_texts

model, params, tokenizer = hf.load(MODEL)
b = C.from_spec("keyword:nothing", tokenizer)  # the word 'nothing', with word boundaries
res = guard_sample(jax.random.PRNGKey(0), model, params, b, 5, max_new_tokens=30, batch_size=256, max_draws=50_000)
print(f"{res.accepted} accepted of {res.draws} draws: AR_a = {res.ar}")
for t in decode_texts(tokenizer, res.tokens_NT, res.lengths_N):
    print("-", t)"""),
    new_markdown_cell("""A constraint-aware prompt (CAP) is a proposal $a'(y) = a(y \\mid \\text{prompt})$: GUARD with it is still
exact for $g' \\propto a' b$, at a different acceptance rate. `guard_jax.evaluate.monte_carlo` estimates how far
$g'$ is from $g$ (KL with confidence intervals); `experiments/lexical.py` trains better proposals (SFT, DPG)."""),
    new_code_cell("""prompt = [model.bos_id] + tokenizer('The next fortune contains the word "nothing".\\n\\n', add_special_tokens=False)["input_ids"]
import jax.numpy as jnp
cap = (jnp.asarray([prompt]), jnp.ones((1, len(prompt)), jnp.int32))
res2 = guard_sample(jax.random.PRNGKey(1), model, params, b, 5, max_new_tokens=30, batch_size=256, max_draws=50_000, prompt=cap)
print(f"CAP: {res2.accepted} accepted of {res2.draws} draws: AR_a' = {res2.ar}")
assert bool(b(res2.tokens_NT, res2.lengths_N).all())"""),
]


def _experiment_cells(module: str, config: str, overrides: str, figure: str) -> list:
    return [
        new_code_cell(INSTALL),
        new_code_cell(SETUP),
        new_code_cell(f"""from IPython.display import Image, Markdown, display
from experiments import {module}, pipeline

config = pipeline.load_config(REPO / "experiments" / "configs" / "{config}")
# Small settings so that the notebook runs in a minute or two on a laptop CPU; raise them (or use the config as it
# is) for real numbers.
{overrides}
model, params, tokenizer = pipeline.load_model(MODEL)
out = pipeline.results_dir(config, OUT)
setup = pipeline.Setup(model, params, tokenizer, config, out / "runs")
results = pipeline.run(setup, {module}.tasks(setup), out, MODEL)
display(Markdown((out / "results.md").read_text()))"""),
        new_code_cell(f"""for name in ("{figure}", "pareto", "sample_efficiency"):
    display(Image(filename=str(out / "figures" / f"{{name}}_{{results['contexts'][0]['name']}}.png")))"""),
        new_markdown_cell("""Every figure regenerates from `results.json` alone: `python -m experiments.figures <results folder>`.
Proposals are looked up by name in `experiments.proposals.PROPOSALS`; register your own with
`@proposals.register("name")`."""),
    ]


LEXICAL = [
    new_markdown_cell("""# The lexical experiment (GUARD §5.1) on the embedded model

Unconditional generation of 30 tokens that must contain a keyword (word boundaries). We estimate $Z = \\mathrm{AR}_a$,
build proposals (CAP, SFT on $b$-filtered samples, warm-start DPG), and evaluate each: $\\mathrm{AR}_{a'}$,
$\\mathrm{KL}(g\\|a')$, $\\mathrm{KL}(g\\|g')$, $\\mathrm{KL}(g'\\|g)$ with 95% CIs, Self-BLEU, positional bias."""),
    *_experiment_cells("lexical", "lexical_quick.json", """config.update(name="lexical_notebook", proposals=["cap", "sft_a", "sft_dpg"], semantic=False,
              eval={"n_a": 4096, "n_a2": 1024, "n_diversity": 50, "n_curve": 512})
config["train"] = {"sft_a": {**config["train"]["sft_a"], "draws": 4096, "epochs": 1},
                   "sft_dpg": {**config["train"]["sft_dpg"], "steps": 2}}""", "positional_bias"),
]

SENTIMENT = [
    new_markdown_cell("""# Sentiment reversal (GUARD §5.2) on the embedded model

Contexts are negative openings from the corpus; the continuation's last sentence must be positive (VADER compound
above a threshold). Same proposals and estimates as the lexical experiment, per context."""),
    *_experiment_cells("sentiment", "sentiment_quick.json", """config.update(name="sentiment_notebook", proposals=["cap", "sft_a"], semantic=False, n_contexts=1,
              eval={"n_a": 2048, "n_a2": 512, "n_diversity": 50, "n_curve": 256})
config["train"] = {"sft_a": {**config["train"]["sft_a"], "draws": 2048, "epochs": 1}}""", "positional_bias"),
]

NOTEBOOKS = {"theorem2_toy.ipynb": THEOREM2, "quickstart.ipynb": QUICKSTART, "lexical.ipynb": LEXICAL, "sentiment.ipynb": SENTIMENT}


def write_all() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write_all()
