"""Length-constrained L3M on the embedded model: the same prompts answered by a short and a long L3M, beside SFT.

    python -m experiments.l3m_length --quick                 # tiny (run by the tests)
    python -m experiments.l3m_length --config experiments/configs/l3m_length_full.json

Three fine-tunes of the embedded base LM, each on the embedded corpus's training split (documents from BOS,
EOS-terminated, cut at `max_new_tokens`) for `steps` steps from the same start: plain SFT, L3M with
E[len] <= short_target, L3M with E[len] >= long_target (length in new tokens, EOS included; the reward is
len / max_new_tokens so the barrier sees values in [0, 1]; mu annealed geometrically from mu_start to mu_end).
Reported for each: the length law of unconditional samples (the distribution the constraint is on: mean
with a 95% CI, quantiles, the share of samples on the constraint's side of the target, and whether the CI
of the mean clears the target), the same on continuations of prompts cut from validation documents,
validation perplexity, the multiplier lambda over training, and example continuations of the same prompts.
Writes results.json (with the tables as text, for docs/make_docs.py) and results.md under --out.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from experiments import report
from guard_jax.config import field_default
from guard_jax.data import corpus
from guard_jax.estimators import normal_interval
from guard_jax.lm import LM
from guard_jax.sampling import draw, score
from guard_jax.train.l3m import L3M, L3MConfig
from guard_jax.train.loop import LoopConfig, run
from guard_jax.train.sft import SFT, SFTConfig


@dataclasses.dataclass(frozen=True)
class LengthConfig:
    """One run. Lengths are in new tokens (EOS included) out of max_new_tokens."""

    steps: int = 200
    max_new_tokens: int = 48
    short_target: float = 12.0
    long_target: float = 36.0
    n_samples: int = field_default(L3MConfig, "n_samples")
    batch_size: int = field_default(L3MConfig, "batch_size")
    learning_rate: float = field_default(L3MConfig, "learning_rate")
    mu_start: float = field_default(L3MConfig, "mu_start")
    mu_end: float = field_default(L3MConfig, "mu_end")
    n_train_docs: int | None = None
    n_eval: int = 512
    n_prompts: int = 4
    prompt_tokens: int = 4
    n_per_prompt: int = 64
    n_val_docs: int | None = None
    ppl_max_len: int = 128
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.short_target < self.long_target <= self.max_new_tokens:
            raise ValueError(f"need 0 < short_target < long_target <= max_new_tokens, got {self.short_target}, "
                             f"{self.long_target}, {self.max_new_tokens}")
        if min(self.steps, self.n_eval, self.n_prompts, self.prompt_tokens, self.n_per_prompt) < 1:
            raise ValueError("steps, n_eval, n_prompts, prompt_tokens and n_per_prompt must be >= 1")


# --- data and measurements shared with the attribute fine-tuning experiment ----------------------------------
def corpus_rows(lm: LM, split: str, max_len: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Documents of `split` as continuations of BOS: their tokens then EOS, cut at max_len, padded ->
    (tokens_NT, lengths_N)."""
    docs = corpus.load(split=split)[:limit]
    tokens_NT = np.full((len(docs), max_len), lm.model.pad_id, np.int32)
    lengths_N = np.zeros(len(docs), np.int32)
    for i, doc in enumerate(docs):
        ids = (lm.encode(doc) + [lm.model.eos_id])[:max_len]
        tokens_NT[i, : len(ids)], lengths_N[i] = ids, len(ids)
    return tokens_NT, lengths_N


def perplexity(lm: LM, tokens_NT, lengths_N, batch_size: int = 64) -> float:
    """exp(NLL per token) of the rows under lm (teacher-forced)."""
    logp_N = score(lm, tokens_NT, lengths_N, batch_size=min(batch_size, len(tokens_NT)))
    return float(math.exp(-logp_N.sum() / lengths_N.sum()))


def mean_ci(x, level: float = 0.95) -> dict:
    """Mean with a normal 95% interval -> {"value", "lo", "hi", "n"}."""
    x = np.asarray(x, np.float64)
    e = normal_interval(float(x.mean()), float(x.var(ddof=1) / x.size) if x.size > 1 else 0.0, level, int(x.size))
    return {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n}


