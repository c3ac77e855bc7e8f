"""Writes the notebooks of this folder from the cell sources below (run it after editing a cell).

Each notebook is Colab-ready: its first cell (INSTALL) installs guard_jax into the running kernel when it is not
importable, from the path or URL in its one variable GUARD_JAX_SOURCE.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).parent
INSTALL = """# Run first. Where guard_jax is importable (a clone set up by `bash scripts/dev.sh`, a pip install) it does nothing.
# Elsewhere (Colab, a fresh kernel) it pip-installs guard_jax into this kernel from GUARD_JAX_SOURCE: a folder holding
# the repository (upload it, or `!git clone <its URL> /content/guard_jax`), a wheel file or a pip URL ("git+https://...").
import importlib, importlib.util, os, site, subprocess, sys
GUARD_JAX_SOURCE = ".." if os.path.isfile("../pyproject.toml") else "/content/guard_jax"
if importlib.util.find_spec("guard_jax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", GUARD_JAX_SOURCE], check=True)
    importlib.invalidate_caches()  # the running kernel sees the new files: no restart needed
    folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    for folder in folders:
        if os.path.isdir(folder) and folder not in sys.path:
            site.addsitedir(folder)  # e.g. a user site-packages that this install created
import guard_jax
print("guard_jax from", os.path.dirname(guard_jax.__file__))"""

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
import guard_jax as gj
from guard_jax.toy_demo import toy_problem

p = toy_problem(seed=0, vocab_size=5, max_len=5, beta=0.3)  # p.a, p.a2: toy ARMs as LMs; p.constraint: b
ex = p.exact
print(f"exact: Z={ex.z:.4f}  AR_a'={ex.ar:.4f}  KL(g||a')={ex.kl_g_a2:.4f}  KL(g||g')={ex.kl_g_g2:.4f}")
print(f"Theorem 2: {ex.kl_g_a2:.10f} = {-ex.log_ar + ex.kl_g_g2:.10f}")"""),
    new_code_cell("""sizes = [500, 2000, 8000, 32000]
rows = [gj.monte_carlo(jax.random.key(n), p.a, p.a2, p.constraint, max_new_tokens=5, n_a=n, n_a2=n, batch_size=4096, progress=False)
        for n in sizes]  # each an Evaluation: z, ar, kl_g_a2, kl_g_g2, ... with 95% CIs
exact = {"Z": ("z", ex.z), "AR_a'": ("ar", ex.ar), "KL(g||a')": ("kl_g_a2", ex.kl_g_a2), "KL(g||g')": ("kl_g_g2", ex.kl_g_g2)}
fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
for ax, (name, (field, truth)) in zip(axes, exact.items()):
    est = [getattr(r, field) for r in rows]
    ax.fill_between(sizes, [e.lo for e in est], [e.hi for e in est], alpha=0.3, label="95% CI")
    ax.plot(sizes, [e.value for e in est], "o-", label="estimate"); ax.axhline(truth, color="k", ls="--", label="exact")
    ax.set_xscale("log"); ax.set_title(name); ax.set_xlabel("N samples")
axes[0].legend(); plt.tight_layout(); plt.show()
inside = {name: [getattr(r, field).contains(t) for r in rows] for name, (field, t) in exact.items()}
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

THEOREM1 = [
    new_markdown_cell("""# Theorem 1 on a toy ARM: masking and small ARMs cannot reach g, the sampler does

The gold distribution is $g(y) = a(y)\\,b(y)/Z$. Theorem 1 of GUARD: no polynomial-time ARM equals $g$ for
every $(a, b)$ (unless P = NP), and a softmax ARM never puts zero mass on $b = 0$. On a toy ARM we can
compute everything exactly by enumerating $V^T$ and see the three ways out:

- **masking** (constrained decoding) guarantees $b$ but samples a distorted law;
- **the best ARM of a small family** (here: the exact $\\mathrm{KL}(g\\|\\pi)$ minimiser among ARMs that see
  only the last $k$ tokens) is neither $g$ nor safe: it keeps mass on $b = 0$;
- **the GUARD rejection sampler** with proposal $a$ returns exactly $g$, at an expected cost of $1/Z$ draws;
- **ASAp** converges to $g$, by exploring (and calling the model on) the prefix tree."""),
    new_code_cell(INSTALL),
    new_code_cell("""import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from guard_jax.toy_demo import toy_problem
from guard_jax.exact import exact_log_prob, exact_constraint, exact_quantities, log_gold
from guard_jax.decoding import Asap, exact_masked_log_prob, reachability_automaton
from guard_jax.limited_context import best_limited_context_arm

p = toy_problem(seed=0, vocab_size=4, max_len=5)  # b: the bigram (1, 2) occurs and the first token is not 3
space, T = p.space, 5
params = jax.tree.map(lambda x: np.asarray(x, np.float64), p.a.params)
log_a = np.asarray(exact_log_prob(p.a.model, params, T))
b = exact_constraint(space, p.constraint)
log_g = log_gold(log_a, b)
ex = exact_quantities(log_a, log_a, b)
print(f"{space.size} sequences; Z = AR_a = {ex.z:.4f}; KL(g||a) = -log Z = {ex.kl_g_a:.4f}")"""),
    new_code_cell("""def row(name, log_q, draws=1.0):
    q = exact_quantities(log_a, log_q, b)
    return name, q.kl_g_a2, 1 - q.ar, q.kl_g_g2, draws / q.ar

rows = [row("a (plain sampling)", log_a)]
rows.append(row("masking (exact reachability masks)", exact_masked_log_prob(space, log_a, b)))
for k in (0, 1, 2):
    m, pk = best_limited_context_arm(space, log_g, k)
    rows.append(row(f"best ARM seeing the last {k} tokens", np.asarray(exact_log_prob(m, pk, T))))
print("{:40s} {:>11s} {:>9s} {:>11s} {:>13s}".format("law sampled", "KL(g||law)", "mass b=0", "KL(g||g')", "draws/sample"))
for name, kl, bad, klgg, cost in rows:
    print(f"{name:40s} {kl:11.4f} {bad:9.4f} {klgg:11.4f} {cost:13.2f}")
print("\\nGUARD with a' = a: output law g' = g exactly, KL(g||g') =", f"{rows[0][3]:.2e}", f"at {rows[0][4]:.1f} draws per sample;")
print("GUARD with a' = a limited-context ARM: KL(g||g') is the last column, at fewer draws.")
assert rows[1][1] > 1e-2 and rows[1][2] < 1e-12          # masking: always b, never g
assert all(r[1] > 1e-3 and r[2] > 0 for r in rows[2:])   # small ARMs: not g, and mass on b = 0
assert abs(rows[0][3]) < 1e-9                            # rejection from a: exactly g"""),
    new_markdown_cell("""## The rejection sampler, by Monte Carlo

Draw from $a$ until $b = 1$: the empirical law of the accepted samples approaches $g$ (total variation
shrinking like $1/\\sqrt{N}$) and every sample satisfies $b$."""),
    new_code_cell("""from guard_jax.rejection import guard_sample
r = guard_sample(jax.random.key(0), p.a, p.constraint, 5_000, max_new_tokens=T, batch_size=1 << 16, progress=False)
idx = space.index(r.tokens_NT)
emp = np.bincount(idx, minlength=space.size) / len(idx)
print(f"accepted {r.accepted} of {r.draws} draws (AR {r.ar.value:.4f}, 95% CI [{r.ar.lo:.4f}, {r.ar.hi:.4f}], exact Z = {ex.z:.4f})")
print(f"all satisfy b: {bool(b[idx].all())};  TV(empirical, g) = {0.5 * np.abs(emp - np.exp(log_g)).sum():.4f}")
assert b[idx].all() and r.ar.lo <= ex.z <= r.ar.hi"""),
    new_markdown_cell("""## ASAp: exact, but only after exploring the tree

The exact law of ASAp's next sample, computed from its trie, approaches $g$; the number of trie nodes
(each one a model call) is the price."""),
    new_code_cell("""asap = Asap(p.a.model, p.a.params, reachability_automaton(space, b), T)
done = 0
print(f"{'samples':>8s} {'trie nodes':>10s} {'root theta~':>12s} {'KL(g||ASAp)':>12s}")
for n in (0, 10, 100, 400):
    if n > done:
        asap.sample(jax.random.PRNGKey(n), n - done, batch_size=32); done = n
    kl = exact_quantities(log_a, exact_masked_log_prob(space, log_a, b, asap.log_theta_levels(space)), b).kl_g_a2
    print(f"{n:8d} {len(asap.nodes):10d} {np.exp(asap.root_log_theta):12.4f} {kl:12.5f}")
print(f"Z = {ex.z:.4f}; prefixes in the full tree: {(4**T - 1) // 3}")"""),
]

