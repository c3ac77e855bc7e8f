"""Self-BLEU of a set of texts: each text is scored by BLEU against all the others as references.

Self-BLEU-n (Zhu et al., 2018, Texygen; used by the DPG and GUARD papers) is the mean over texts i of
NLTK's `sentence_bleu(others, text_i, weights=(1/n,)*n, smoothing_function=SmoothingFunction().method1)`.
Higher means less diverse (1 = all texts identical).

NLTK rescans every reference for every hypothesis (quadratic in the number of texts, minutes for 1,000
samples). This module computes the same numbers from n-gram counts gathered once: for each n-gram it keeps
the largest and second-largest count over all texts, which gives the clipping count "max over the other
texts" of every hypothesis in O(1). tests/test_metrics.py checks it against NLTK itself on fixed texts.

Self-BLEU grows with the number of texts (each is scored against all the others, so more references match
more n-grams): two sets of samples are comparable only at the same size. `self_bleu_sets` scores disjoint
sets of one fixed size and averages them, so every sample counts and rows with different numbers of
samples (gold g vs a proposal's g') are compared at one size.

Texts are split into words with sacreBLEU's standard `13a` tokenizer by default (no data download, unlike
NLTK's `word_tokenize`); pass `tokenize` to change it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

EPSILON = 0.1  # NLTK SmoothingFunction().method1's default
ORDERS = (2, 3, 4, 5)


def tokenize_13a(text: str) -> list[str]:
    """sacreBLEU's `13a` (mteval-v13a) word tokenization, case kept."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = _cache.setdefault("13a", Tokenizer13a())
    return tok(text).split()


_cache: dict = {}


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[j : j + n]) for j in range(len(tokens) - n + 1))


def _clipped_counts_NK(counts: list[list[Counter]], max_order: int) -> np.ndarray:
    """numer_NK[i, k-1] = sum over n-grams g of text i: min(count_i(g), max_{j != i} count_j(g))."""
    N = len(counts)
    numer_NK = np.zeros((N, max_order), np.int64)
    for k in range(max_order):
        best1, n_best1, best2 = Counter(), Counter(), Counter()
        for i in range(N):
            for g, c in counts[i][k].items():
                if c > best1[g]:
                    best2[g], best1[g], n_best1[g] = best1[g], c, 1
                elif c == best1[g]:
                    n_best1[g] += 1
                elif c > best2[g]:
                    best2[g] = c
        for i in range(N):
            total = 0
            for g, c in counts[i][k].items():
                others_max = best2[g] if (c == best1[g] and n_best1[g] == 1) else best1[g]
                total += min(c, others_max)
            numer_NK[i, k] = total
    return numer_NK


def _closest_other_length_N(lengths_N: np.ndarray) -> np.ndarray:
    """For each text, the length of the other text closest to its own length (ties: the shorter), as NLTK."""
    values = sorted(set(lengths_N.tolist()))
    mult = Counter(lengths_N.tolist())
    out = np.empty_like(lengths_N)
    for i, L in enumerate(lengths_N.tolist()):
        if mult[L] > 1:
            out[i] = L
            continue
        pos = bisect.bisect_left(values, L)
        below = values[pos - 1] if pos > 0 else None
        above = values[pos + 1] if pos + 1 < len(values) else None
        cands = [v for v in (below, above) if v is not None]
        out[i] = min(cands, key=lambda v: (abs(v - L), v))
    return out


def self_bleu_per_text(texts: Sequence[str], orders: Sequence[int] = ORDERS,
                       tokenize: Callable[[str], list[str]] = tokenize_13a) -> np.ndarray:
    """Sentence BLEU of each text against all the others, for each order n. -> bleu_NO (float64), O = len(orders)."""
    if len(texts) < 2:
        raise ValueError(f"Self-BLEU needs at least 2 texts (each is scored against the others), got {len(texts)}")
    orders = tuple(int(n) for n in orders)
    if not orders or min(orders) < 1:
        raise ValueError(f"orders must be positive n-gram orders such as (2, 3, 4, 5), got {orders}")
    max_order = max(orders)
    tokens = [tokenize(t) for t in texts]
    counts = [[_ngrams(t, k) for k in range(1, max_order + 1)] for t in tokens]
    numer_NK = _clipped_counts_NK(counts, max_order)
    lengths_N = np.asarray([len(t) for t in tokens], np.int64)
    ref_len_N = _closest_other_length_N(lengths_N)
    bleu_NO = np.zeros((len(texts), len(orders)))
    for i in range(len(texts)):
        c, r = int(lengths_N[i]), int(ref_len_N[i])
        if numer_NK[i, 0] == 0:
            continue  # no unigram in common: BLEU is 0 (NLTK's rule)
        bp = 1.0 if c > r else math.exp(1 - r / c)
        for o, n in enumerate(orders):
            logs = []
            for k in range(n):
                denom = max(1, c - k)
                p = numer_NK[i, k] / denom if numer_NK[i, k] else EPSILON / denom
                logs.append((1 / n) * math.log(p))
            bleu_NO[i, o] = bp * math.exp(math.fsum(logs))
    return bleu_NO