def validation_prompts(lm: LM, n: int, prompt_tokens: int) -> list[tuple[int, ...]]:
    """The first `prompt_tokens` tokens of the first n validation documents that are longer than that."""
    out = []
    for doc in corpus.load(split="validation"):
        ids = lm.encode(doc)
        if len(ids) > prompt_tokens:
            out.append((lm.model.bos_id, *ids[:prompt_tokens]))
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} validation documents have more than {prompt_tokens} tokens; lower n_prompts")


# --- the experiment -----------------------------------------------------------------------------------------
def length_report(lengths_N, side: str | None, target: float | None) -> dict:
    """Mean (CI), quantiles and, for a constrained model, the share of samples on the constraint's side."""
    lengths_N = np.asarray(lengths_N)
    out = {"mean": mean_ci(lengths_N), "quantiles": {str(q): float(np.quantile(lengths_N, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
           "histogram": np.bincount(lengths_N).tolist()}
    if side is not None:
        ok = lengths_N <= target if side == "<=" else lengths_N >= target
        m = out["mean"]
        out |= {"sample_rate": float(ok.mean()),
                "mean_satisfies": bool(m["value"] <= target if side == "<=" else m["value"] >= target),
                "ci_clears_target": bool(m["hi"] <= target if side == "<=" else m["lo"] >= target)}
    return out


def run_experiment(cfg: LengthConfig, *, progress: bool = False) -> dict:
    t_start = time.perf_counter()
    base = LM.load("embedded")
    T = cfg.max_new_tokens
    train_tokens, train_lengths = corpus_rows(base, "train", T, cfg.n_train_docs)
    val_tokens, val_lengths = corpus_rows(base, "validation", cfg.ppl_max_len, cfg.n_val_docs)

    def short_reward(tokens_NT, lengths_N):  # E[-len/T] >= -short/T  <=>  E[len] <= short
        return -np.asarray(lengths_N, np.float32) / T

    def long_reward(tokens_NT, lengths_N):  # E[len/T] >= long/T
        return np.asarray(lengths_N, np.float32) / T

    l3m_common = dict(total_steps=cfg.steps, n_samples=cfg.n_samples, batch_size=cfg.batch_size, max_new_tokens=T,
                      learning_rate=cfg.learning_rate, mu_start=cfg.mu_start, mu_end=cfg.mu_end, seed=cfg.seed)
    trainers = {
        "sft": (SFT(base, train_tokens, train_lengths, SFTConfig(batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed)),
                None, None),
        "l3m_short": (L3M(base, train_tokens, train_lengths, [short_reward], L3MConfig(thresholds=(-cfg.short_target / T,), **l3m_common)),
                      "<=", cfg.short_target),
        "l3m_long": (L3M(base, train_tokens, train_lengths, [long_reward], L3MConfig(thresholds=(cfg.long_target / T,), **l3m_common)),
                     ">=", cfg.long_target),
    }
    trainers["l3m_long"][0].optimizer = trainers["l3m_short"][0].optimizer  # one optimizer instance: one compiled L3M update
    prompts = validation_prompts(base, cfg.n_prompts, cfg.prompt_tokens)
    models = {"base": (base, None, None, [], 0.0)}
    for name, (trainer, side, target) in trainers.items():
        t0 = time.perf_counter()
        state, history = run(trainer, trainer.init_state(base.params), LoopConfig(steps=cfg.steps, seed=cfg.seed, progress=progress))
        models[name] = (base.with_params(state.params), side, target, history, time.perf_counter() - t0)

    results = {"config": dataclasses.asdict(cfg), "models": {}, "prompts": [base.decode(np.asarray([p[1:]]), np.asarray([len(p) - 1]))[0] for p in prompts]}
    key = jax.random.PRNGKey(cfg.seed + 1)
    for name, (lm, side, target, history, seconds) in models.items():
        free = draw(jax.random.fold_in(key, 0), lm, cfg.n_eval, max_new_tokens=T, batch_size=min(cfg.n_eval, 256), progress=False)
        prompted, examples = [], []
        for i, p in enumerate(prompts):
            d = draw(jax.random.fold_in(key, 1 + i), lm.with_prompt(p), cfg.n_per_prompt, max_new_tokens=T,
                     batch_size=min(cfg.n_per_prompt, 256), progress=False)
            prompted.append(d.lengths_N)
            examples.append(lm.decode(d.tokens_NT[:1], d.lengths_N[:1])[0])
        lam = [h["lambda_0"] for h in history if "lambda_0" in h]
        results["models"][name] = {
            "unconditional": length_report(free.lengths_N, side, target),
            "prompted": length_report(np.concatenate(prompted), side, target),
            "validation_perplexity": perplexity(lm, val_tokens, val_lengths),
            "lambda": lam, "mu": [h["mu"] for h in history if "mu" in h],
            "reward": [h["reward_0"] for h in history if "reward_0" in h],
            "examples": examples, "train_seconds": seconds,
        }
    results["seconds"] = time.perf_counter() - t_start
    results["tables"] = tables(results)
    return results


def _fmt(m: dict) -> str:
    return f"{m['value']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"


def tables(results: dict) -> dict:
    """The report's tables as markdown text: "lengths", "lambda" (the multiplier over training) and "examples"."""
    cfg = results["config"]
    lengths = ["| model | E[len] unconditional (95% CI) | median | share on the constraint's side | CI clears target | "
               "E[len] on validation prompts (95% CI) | validation perplexity |",
               "|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        u, p = m["unconditional"], m["prompted"]
        share = f"{u['sample_rate']:.3f}" if "sample_rate" in u else "-"
        clears = ("yes" if u["ci_clears_target"] else "no") if "ci_clears_target" in u else "-"
        lengths.append(f"| {name} | {_fmt(u['mean'])} | {u['quantiles']['0.5']:g} | {share} | {clears} | {_fmt(p['mean'])} | "
                       f"{m['validation_perplexity']:.2f} |")
    ticks = _ticks(cfg["steps"])
    lam = ["| model | " + " | ".join(f"step {i}" for i in ticks) + " |", "|---|" + "---|" * len(ticks)]
    for name, m in results["models"].items():
        if m["lambda"]:
            lam.append(f"| {name} | " + " | ".join(f"{m['lambda'][i]:.3g}" for i in ticks) + " |")
    examples = []
    for i, prompt in enumerate(results["prompts"]):
        examples.append(f"- prompt `{prompt}`")
        for name, m in results["models"].items():
            examples.append(f"  - {name}: {m['examples'][i]!r}")
    return {"lengths": "\n".join(lengths), "lambda": "\n".join(lam), "examples": "\n".join(examples)}


def markdown(results: dict, command: str) -> str:
    cfg, t = results["config"], results["tables"]
    return "\n".join([
        *report.header("Length-constrained L3M on the embedded model", command, results),
        f"Targets: short E[len] <= {cfg['short_target']:g}, long E[len] >= {cfg['long_target']:g} new tokens (EOS included), "
        f"max_new_tokens = {cfg['max_new_tokens']}; {cfg['steps']} steps from the embedded base LM, SFT batch {cfg['batch_size']}, "
        f"{cfg['n_samples']} policy samples per L3M step, lr {cfg['learning_rate']:g}, mu {cfg['mu_start']:g} -> {cfg['mu_end']:g}.", "",
        t["lengths"], "", "Multiplier lambda = mu / (-C) over training (every ~10% of the steps):", "", t["lambda"], "",
        "Example continuations (the first sample of each model for the same validation prompt):", "", t["examples"], ""])


def _ticks(steps: int) -> list[int]:
    return sorted({min(steps - 1, round(i * (steps - 1) / 10)) for i in range(11)})


def main(argv=None) -> dict:
    return report.main(argv, name="l3m_length", doc=__doc__, config_cls=LengthConfig, run_experiment=run_experiment, markdown=markdown)


if __name__ == "__main__":
    main()