MODEL_SETUP = """import os
# The embedded base LM, or any local GPT-2/Gemma Hugging Face folder (set GUARD_JAX_MODEL or edit this line).
MODEL = os.environ.get("GUARD_JAX_MODEL", "embedded")"""


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
    new_code_cell(MODEL_SETUP),
    new_code_cell("""import guard_jax as gj

a = gj.LM.load(MODEL)                                   # model + params + tokenizer, unconditional ([BOS])
b = gj.constraints.keyword(a.tokenizer, "nothing")      # the word 'nothing', with word boundaries
res = gj.guard_sample(jax.random.key(0), a, b, 5, max_new_tokens=30, batch_size=256, max_draws=50_000)
print(f"{res.accepted} accepted of {res.draws} draws: AR_a = {res.ar}")
for t in a.decode(res.tokens_NT, res.lengths_N):
    print("-", t)"""),
    new_markdown_cell("""A constraint-aware prompt (CAP) is a proposal $a'(y) = a(y \\mid \\text{prompt})$: GUARD with it is still
exact for $g' \\propto a' b$, at a different acceptance rate. `gj.evaluate_proposal` estimates how far $g'$ is
from $g$ (KL with confidence intervals) and `gj.proposals` trains better proposals (SFT, DPG): see the README's
quickstart and `lexical.ipynb`."""),
    new_code_cell("""cap = a.with_prefix('The next fortune contains the word "nothing".\\n\\n')  # same model and params, a prompt first
res2 = gj.guard_sample(jax.random.key(1), cap, b, 5, max_new_tokens=30, batch_size=256, max_draws=50_000)
print(f"CAP: {res2.accepted} accepted of {res2.draws} draws: AR_a' = {res2.ar}")
assert bool(b(res2.tokens_NT, res2.lengths_N).all())"""),
]


