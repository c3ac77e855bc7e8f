"""Attribute-controlled fine-tuning (the auxiliary-model method) on the embedded model, beside GUARD's rejection sampler.

    python -m experiments.attribute_finetune --quick         # tiny, seconds (run by the tests)
    python -m experiments.attribute_finetune --config experiments/configs/attribute_finetune_full.json --out results/attribute

The attribute treated as "toxicity": the continuation holds a sentence whose VADER compound score is
<= `negative_threshold` (offline, lexicon-based). The constraint is b = "no such sentence". For each
lambda in `lambdas`, `AuxTrainer` with the training corpus fine-tunes the embedded base LM: loss = corpus
NLL + lambda · per-token KL(q || p), q = a · sigmoid(R), the value head R learning concurrently by BCE on
b-labelled samples of a. lambda = 0 is plain SFT. Reported per model: the attribute rate of samples
(Wilson 95% CI), validation perplexity, KL(p || a) (mean log-ratio on samples of p, normal 95% CI); and
GUARD's rejection sampler on the same constraint with a (0 violations by construction, cost 1/AR) and with
the largest-lambda policy as proposal. Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.l3m_length import config_from_dict, corpus_rows, mean_ci, perplexity
from guard_jax import constraints as C
from guard_jax.data.corpus import sentences
from guard_jax.estimators import wilson
from guard_jax.io import atomic_write_json, atomic_write_text
from guard_jax.lm import LM
from guard_jax.rejection import guard_sample
from guard_jax.sampling import draw, score
from guard_jax.train.aux import AuxConfig, AuxTrainer
from guard_jax.train.loop import LoopConfig, run

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass(frozen=True)
class AttributeConfig:
    """One run: `lambdas` are the KL weights (0 = SFT); each fine-tune runs `steps` steps."""

    lambdas: tuple[float, ...] = (0.0, 1.0, 10.0)
    steps: int = 100
    max_new_tokens: int = 32
    negative_threshold: float = -0.5
    n_samples: int = 32
    corpus_batch: int = 16
    learning_rate: float = 3e-4
    n_train_docs: int | None = None
    n_eval: int = 512
    n_guard: int = 128
    n_val_docs: int | None = None
    ppl_max_len: int = 128
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


def zero_head(params):
    """The value head's start: a copy of a's params with GPT-2's final layer-norm scale at 0, so R = 0 (q = a)
    while the features below still carry gradient."""
    return {**params, "ln_f": {**params["ln_f"], "scale": jnp.zeros_like(params["ln_f"]["scale"])}}


def kl_to_base(policy: LM, base: LM, d) -> dict:
    """KL(p || a) as the mean of log p(y) - log a(y) over samples y of p (normal 95% CI)."""
    return mean_ci(d.logp_N - score(base, d.tokens_NT, d.lengths_N, batch_size=min(256, len(d.lengths_N))))


def run_experiment(cfg: AttributeConfig, *, progress: bool = False) -> dict:
    t_start = time.perf_counter()
    base = LM.load("embedded")
    T = cfg.max_new_tokens
    toxic = has_negative_sentence(cfg.negative_threshold)
    constraint = ~C.text(base.tokenizer, toxic, f"vader_negative<={cfg.negative_threshold}")
    corpus = corpus_rows(base, "train", T, cfg.n_train_docs)
    val = corpus_rows(base, "validation", cfg.ppl_max_len, cfg.n_val_docs)
    key = jax.random.PRNGKey(cfg.seed + 1)
    results = {"config": dataclasses.asdict(cfg), "models": {}, "guard": {}}

    def evaluate(name, lm, seconds):
        d = draw(jax.random.fold_in(key, 0), lm, cfg.n_eval, max_new_tokens=T, batch_size=min(cfg.n_eval, 256), progress=False)
        bad = int(toxic(lm.decode(d.tokens_NT, d.lengths_N)).sum())
        results["models"][name] = {"attribute_rate": wilson(bad, cfg.n_eval)._asdict(), "validation_perplexity": perplexity(lm, *val),
                                   "kl_to_base": kl_to_base(lm, base, d), "train_seconds": seconds,
                                   "example": lm.decode(d.tokens_NT[:1], d.lengths_N[:1])[0]}

    evaluate("base", base, 0.0)
    policies, optimizer = {}, None
    for lam in cfg.lambdas:
        aux_cfg = AuxConfig(n_samples=cfg.n_samples, max_new_tokens=T, learning_rate=cfg.learning_rate, kl_weight=lam,
                            corpus_batch=cfg.corpus_batch, seed=cfg.seed)
        trainer = AuxTrainer(base, base.model, constraint, aux_cfg, corpus=corpus)
        optimizer = trainer.optimizer = optimizer or trainer.optimizer  # one optimizer instance: one compiled update for all lambdas
        t0 = time.perf_counter()
        state, history = run(trainer, trainer.init_state({"head": zero_head(base.params), "policy": base.params}),
                             LoopConfig(steps=cfg.steps, seed=cfg.seed, progress=progress))
        policies[lam] = trainer.policy_lm(state)
        name = f"aux lambda={lam:g}" + (" (SFT)" if lam == 0 else "")
        evaluate(name, policies[lam], time.perf_counter() - t0)
        results["models"][name]["history"] = {k: [h[k] for h in history] for k in ("nll", "token_kl", "bce", "ar")}
    for name, proposal in (("GUARD with a", base), (f"GUARD with aux lambda={max(cfg.lambdas):g}", policies[max(cfg.lambdas)])):
        g = guard_sample(jax.random.fold_in(key, 1), proposal, constraint, cfg.n_guard, max_new_tokens=T,
                         batch_size=min(cfg.n_guard, 256), progress=False)
        bad = int(toxic(proposal.decode(g.tokens_NT, g.lengths_N)).sum())
        results["guard"][name] = {"attribute_rate": wilson(bad, len(g.lengths_N))._asdict(), "ar": g.ar._asdict(),
                                  "draws": g.draws, "accepted": g.accepted}
    results["seconds"] = time.perf_counter() - t_start
    return results


def _ci(e: dict, digits: int = 3) -> str:
    return f"{e['value']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def markdown(results: dict, command: str) -> str:
    cfg = results["config"]
    lines = ["# Attribute-controlled fine-tuning on the embedded model (VADER-negative sentences as \"toxicity\")", "",
             f"Command: `{command}` ({results['seconds']:.0f} s on a shared, loaded 2-core CPU).", "",
             f"Attribute: some sentence of the continuation has VADER compound <= {cfg['negative_threshold']:g}; "
             f"max_new_tokens = {cfg['max_new_tokens']}; {cfg['steps']} steps per fine-tune, corpus batch {cfg['corpus_batch']}, "
             f"{cfg['n_samples']} base samples per step for the head, lr {cfg['learning_rate']:g}; {cfg['n_eval']} samples per model.", "",
             "| model | attribute rate (95% CI) | validation perplexity | KL(p \\|\\| a) nats (95% CI) |", "|---|---|---|---|"]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {_ci(m['attribute_rate'])} | {m['validation_perplexity']:.2f} | {_ci(m['kl_to_base'])} |")
    lines += ["", "| GUARD rejection sampling | attribute rate (95% CI) | acceptance rate (95% CI) | cost 1/AR | draws |", "|---|---|---|---|---|"]
    for name, g in results["guard"].items():
        lines.append(f"| {name} | {_ci(g['attribute_rate'])} | {_ci(g['ar'])} | {1 / g['ar']['value']:.2f} | {g['draws']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny configs/attribute_finetune_quick.json (seconds)")
    parser.add_argument("--config", type=pathlib.Path, help="JSON object of AttributeConfig fields (the rest keep their defaults)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/attribute_finetune"))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    path = args.config or (CONFIGS / "attribute_finetune_quick.json" if args.quick else None)
    cfg = AttributeConfig() if path is None else config_from_dict(AttributeConfig, json.loads(path.read_text()), str(path))
    results = run_experiment(cfg, progress=args.progress)
    command = "python -m experiments.attribute_finetune" + (" --quick" if args.quick else "") + (f" --config {args.config}" if args.config else "")
    atomic_write_json(args.out / "results.json", results)
    atomic_write_text(args.out / "results.md", markdown(results, command))
    return results


if __name__ == "__main__":
    main()
