"""The grammar task: the embedded base LM a, b = "the continuation is one sentence of a small CFG" (words, commas,
parenthesised and quoted groups, ending with . ! or ?, then EOS, within max_new_tokens), and the samplers
GUARD is compared with, in one table of AR_a', KL(g||a'), KL(g||g'), KL(g'||g) with 95% CIs.

    python -m experiments.grammar_task --quick                  # the test settings (configs/grammar_quick.json)
    python -m experiments.grammar_task                          # configs/grammar_full.json
    python -m experiments.grammar_task --config FILE --out DIR

Rows (g = a b / Z, estimated from b-filtered draws of a; g' = a' b / AR_a', the law GUARD returns with a'):
- `guard (a' = a)`: GUARD's rejection sampler on a itself: g' = g exactly (KL(g||g') = 0), AR = Z;
- `masking`: masked decoding with the grammar's masks (llguidance, not length-aware: a sentence still open
  after max_new_tokens fails b); a' = the masked law q, scored by `Asap.log_prob` with an empty trie;
- `asap after N`: ASAp's proposal after N samples (its trie's law, drawn by `Asap.draw`), with its own
  figures: the fraction of its N samples that satisfied b, the root bound theta~ >= Z, and Z by importance
  weighting its samples (each is drawn from a known law, so a b / q is unbiased for Z).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np

from guard_jax import estimators as E
from guard_jax.decoding import Asap, grammar_masked_sample
from guard_jax.grammars import Grammar
from guard_jax.lm import LM
from guard_jax.rejection import guard_sample
from guard_jax.sampling import draw

CONFIGS = pathlib.Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class GrammarTaskConfig:
    """One run of the grammar task. `grammar`: Lark text (rule `start`); counts are samples; `asap_samples`:
    the ASAp run's length N, `asap_batch` rows per trie update."""

    name: str = "grammar"
    seed: int = 0
    model: str = "embedded"
    grammar: str = ('start: clause ("," clause)* END\nclause: (" " item)+\nitem: WORD | "(" words ")" | "\\"" words "\\""\n'
                    "words: WORD (\" \" WORD)*\nWORD: /[A-Za-z']+/\nEND: \".\" | \"!\" | \"?\"\n")
    max_new_tokens: int = 24
    batch_size: int = 512
    n_a: int = 8192
    n_a2: int = 1024
    n_guard: int = 256
    asap_samples: int = 256
    asap_batch: int = 16

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "GrammarTaskConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**data)