RESULTS_SETUP = MODEL_SETUP + """
import pathlib, tempfile
OUT = pathlib.Path(os.environ.get("GUARD_JAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="guard_jax_notebook_"))  # run folders, figures"""


def _experiment_cells(task: str, proposals: str, position_of: str) -> list:
    """The cells shared by the two experiments: gold samples, proposals, their evaluation, diversity, positions."""
    return [
        new_code_cell(INSTALL),
        new_code_cell(RESULTS_SETUP),
        new_code_cell(task),
        new_markdown_cell("""Each proposal trains in its own run folder (checkpoints, `metrics.jsonl`, TensorBoard events) and records
KL(g‖a'), AR_a' and KL(g‖g') along the way on the same gold samples (`gj.MonteCarloEvaluator`). Budgets are tiny
so that the notebook runs in minutes on a laptop CPU: raise them for real numbers."""),
        new_code_cell(proposals),
        new_code_cell("""from IPython.display import Image, Markdown, display

evals = {name: gj.evaluate_proposal(jax.random.fold_in(jax.random.key(3), i), gold, a, p.lm, b, N_A2, progress=False)
         for i, (name, p) in enumerate(props.items())}  # n_a2 fresh draws of each a', the same gold samples
rows = ["| proposal | train samples | AR_a' | AR gain | KL(g‖a') | KL(g‖g') | KL(g'‖g) |", "|---|---|---|---|---|---|---|"]
rows += [f"| {n} | {props[n].train_samples:,} | {e.ar} | {e.ar_gain or 'n/a'} | {e.kl_g_a2} | {e.kl_g_g2 or 'n/a'} | {e.kl_g2_g or 'n/a'} |" for n, e in evals.items()]
display(Markdown(f"Z = AR_a = {gold.z}, KL(g‖a) = {gold.kl_g_a}\\n\\n" + "\\n".join(rows)))"""),
        new_code_cell(f"""import matplotlib.pyplot as plt
from guard_jax.metrics.position import first_positions, plot_positions

texts = {{"g (gold)": a.decode(gold.tokens_NT, gold.lengths_N)}} | {{f"g' {{n}}": a.decode(e.tokens_NT, e.lengths_N) for n, e in evals.items()}}
size = gj.common_set_size([len(t) for t in texts.values()], n_max=50)  # Self-BLEU at one set size for every row
for name, t in texts.items():
    print(f"{{name:16s}} n={{len(t):4d}}  Self-BLEU-2..5 (set of {{size}}): {{gj.diversity_report(t, size, semantic=False)['self_bleu']}}")
display(Image(filename=str(plot_positions({{n: {position_of} for n, t in texts.items()}}, OUT / "positional_bias")[0])))

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, p in props.items():
    if p.curve:
        ax.plot([max(q.samples, 1) for q in p.curve], [q.kl_g_a2.value for q in p.curve], "o-", label=name)
ax.axhline(gold.kl_g_a.value, color="k", ls="--", label="KL(g||a) = -log Z")
ax.set_xscale("log"); ax.set_xlabel("samples drawn for training"); ax.set_ylabel("KL(g||a')"); ax.legend(); plt.show()"""),
    ]


