"""Attribute-controlled fine-tuning (the auxiliary-model method) on the embedded model, beside GUARD's rejection sampler.

    python -m experiments.attribute_finetune --quick         # tiny (run by the tests)
    python -m experiments.attribute_finetune --config experiments/configs/attribute_finetune_full.json

The attribute treated as "toxicity": the continuation holds a sentence whose VADER compound score is
<= `negative_threshold` (offline, lexicon-based; -0.3 makes about one in eight samples of the embedded
base LM "toxic" at 24 new tokens). The constraint is b = "no such sentence". For each lambda in `lambdas`,
`AuxTrainer` with the training corpus fine-tunes the base LM a: loss = corpus NLL + lambda · per-token
KL(q || p), q = a · sigmoid(R), the value head R learning concurrently by BCE on b-labelled samples of a;
lambda = 0 is plain SFT; q itself is evaluated for the largest lambda. Beside them, GUARD's warm-start DPG:
SFT on the b-filtered samples of a, then DPG toward g from there. Reported per model: the attribute rate of samples
(Wilson 95% CI), validation perplexity, KL(p || a) (mean log-ratio on samples of p, normal 95% CI); and
GUARD's rejection sampler on the same constraint with a, with the warm-start DPG model and with the
largest-lambda policy as proposals (0 violations by construction, cost 1/AR with its CI). Writes
results.json (with the tables as text, for docs/make_docs.py) and results.md under --out.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from experiments import report
from experiments.l3m_length import corpus_rows, mean_ci, perplexity
from guard_jax import constraints as C
from guard_jax import proposals
from guard_jax.config import to_dict
from guard_jax.data.corpus import sentences
from guard_jax.estimators import wilson
from guard_jax.evaluate import Gold
from guard_jax.lm import LM
from guard_jax.proposals import DPGRecipeConfig, SFTRecipeConfig, named_key
from guard_jax.rejection import guard_sample
from guard_jax.sampling import draw, score
from guard_jax.train.aux import AuxConfig, AuxTrainer
from guard_jax.train.loop import LoopConfig, run

WARM = "warm-start DPG (SFT on b-filtered a, then DPG)"


@dataclasses.dataclass(frozen=True)
class AttributeConfig:
    """One run: `lambdas` are the KL weights (0 = SFT); each fine-tune runs `steps` steps of `corpus_batch`
    corpus rows and `n_samples` base samples (the head's BCE data). `sft` / `dpg`: the warm-start DPG's two
    stages (SFT on the b-filtered samples of `sft.draws` draws of a, then DPG off-policy from there)."""

    lambdas: tuple[float, ...] = (0.0, 1.0, 10.0)
    steps: int = 100
    max_new_tokens: int = 24
    negative_threshold: float = -0.3
    n_samples: int = 32
    corpus_batch: int = 16
    learning_rate: float = 3e-4
    n_train_docs: int | None = None
    n_eval: int = 512
    n_guard: int = 256
    n_val_docs: int | None = None
    ppl_max_len: int = 128
    sft: SFTRecipeConfig = SFTRecipeConfig(draws=2048, epochs=1.0, batch_size=16, learning_rate=3e-4)
    dpg: DPGRecipeConfig = DPGRecipeConfig(steps=20, n_samples=64, minibatch=64, learning_rate=1e-4)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "lambdas", tuple(float(x) for x in self.lambdas))
        if not self.lambdas or min(self.lambdas) < 0:
            raise ValueError(f"lambdas must be a non-empty list of weights >= 0, got {self.lambdas}")
        if not -1 < self.negative_threshold < 1:
            raise ValueError(f"negative_threshold is a VADER compound score in (-1, 1), got {self.negative_threshold}")
        if min(self.steps, self.n_eval, self.n_guard) < 1:
            raise ValueError("steps, n_eval and n_guard must be >= 1")


def has_negative_sentence(threshold: float):
    """texts -> bool array: some sentence of the text has VADER compound <= threshold (the "toxic" attribute)."""

    def test(texts):
        out = np.zeros(len(texts), bool)
        for i, t in enumerate(texts):
            parts = sentences(t) or [t]
            out[i] = bool(np.any(C.vader_positive(parts) <= threshold))
        return out

    return test


def kl_to_base(policy: LM, base: LM, d) -> dict:
    """KL(p || a) as the mean of log p(y) - log a(y) over samples y of p (normal 95% CI)."""
    return mean_ci(d.logp_N - score(base, d.tokens_NT, d.lengths_N, batch_size=min(256, len(d.lengths_N))))


def inverse(ar: dict) -> dict:
    """The cost 1/AR with the interval [1/hi, 1/lo] of the acceptance rate's interval (inf where lo = 0)."""
    return {"value": 1 / ar["value"] if ar["value"] > 0 else float("inf"), "lo": 1 / ar["hi"],
            "hi": 1 / ar["lo"] if ar["lo"] > 0 else float("inf")}


def run_experiment(cfg: AttributeConfig, *, progress: bool = False) -> dict:
    t_start = time.perf_counter()
    base = LM.load("embedded")
    T = cfg.max_new_tokens
    toxic = has_negative_sentence(cfg.negative_threshold)
    constraint = ~C.text(base.tokenizer, toxic, f"vader_negative<={cfg.negative_threshold:g}")
    corpus = corpus_rows(base, "train", T, cfg.n_train_docs)
    val = corpus_rows(base, "validation", cfg.ppl_max_len, cfg.n_val_docs)
    key = jax.random.PRNGKey(cfg.seed + 1)
    results = {"config": to_dict(cfg), "models": {}, "guard": {}}

    def evaluate(name, lm, seconds):
        d = draw(named_key(key, "eval"), lm, cfg.n_eval, max_new_tokens=T, batch_size=min(cfg.n_eval, 256), progress=False)
        bad = int(toxic(lm.decode(d.tokens_NT, d.lengths_N)).sum())
        results["models"][name] = {"attribute_rate": wilson(bad, cfg.n_eval)._asdict(), "validation_perplexity": perplexity(lm, *val),
                                   "kl_to_base": kl_to_base(lm, base, d), "train_seconds": seconds,
                                   "example": lm.decode(d.tokens_NT[:1], d.lengths_N[:1])[0]}
        return d

    d = evaluate("base", base, 0.0)
    keep = np.asarray(constraint(d.tokens_NT, d.lengths_N), bool)
    gold = Gold(d.tokens_NT[keep], d.lengths_N[keep], d.logp_N[keep], int(keep.sum()), cfg.n_eval, T)
    policies, optimizer = {}, None
    for lam in cfg.lambdas:
        aux_cfg = AuxConfig(n_samples=cfg.n_samples, max_new_tokens=T, learning_rate=cfg.learning_rate, kl_weight=lam,
                            corpus_batch=cfg.corpus_batch, seed=cfg.seed)
        trainer = AuxTrainer(base, base.model, constraint, aux_cfg, corpus=corpus)
        optimizer = trainer.optimizer = optimizer or trainer.optimizer  # one optimizer instance: one compiled update for all lambdas
        t0 = time.perf_counter()
        state, history = run(trainer, trainer.init_state({"head": proposals.zero_head(base.params), "policy": base.params}),
                             LoopConfig(steps=cfg.steps, seed=cfg.seed, progress=progress))
        policies[lam] = trainer.policy_lm(state)
        name = f"aux lambda={lam:g}" + (" (SFT)" if lam == 0 else "")
        evaluate(name, policies[lam], time.perf_counter() - t0)
        results["models"][name]["history"] = {k: [float(h[k]) for h in history] for k in ("nll", "token_kl", "bce", "ar")}
        if lam == max(cfg.lambdas):  # the head it learnt (BCE on samples of a, the same at every lambda but for the shared step)
            evaluate(f"q = a·sigmoid(R), the head of lambda={lam:g}", trainer.proposal(state), 0.0)
    t0 = time.perf_counter()
    start = proposals.sft(base, constraint, gold, cfg.sft, key=named_key(key, "sft"), batch_size=min(cfg.sft.draws, 256),
                          progress=progress, tensorboard=False)
    warm = proposals.warm_start_dpg(base, constraint, gold, cfg.dpg, key=named_key(key, "dpg"), start=start, progress=progress,
                                    tensorboard=False)
    evaluate(WARM, warm.lm, time.perf_counter() - t0)
    results["models"][WARM]["train_samples"] = warm.train_samples
    largest = f"aux lambda={max(cfg.lambdas):g}" + (" (SFT)" if max(cfg.lambdas) == 0 else "")
    for name, proposal in (("a", base), (WARM, warm.lm), (largest, policies[max(cfg.lambdas)])):
        g = guard_sample(named_key(key, "guard", name), proposal, constraint, cfg.n_guard, max_new_tokens=T,
                         batch_size=min(cfg.n_guard, 256), progress=False)
        bad = int(toxic(proposal.decode(g.tokens_NT, g.lengths_N)).sum())
        ar = g.ar._asdict()
        results["guard"][name] = {"attribute_rate": wilson(bad, len(g.lengths_N))._asdict(), "ar": ar, "cost": inverse(ar),
                                  "draws": g.draws, "accepted": g.accepted}
    results["seconds"] = time.perf_counter() - t_start
    results["tables"] = tables(results)
    return results


def _ci(e: dict, digits: int = 3) -> str:
    return f"{e['value']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def trade_off(results: dict) -> str:
    """One sentence: whether, over increasing lambda, the attribute rate falls and the perplexity rises
    monotonically (point estimates), naming each step where either does not and whether the rates' CIs overlap."""
    rows = sorted(((m, float(n.split("=")[1].split()[0])) for n, m in results["models"].items() if n.startswith("aux lambda=")),
                  key=lambda r: r[1])
    if len(rows) < 2:
        return "One lambda only: no trade-off to read."
    breaks = []
    for (m0, l0), (m1, l1) in zip(rows, rows[1:]):
        r0, r1 = m0["attribute_rate"], m1["attribute_rate"]
        p0, p1 = m0["validation_perplexity"], m1["validation_perplexity"]
        overlap = "overlapping CIs" if r1["lo"] <= r0["hi"] and r0["lo"] <= r1["hi"] else "disjoint CIs"
        if r1["value"] > r0["value"]:
            breaks.append(f"the attribute rate rises from lambda={l0:g} to {l1:g} ({r0['value']:.3f} -> {r1['value']:.3f}, {overlap})")
        if p1 < p0:
            breaks.append(f"the perplexity falls from lambda={l0:g} to {l1:g} ({p0:.2f} -> {p1:.2f})")
    first, last = rows[0][0], rows[-1][0]
    span = (f"from lambda={rows[0][1]:g} to {rows[-1][1]:g} the attribute rate goes {first['attribute_rate']['value']:.3f} -> "
            f"{last['attribute_rate']['value']:.3f} and the perplexity {first['validation_perplexity']:.2f} -> {last['validation_perplexity']:.2f}")
    if not breaks:
        return f"Monotone trade-off (point estimates): {span}."
    return f"Not monotone: {'; '.join(breaks)}. Overall, {span}."


def tables(results: dict) -> dict:
    """The report's tables as markdown text: "models", "guard" and "trade_off" (one sentence)."""
    models = ["| model | train s | attribute rate (95% CI) | validation perplexity | KL(p \\|\\| a) nats (95% CI) |", "|---|---|---|---|---|"]
    for name, m in results["models"].items():
        models.append(f"| {name} | {m['train_seconds']:.0f} | {_ci(m['attribute_rate'])} | {m['validation_perplexity']:.2f} | "
                      f"{_ci(m['kl_to_base'])} |")
    guard = ["| GUARD rejection sampling, proposal | violations (95% CI) | acceptance rate (95% CI) | cost 1/AR (95% CI) | draws |",
             "|---|---|---|---|---|"]
    for name, g in results["guard"].items():
        guard.append(f"| {name} | {_ci(g['attribute_rate'])} | {_ci(g['ar'])} | {_ci(g['cost'], 2)} | {g['draws']} |")
    return {"models": "\n".join(models), "guard": "\n".join(guard), "trade_off": trade_off(results)}


def markdown(results: dict, command: str) -> str:
    cfg, t = results["config"], results["tables"]
    return "\n".join([
        *report.header("Attribute-controlled fine-tuning on the embedded model (VADER-negative sentences as \"toxicity\")", command, results),
        f"Attribute: some sentence of the continuation has VADER compound <= {cfg['negative_threshold']:g}; "
        f"max_new_tokens = {cfg['max_new_tokens']}; {cfg['steps']} steps per fine-tune, corpus batch {cfg['corpus_batch']}, "
        f"{cfg['n_samples']} base samples per step for the head, lr {cfg['learning_rate']:g}; {cfg['n_eval']} samples per model, "
        f"{cfg['n_guard']} GUARD samples per proposal.", "",
        t["models"], "", t["trade_off"], "", t["guard"], ""])


def main(argv=None) -> dict:
    return report.main(argv, name="attribute_finetune", doc=__doc__, config_cls=AttributeConfig, run_experiment=run_experiment,
                       markdown=markdown)


if __name__ == "__main__":
    main()