def _masked_draw(key, lm: LM, grammar: Grammar, n: int, T: int, batch_size: int):
    """n masked-decoding samples: tokens_NT, lengths_N, logq_N, loga_N."""
    prompt, mask = lm.prompt_arrays(min(batch_size, n))
    parts = []
    for i in range(-(-n // prompt.shape[0])):
        s = grammar_masked_sample(jax.random.fold_in(key, i), lm.model, lm.params, prompt, mask, grammar, T)
        parts.append((s.tokens_BT, s.lengths_B, s.logp_B, s.base_logp_B))
    return tuple(np.concatenate(x)[:n] for x in zip(*parts))


def _row(name, gold, b, logq_G, draws_q, note=""):
    """AR and the three KLs of a proposal q from gold (g-samples scored by a and q) and q's own draws."""
    tokens, lengths, logq, loga = draws_q
    ok = np.asarray(b(tokens, lengths), bool)
    k, n = int(ok.sum()), len(ok)
    row = {"method": name, "AR_a2": E.estimate_ar(k, n)._asdict(), "accepted": k, "draws": n, "note": note}
    row["KL(g||a2)"] = E.estimate_kl_g_a2(gold["logp_a"], logq_G, gold["accepted"], gold["draws"])._asdict()
    if k:
        row["KL(g||g2)"] = E.estimate_kl_g_g2(gold["logp_a"], logq_G, gold["accepted"], gold["draws"], k, n)._asdict()
    if k >= 2:
        row["KL(g2||g)"] = E.estimate_kl_g2_g(logq[ok], loga[ok], k, n, gold["accepted"], gold["draws"])._asdict()
    return row


def run(config: GrammarTaskConfig, out: pathlib.Path | None = None, progress: bool = True) -> dict:
    """Run the task -> results (also written to out/results.json and out/results.md when `out` is given)."""
    t0 = time.perf_counter()
    key = jax.random.PRNGKey(config.seed)
    lm = LM.load(config.model)
    T = config.max_new_tokens
    grammar = Grammar.lark(config.grammar, lm.tokenizer, vocab_size=lm.model.vocab_size)
    b = grammar.constraint("sentence CFG")
    d = draw(jax.random.fold_in(key, 0), lm, config.n_a, max_new_tokens=T, batch_size=config.batch_size, progress=progress)
    tokens, lengths, logp_a = d.tokens_NT, d.lengths_N, d.logp_N
    ok = np.asarray(b(tokens, lengths), bool)
    if ok.sum() < 2:
        raise ValueError(f"only {int(ok.sum())} of {config.n_a} draws of a satisfy the grammar: raise n_a")
    gold = {"tokens": tokens[ok], "lengths": lengths[ok], "logp_a": logp_a[ok], "accepted": int(ok.sum()), "draws": config.n_a}
    z = E.estimate_ar(gold["accepted"], gold["draws"])
    rows = []

    guard = guard_sample(jax.random.fold_in(key, 1), lm, b, config.n_guard, max_new_tokens=T,
                         batch_size=config.batch_size, progress=progress)
    kl_g_a = E.estimate_kl_g_a(z)  # -log Z
    rows.append({"method": "guard (a' = a)", "AR_a2": guard.ar._asdict(), "accepted": guard.accepted, "draws": guard.draws,
                 "KL(g||a2)": kl_g_a._asdict(), "KL(g||g2)": {"value": 0.0, "exact": True}, "KL(g2||g)": {"value": 0.0, "exact": True},
                 "note": "every sample satisfies b; its law is g"})

    masking = Asap(lm.model, lm.params, grammar, T, prompt_1P=np.asarray(lm.prompt))  # empty trie: masking's law
    logq_G = masking.log_prob(gold["tokens"], gold["lengths"])
    draws_q = _masked_draw(jax.random.fold_in(key, 2), lm, grammar, config.n_a2, T, config.batch_size)
    rows.append(_row("masking", gold, b, logq_G, draws_q, "a sentence still open after max_new_tokens fails b"))

    asap = Asap(lm.model, lm.params, grammar, T, prompt_1P=np.asarray(lm.prompt))
    run_N = asap.sample(jax.random.fold_in(key, 3), config.asap_samples, batch_size=config.asap_batch)
    log_target = np.where(run_N.accepted_N, run_N.base_logp_N, -np.inf)
    z_is = E.estimate_log_z_is(log_target, run_N.logq_N) if run_N.accepted_N.any() else None
    q_N = asap.draw(jax.random.fold_in(key, 4), config.n_a2, batch_size=config.batch_size)
    note = (f"its {config.asap_samples} samples: {int(run_N.accepted_N.sum())} satisfy b; root bound {math.exp(asap.root_log_theta):.4g} >= Z"
            + (f"; Z by importance weights {math.exp(z_is.log_z.value):.4g} [{math.exp(z_is.log_z.lo):.4g}, {math.exp(z_is.log_z.hi):.4g}]" if z_is else ""))
    rows.append(_row(f"asap after {config.asap_samples}", gold, b, asap.log_prob(gold["tokens"], gold["lengths"]),
                     (q_N.tokens_NT, q_N.lengths_N, q_N.logq_N, q_N.base_logp_N), note))
    results = {"config": dataclasses.asdict(config), "Z": z._asdict(), "KL(g||a)": kl_g_a._asdict(), "rows": rows,
               "asap": {"samples": config.asap_samples, "accepted": int(run_N.accepted_N.sum()), "root_theta": math.exp(asap.root_log_theta),
                        "trie_nodes": len(asap.nodes), "z_importance": None if z_is is None else z_is.log_z._asdict()},
               "seconds": time.perf_counter() - t0}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(markdown(results))
    return results


def _fmt(e: dict | None) -> str:
    if e is None:
        return "—"
    if e.get("exact"):
        return f"{e['value']:.3g} (exact)"
    return f"{e['value']:.3g} [{e['lo']:.3g}, {e['hi']:.3g}]"


def markdown(results: dict) -> str:
    """The results table (95% CIs in brackets)."""
    c = results["config"]
    lines = [f"Z = AR_a = {_fmt(results['Z'])}, KL(g||a) = {_fmt(results['KL(g||a)'])}; {c['n_a']:,} draws of a, "
             f"max_new_tokens = {c['max_new_tokens']}, seed {c['seed']}.", "",
             "| method | AR_a' | KL(g‖a') | KL(g‖g') | KL(g'‖g) | note |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {_fmt(r['AR_a2'])} | {_fmt(r.get('KL(g||a2)'))} | {_fmt(r.get('KL(g||g2)'))} | "
                     f"{_fmt(r.get('KL(g2||g)'))} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="JSON config (default: configs/grammar_full.json, or _quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the test settings (configs/grammar_quick.json)")
    p.add_argument("--out", default="results", help="results folder (a subfolder per config name and seed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no table on stdout")
    args = p.parse_args(argv)
    path = pathlib.Path(args.config or CONFIGS / ("grammar_quick.json" if args.quick else "grammar_full.json"))
    config = GrammarTaskConfig.from_dict(json.loads(path.read_text()), str(path))
    results = run(config, pathlib.Path(args.out) / f"{config.name}_seed{config.seed}", progress=not args.quiet)
    if not args.quiet:
        print(markdown(results))
    return results


if __name__ == "__main__":
    main()