LEXICAL = [
    new_markdown_cell("""# The lexical experiment (GUARD §5.1) on the embedded model

Unconditional generation of 30 tokens that must contain a keyword (word boundaries). We estimate $Z = \\mathrm{AR}_a$
from gold samples drawn once, build proposals (CAP, SFT on $b$-filtered samples, warm-start DPG), and evaluate each:
$\\mathrm{AR}_{a'}$, $\\mathrm{KL}(g\\|a')$, $\\mathrm{KL}(g\\|g')$, $\\mathrm{KL}(g'\\|g)$ with 95% CIs, Self-BLEU, positional
bias. `python -m experiments.lexical` runs the same recipes at the paper's budgets."""),
    *_experiment_cells("""import jax
import guard_jax as gj
from guard_jax.proposals import CAPConfig, DPGRecipeConfig, SFTRecipeConfig

N_A, N_A2, WORD = 4096, 1024, "life"                       # draws of a (gold) and of each a'; AR_a('life') is about 0.01
a = gj.LM.load(MODEL)
b = gj.constraints.keyword(a.tokenizer, WORD)
gold = gj.draw_gold(jax.random.key(0), a, b, N_A, max_new_tokens=30)
curve = gj.MonteCarloEvaluator(gold, b, n_draws=512)
print(f"{gold.accepted} gold samples of {gold.draws} draws: Z = {gold.z}")""",
"""props = {"cap": gj.proposals.cap(a, b, gold, CAPConfig(prompt=f'The next fortune contains the word "{WORD}".\\n\\n'))}
props["sft_a"] = gj.proposals.sft(a, b, gold, SFTRecipeConfig(draws=N_A, batch_size=8, learning_rate=3e-4), key=jax.random.key(1),
                                  run_dir=OUT / "sft_a", evaluator=curve)
props["sft_dpg"] = gj.proposals.warm_start_dpg(a, b, gold, DPGRecipeConfig(steps=2, n_samples=512, minibatch=128, learning_rate=3e-4),
                                               key=jax.random.key(2), start=props["sft_a"], run_dir=OUT / "sft_dpg", evaluator=curve)""",
"first_positions(t, WORD)"),
]

SENTIMENT = [
    new_markdown_cell("""# Sentiment reversal (GUARD §5.2) on the embedded model

The context is a negative opening from the corpus; the last sentence of opening + continuation must be positive
(VADER compound above a threshold). Same proposals and estimates as the lexical experiment, for one opening.
`python -m experiments.sentiment` runs them on several openings at the paper's budgets."""),
    *_experiment_cells("""import jax, numpy as np
import guard_jax as gj
from guard_jax.constraints import classifier_threshold, last_sentence, vader_positive
from guard_jax.proposals import CAPConfig, SFTRecipeConfig

OPENING = "A hard-luck actor who appeared in one colossal disaster after another finally got a break, a broken leg to be exact."
N_A, N_A2, THRESHOLD = 2048, 512, 0.6                     # VADER > 0.6 on the last sentence: AR_a about 0.03 here
a = gj.LM.load(MODEL).with_context(OPENING)               # a(y | opening)
b = classifier_threshold(a.tokenizer, vader_positive, THRESHOLD, prefix=OPENING, name="vader_last")
gold = gj.draw_gold(jax.random.key(0), a, b, N_A, max_new_tokens=80)
curve = gj.MonteCarloEvaluator(gold, b, n_draws=256)
print(f"{gold.accepted} gold samples of {gold.draws} draws: Z = {gold.z}")

def last_sentence_start(texts):  # where the judged (last) sentence starts, relative to the continuation
    return np.asarray([(OPENING + t).rfind(last_sentence(OPENING + t)) - len(OPENING) for t in texts], float).clip(0) / \\
        np.maximum([len(t) for t in texts], 1)""",
"""props = {"cap": gj.proposals.cap(a, b, gold, CAPConfig(prompt="This is a story with a happy ending. "))}
props["sft_a"] = gj.proposals.sft(a, b, gold, SFTRecipeConfig(draws=N_A, batch_size=4, learning_rate=3e-4), key=jax.random.key(1),
                                  run_dir=OUT / "sft_a", evaluator=curve)""",
"np.minimum(last_sentence_start(t), np.nextafter(1.0, 0.0))"),
]

