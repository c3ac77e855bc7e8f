"""The grammar task: the embedded base LM a, b = "the continuation is one sentence of a small CFG" (at least
two comma-separated clauses of words, parenthesised and quoted groups, ending with . ! or ?, within
max_new_tokens; AR_a about 0.01), GUARD's trained proposals and the grammar-constrained baselines in one table
of AR_a', KL(g||a'), KL(g||g'), KL(g'||g) with 95% CIs, as in the lexical and sentiment experiments.

    python -m experiments.grammar_task --quick            # the test settings (configs/grammar_quick.json)
    python -m experiments.grammar_task                    # configs/grammar_full.json
    python -m experiments.grammar_task --set max_new_tokens=20 --set 'proposals=["masked","asap"]'

The grammar is bound to a's tokenizer through llguidance (`guard_jax.grammars.Grammar`): b for gold, GUARD and
every estimator; its masks for the masked recipes. Proposals (`guard_jax.proposals`): `sft_a` (SFT on the
b-filtered samples of a), `dpg`, `sft_dpg` (warm-start DPG from sft_a), `masked` (masked decoding; not
length-aware, so a sentence still open at max_new_tokens fails b), `sft_masked`, `asap` (ASAp's law after N
sequential samples; its N, accepted count, root bound theta~ >= Z and trie size under the table), `sft_asap`.
GUARD with a' returns g' = a' b / AR_a' exactly; g' = g only when a' = a.

Writes results/<config name>_seed<k>/ like experiments/lexical.py (results.json, results.md, figures, runs/);
the same command-line options, `--set KEY=VALUE` included.
"""

from __future__ import annotations

import hashlib
import re

from experiments import lexical, pipeline
from experiments.config import GrammarConfig
from guard_jax.grammars import Grammar
from guard_jax.metrics.position import first_positions


def tasks(setup: pipeline.Setup) -> list[pipeline.Task]:
    """One unconditional task: b = the grammar (its name holds a digest of the grammar text, so runs with
    other grammars never share a run folder), masks from the same grammar; positions of `position_regex`."""
    cfg = setup.config
    grammar = Grammar.lark(cfg.grammar, setup.a.tokenizer, vocab_size=setup.a.model.vocab_size)
    name = f"lark:{hashlib.sha256(cfg.grammar.encode()).hexdigest()[:12]}"
    pattern = re.compile(cfg.position_regex)
    return [pipeline.Task("bos", "", cfg.cap_prompt, grammar.constraint(name),
                          lambda texts: first_positions(texts, pattern, "relative"), None, grammar)]


def main(argv: list[str] | None = None) -> dict:
    args = lexical.parser(__doc__).parse_args(argv)
    setup = lexical.build_setup(args, "grammar", GrammarConfig)
    return lexical.run_and_report(setup, tasks(setup), pipeline.results_dir(setup.config, args.out), args)


if __name__ == "__main__":
    main()