def self_bleu(texts: Sequence[str], orders: Sequence[int] = ORDERS,
              tokenize: Callable[[str], list[str]] = tokenize_13a) -> dict[int, float]:
    """Self-BLEU-n for each n in `orders`: the mean over texts of BLEU-n against the other texts."""
    bleu_NO = self_bleu_per_text(texts, orders, tokenize)
    return {int(n): float(m) for n, m in zip(orders, bleu_NO.mean(axis=0))}


def self_bleu_sets(texts: Sequence[str], set_size: int, orders: Sequence[int] = ORDERS,
                   tokenize: Callable[[str], list[str]] = tokenize_13a) -> dict[int, float]:
    """Self-BLEU-n at a fixed set size: the mean of `self_bleu` over the consecutive disjoint sets of `set_size`
    texts (floor(N / set_size) sets; the last N mod set_size texts are left out)."""
    if set_size < 2:
        raise ValueError(f"set_size must be >= 2 (Self-BLEU scores each text against the others), got {set_size}")
    if len(texts) < set_size:
        raise ValueError(f"self_bleu_sets needs at least set_size={set_size} texts, got {len(texts)}; lower set_size")
    sets = [texts[i : i + set_size] for i in range(0, len(texts) - set_size + 1, set_size)]
    scores = [self_bleu(s, orders, tokenize) for s in sets]
    return {n: float(np.mean([s[n] for s in scores])) for n in scores[0]}


def common_set_size(counts: Sequence[int], n_max: int, min_set: int = 20) -> int | None:
    """The Self-BLEU set size shared by rows with `counts` samples each (e.g. gold and every proposal of one
    context): the fewest samples a row has (at most n_max), among the rows with at least min_set samples;
    None when no row has that many."""
    sizes = [min(n, n_max) for n in counts if n >= max(min_set, 2)]
    return min(sizes) if sizes else None


def diversity_report(texts: Sequence[str], set_size: int | None, semantic: bool = True) -> dict:
    """Self-BLEU-2..5 on disjoint sets of `set_size` texts (`self_bleu_sets`: comparable across rows with
    different numbers of samples; None when there are fewer texts or `set_size` is None) and, when `semantic`
    and the optional extra is installed, semantic similarity (mean pairwise cosine of all the texts, whose
    expectation does not depend on their number). Notes say why a value is missing.

    -> {"n", "self_bleu": {"2": ..., "5": ...} | None, "self_bleu_set", "self_bleu_note", "semantic_similarity",
    "semantic_note"}.
    """
    out: dict = {"n": len(texts), "self_bleu": None, "self_bleu_set": None, "self_bleu_note": None,
                 "semantic_similarity": None, "semantic_note": None}
    if len(texts) < 2:
        out["self_bleu_note"] = out["semantic_note"] = "fewer than 2 samples"
        return out
    if set_size is not None and len(texts) >= set_size:
        out["self_bleu"] = {str(k): v for k, v in self_bleu_sets(list(texts), set_size).items()}
        out["self_bleu_set"] = set_size
    else:
        out["self_bleu_note"] = f"{len(texts)} samples, fewer than the set size ({set_size})"
    if not semantic:
        out["semantic_note"] = "disabled"
        return out
    try:
        from guard_jax.metrics.semantic import semantic_similarity

        out["semantic_similarity"] = semantic_similarity(list(texts))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        out["semantic_note"] = f"not computed: {e}"
    return out
