"""Positional bias of a constraint: where in each sample a keyword (or any regex) first occurs.

The GUARD paper's appendix histograms the relative character position `text.index(word) / len(text)` in 10%
bins, comparing samples of g with samples of each g'. This module gives that (`unit="relative"`), the
character offset (`"char"`), the word index (`"word"`, whitespace-separated words before the match), and
the token index in generated token rows (`first_token_positions`). Samples without a match get NaN.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from guard_jax.constraints import keyword_pattern
from guard_jax.plots import plt, save_figure

UNITS = ("relative", "char", "word")


def _compile(pattern: str | re.Pattern) -> re.Pattern:
    return pattern if isinstance(pattern, re.Pattern) else keyword_pattern(pattern)


def first_positions(texts: Sequence[str], pattern: str | re.Pattern, unit: str = "relative") -> np.ndarray:
    """Position of the first match of `pattern` (a word, matched with word boundaries, or a compiled regex).

    unit: "relative" (match start / len(text), in [0, 1)), "char" (match start), or "word" (number of
    whitespace-separated words before the match). -> positions_N (float64, NaN where there is no match).
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    regex = _compile(pattern)
    out = np.full(len(texts), np.nan)
    for i, text in enumerate(texts):
        m = regex.search(text)
        if m is None:
            continue
        start = m.start()
        out[i] = start / len(text) if unit == "relative" else start if unit == "char" else len(text[:start].split())
    return out


def first_token_positions(tokenizer, tokens_BT, lengths_B, pattern: str | re.Pattern) -> np.ndarray:
    """Index of the token in which the first match of `pattern` starts, in each decoded row.

    Rows are decoded as guard_jax.constraints does (up to their length, special tokens dropped); the token
    index t is the smallest with len(decode(row[:t+1])) > match start. -> positions_B (float64, NaN = no match).
    """
    regex = _compile(pattern)
    tokens_BT, lengths_B = np.asarray(tokens_BT), np.asarray(lengths_B)
    if tokens_BT.ndim != 2 or lengths_B.shape != tokens_BT.shape[:1]:
        raise ValueError(f"need tokens_BT [B, T] and lengths_B [B], got {tokens_BT.shape} and {lengths_B.shape}")
    out = np.full(len(tokens_BT), np.nan)
    for b, (row, n) in enumerate(zip(tokens_BT, lengths_B)):
        ids = row[:n].tolist()
        m = regex.search(tokenizer.decode(ids, skip_special_tokens=True))
        if m is None:
            continue
        for t in range(len(ids)):
            if len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True)) > m.start():
                out[b] = t
                break
    return out


def histogram(positions_N: np.ndarray, bins: int | Sequence[float] = 10, value_range: tuple[float, float] = (0.0, 1.0)
              ) -> dict[str, np.ndarray | float]:
    """Histogram of the matched positions (NaNs left out).

    -> {"counts": counts_K, "fractions": counts_K / matched, "edges": edges_{K+1}, "matched": number of
    samples with a match, "total": number of samples}. The default bins are the paper's 10% bins of
    relative positions; use e.g. `bins=np.arange(T + 1) - 0.5, value_range=None` for token indices.
    """
    positions_N = np.asarray(positions_N, np.float64)
    found = positions_N[~np.isnan(positions_N)]
    counts_K, edges = np.histogram(found, bins=bins, range=value_range)
    lo, hi = edges[0], edges[-1]
    if np.any((found < lo) | (found > hi)):
        raise ValueError(f"positions outside the bins [{lo}, {hi}]: widen value_range or bins")
    fractions_K = counts_K / max(len(found), 1)
    return {"counts": counts_K, "fractions": fractions_K, "edges": edges, "matched": len(found), "total": len(positions_N)}


def plot_positions(series: Mapping[str, np.ndarray], stem: str | pathlib.Path, *, bins: int | Sequence[float] = 10,
                   value_range: tuple[float, float] | None = (0.0, 1.0), xlabel: str = "relative position of the first match",
                   title: str = "positional bias") -> list[pathlib.Path]:
    """One step histogram per series (e.g. {"g": ..., "g' DPG": ..., "g' CAP": ...}), as fractions of each
    series' matched samples; saved as `stem.png` and `stem.svg`. -> the two paths."""
    if not series:
        raise ValueError("series must hold at least one named array of positions")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, positions in series.items():
        h = histogram(positions, bins, value_range)
        ax.stairs(h["fractions"], h["edges"], label=f"{name} (n={h['matched']})", linewidth=1.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples")
    ax.set_title(title)
    ax.legend(frameon=False)
    return save_figure(fig, stem)
