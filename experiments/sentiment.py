"""The paper's sentiment-reversal experiment: continue a negative story opening with `max_new_tokens` tokens
(the paper: 80) so that the last sentence of opening + continuation is positive.

Contexts: the first sentences of corpus documents whose VADER compound score is below `context_threshold`
(the paper: ROCStories openings with a low joy score), the first `n_contexts` in corpus order. Constraint:
VADER compound of the last sentence > `threshold` (`guard_jax.constraints.classifier_threshold` with
`vader_positive`; the paper: an emotion classifier's joy > 0.98), threshold chosen so AR_a is near 0.005.
Every proposal is trained per context (as the paper, which uses one opening); the tables give each context
and the average.

    python -m experiments.sentiment --quick
    python -m experiments.sentiment --config experiments/configs/sentiment_full.json [--model PATH] [--seed k]
    python -m experiments.sentiment --find-threshold --find-draws 4000    # thresholds giving AR near 0.005
"""

from __future__ import annotations

import re

import numpy as np

from experiments import pipeline
from experiments.config import SentimentConfig
from experiments.lexical import build_setup, parser, run_and_report
from experiments.lexical import check_settings as lexical_check
from guard_jax import constraints as C
from guard_jax.data import corpus
from guard_jax.estimators import wilson
from guard_jax.io import atomic_write_json
from guard_jax.sampling import draw


def _story_like(sentence: str) -> bool:
    """A plain narrative sentence: starts with a capital letter, has 6+ words, ends with a full stop (not 'Mr.')."""
    return (sentence[:1].isupper() and len(sentence.split()) >= 6 and sentence.endswith(".")
            and not re.search(r"\b(Mr|Mrs|Dr|St|Ms|Jr)\.$", sentence) and ":" not in sentence)


def negative_openings(n: int, threshold: float, split: str = "validation", min_chars: int = 30, max_chars: int = 160) -> list[str]:
    """The first sentences (min_chars..max_chars characters, ending with '.') of `split`'s documents with VADER
    compound < threshold, the first n in corpus order."""
    out = []
    for doc in corpus.load(split=split):
        sents = corpus.sentences(doc)
        first = sents[0].strip() if sents else ""
        if len(sents) < 2 or not (min_chars <= len(first) <= max_chars) or not _story_like(first):
            continue
        if C.vader_positive([first])[0] < threshold:
            out.append(first)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} openings of the {split} split have VADER compound < {threshold}; "
                     f"lower n_contexts or raise context_threshold")


def continuation_positions(prefix: str):
    """Where the last sentence (the one b judges) starts in each continuation, relative to its length."""

    def positions(texts: list[str]) -> np.ndarray:
        out = np.full(len(texts), np.nan)
        for i, t in enumerate(texts):
            full = prefix + t
            last = C.last_sentence(full)
            if t and last:
                out[i] = min(max(full.rfind(last) - len(prefix), 0) / len(t), np.nextafter(1.0, 0.0))
        return out

    return positions


def tasks(setup: pipeline.Setup) -> list[pipeline.Task]:
    cfg = setup.config
    openings = negative_openings(cfg.n_contexts, cfg.context_threshold)
    return [pipeline.Task(f"ctx{i}", o, cfg.cap_prompt,
                          C.classifier_threshold(setup.a.tokenizer, C.vader_positive, cfg.threshold, prefix=o, name="vader_last"),
                          continuation_positions(o))
            for i, o in enumerate(openings)]


def find_threshold(setup: pipeline.Setup, draws: int, target: float) -> list[dict]:
    """Per context: the VADER threshold whose AR_a is `target` (the (1 - target) quantile of the last-sentence
    scores of `draws` samples of a), and AR_a at the config's threshold with a Wilson CI."""
    rows = []
    for task in tasks(setup):
        d = draw(setup.key(task.name, "find-threshold"), setup.a.with_context(task.context), draws,
                 max_new_tokens=setup.config.max_new_tokens, batch_size=setup.config.batch_size, progress=setup.progress,
                 desc=f"[{task.name}] sampling a")
        texts = [C.last_sentence(task.context + t) for t in setup.a.decode(d.tokens_NT, d.lengths_N)]
        s = C.vader_positive(texts)
        k = int((s > setup.config.threshold).sum())
        e = wilson(k, draws)
        rows.append({"context": task.context, "quantile_threshold": float(np.quantile(s, 1 - target)), "config_threshold": setup.config.threshold,
                     "accepted": k, "draws": draws, "ar": e.value, "lo": e.lo, "hi": e.hi})
    return rows


def check_settings(argv: list[str]) -> list[str]:
    """`experiments.lexical.check_settings` for this experiment's configs."""
    return lexical_check(argv, "sentiment", SentimentConfig)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--find-threshold", action="store_true", help="report thresholds giving AR_a near --target-ar, per context")
    p.add_argument("--find-draws", type=int, default=4000)
    p.add_argument("--target-ar", type=float, default=0.005)
    args = p.parse_args(argv)
    setup = build_setup(args, "sentiment", SentimentConfig)
    out = pipeline.results_dir(setup.config, args.out)
    if args.find_threshold:
        rows = find_threshold(setup, args.find_draws, args.target_ar)
        for r in rows:
            print(f"{r['context']!r}\n  threshold for AR {args.target_ar}: {r['quantile_threshold']:.4f};  AR at {r['config_threshold']}: "
                  f"{r['ar']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}] ({r['accepted']} / {r['draws']:,})")
        atomic_write_json(out / "find_threshold.json", {"model": setup.config.model, "target": args.target_ar, "rows": rows})
        return {"find_threshold": rows}
    return run_and_report(setup, tasks(setup), out, args)


if __name__ == "__main__":
    main()