GEMMA_TPU = [
    new_markdown_cell("""# The lexical experiment at the paper's scale: your Gemma or Llama, on whatever mesh the runtime has

GUARD §5.1 with a real model: unconditional 30-token continuations of a local Gemma (the paper: gemma-2b) or Llama
folder must contain a keyword. We estimate $Z = \\mathrm{AR}_a$ from gold samples, train a DPG proposal and a
warm-start DPG proposal (from a constraint-aware prompt, CAP) with **LoRA adapters or full fine-tuning**, evaluate
each ($\\mathrm{AR}_{a'}$, $\\mathrm{KL}(g\\|a')$, $\\mathrm{KL}(g\\|g')$ with 95% CIs) and export the trained proposal as
a Hugging Face folder.

The mesh is built from `jax.devices()`: a TPU slice, one or more GPUs, or CPU host devices. Parameters and Adam
state are sharded over all of them (FSDP, `guard_jax.parallel`), each batch is split over them, and on an
accelerator the model computes in bfloat16 with float32 master weights (`bf16_compute`). The settings below are
the paper's budgets scaled to an hour on a TPU v3-8 or one GPU; `GUARD_JAX_SETTINGS` (JSON) overrides any of them."""),
    new_code_cell(INSTALL),
    new_code_cell("""import json, os, pathlib, tempfile
MODEL_PATH = os.environ.get("GUARD_JAX_MODEL", "/content/gemma-2b")  # a local Hugging Face folder (config.json, safetensors, tokenizer)
SETTINGS = dict(
    word="amazing",          # the keyword (whole word), as in the paper
    lora_rank=8,             # LoRA adapters of this rank on every attention and MLP projection; 0 = full fine-tuning
    new_tokens=30,           # tokens per sample
    n_gold=10_000,           # draws of a for the gold samples (Z and KL(g||a'))
    n_eval=2_000,            # draws of each a' for AR_a' and KL(g||g')
    batch=500,               # sampling batch
    dpg_steps=20, dpg_samples=2_000, minibatch=500, learning_rate=1e-4,  # the paper: 400 x 10,000 in 500s, lr 1.41e-5 (full FT)
    cap_prompt='Write a sentence with the word "amazing".\\n',
    seed=0,
)
SETTINGS |= json.loads(os.environ.get("GUARD_JAX_SETTINGS", "{}"))
OUT = pathlib.Path(os.environ.get("GUARD_JAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="guard_jax_gemma_"))
print(SETTINGS)"""),
    new_code_cell("""import jax
import guard_jax as gj
from guard_jax.parallel import make_mesh

devices = jax.devices()
on_accelerator = jax.default_backend() != "cpu"
mesh = make_mesh(1, len(devices))  # data x model = 1 x all: FSDP over every device, batches split over all of them
n = mesh.size
round_up = lambda x: -(-int(x) // n) * n  # batch sizes the devices split evenly
S = dict(SETTINGS, batch=round_up(SETTINGS["batch"]), minibatch=round_up(SETTINGS["minibatch"]))
S["dpg_samples"] = -(-S["dpg_samples"] // S["minibatch"]) * S["minibatch"]
print(f"{jax.default_backend()}: {n} device(s) {devices[0].device_kind}; mesh {dict(mesh.shape)}")"""),
    new_code_cell("""from guard_jax.parallel import shard_params
from guard_jax.precision import with_precision

a = gj.LM.load(MODEL_PATH, mesh=mesh)                 # weights read tensor by tensor from safetensors
a = a.with_params(shard_params(mesh, a.params))       # placed on the mesh once, sharded by the rules
if on_accelerator:
    a = with_precision(a, "bf16_compute")             # bf16 matmuls and KV cache, fp32 master weights and Adam
print(a)"""),
    new_code_cell("""b = gj.constraints.keyword(a.tokenizer, S["word"])
gold = gj.draw_gold(jax.random.key(S["seed"]), a, b, S["n_gold"], max_new_tokens=S["new_tokens"], batch_size=S["batch"])
print(f"{gold.accepted} gold samples of {gold.draws} draws: Z = AR_a = {gold.z}; KL(g||a) = -log Z = {gold.kl_g_a}")"""),
    new_markdown_cell("""The policy: with `lora_rank > 0`, `gj.lora.with_lora` adds rank-r adapters (qwix) to every projection, B = 0 so the
policy starts exactly at $a$; DPG then trains (and keeps Adam moments for) the adapters only. With `lora_rank = 0`
every weight is trained. DPG samples its own policy (on-policy); warm-start DPG starts from the CAP proposal
(off-policy: CAP's samples until the policy is closer to $g$)."""),
    new_code_cell("""from guard_jax.proposals import CAPConfig, DPGRecipeConfig

policy = gj.lora.with_lora(a, S["lora_rank"], key=jax.random.key(S["seed"] + 1)) if S["lora_rank"] else a
print("trained parameters:", f"{gj.lora.num_adapter_params(policy.params):,} adapters" if S["lora_rank"] else "all")
dpg_cfg = DPGRecipeConfig(steps=S["dpg_steps"], n_samples=S["dpg_samples"], minibatch=S["minibatch"], learning_rate=S["learning_rate"],
                          eval_points=1)
props = {"cap": gj.proposals.cap(policy, b, gold, CAPConfig(prompt=S["cap_prompt"]))}
props["dpg"] = gj.proposals.dpg(policy, b, gold, dpg_cfg, key=jax.random.key(S["seed"] + 2), run_dir=OUT / "dpg")
props["cap_dpg"] = gj.proposals.warm_start_dpg(policy, b, gold, dpg_cfg, key=jax.random.key(S["seed"] + 3), start=props["cap"],
                                               run_dir=OUT / "cap_dpg")"""),
    new_code_cell("""from IPython.display import Markdown, display

lms = {"a": a} | {name: p.lm for name, p in props.items()}
evals = {name: gj.evaluate_proposal(jax.random.fold_in(jax.random.key(S["seed"] + 4), i), gold, a, lm, b, S["n_eval"],
                                    batch_size=S["batch"], progress=False) for i, (name, lm) in enumerate(lms.items())}
rows = ["| proposal | train samples | AR_a' | AR gain | KL(g‖a') | KL(g‖g') |", "|---|---|---|---|---|---|"]
rows += [f"| {name} | {(props[name].train_samples if name in props else 0):,} | {e.ar} | {e.ar_gain or 'n/a'} | {e.kl_g_a2} | "
         f"{e.kl_g_g2 or 'n/a'} |" for name, e in evals.items()]
display(Markdown(f"Z = AR_a = {gold.z}, KL(g‖a) = {gold.kl_g_a}\\n\\n" + "\\n".join(rows)))
for t in a.decode(evals["cap_dpg"].tokens_NT[:3], evals["cap_dpg"].lengths_N[:3]):
    print("-", t)"""),
    new_markdown_cell("""Export the warm-start DPG proposal: LoRA adapters are merged ($W + \\frac{\\alpha}{r} A B$) into a plain Hugging Face
folder that `transformers` and `gj.LM.load` read; its log-probs are the trained proposal's."""),
    new_code_cell("""import numpy as np
from guard_jax.models import hf

best = props["cap_dpg"].lm
folder = gj.lora.export(OUT / "cap_dpg_hf", best) if S["lora_rank"] else hf.export(OUT / "cap_dpg_hf", best.model, best.params, best.tokenizer)
reloaded = gj.LM.load(folder, mesh=mesh)
if on_accelerator:
    reloaded = with_precision(reloaded, "bf16_compute")
same = np.abs(gj.score(reloaded, gold.tokens_NT, gold.lengths_N) - gj.score(best, gold.tokens_NT, gold.lengths_N)).max()
print(f"exported to {folder}; max |log-prob difference| on the {gold.accepted} gold samples: {same:.2e}")
assert same < (5e-2 if on_accelerator else 1e-3)"""),
]

NOTEBOOKS = {"theorem2_toy.ipynb": THEOREM2, "theorem1.ipynb": THEOREM1, "quickstart.ipynb": QUICKSTART, "lexical.ipynb": LEXICAL, "sentiment.ipynb": SENTIMENT,
             "gemma_tpu.ipynb": GEMMA_TPU}


def write_all() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write_all()
