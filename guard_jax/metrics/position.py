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
from guard_jax.plots import Style, legend_outside, new_figure, save_figure, series_styles

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


def position_report(positions_N, bins: int | Sequence[float] = 10, value_range: tuple[float, float] | None = (0.0, 1.0)) -> dict:
    """A JSON-ready summary of matched positions (e.g. `first_positions` of the samples of g or of a g'):
    {"positions": the non-NaN values, "fractions": per bin, "edges", "matched", "total"}."""
    positions_N = np.asarray(positions_N, np.float64)
    h = histogram(positions_N, bins, value_range)
    return {"positions": [float(p) for p in positions_N[~np.isnan(positions_N)]], "fractions": [float(f) for f in h["fractions"]],
            "edges": [float(e) for e in h["edges"]], "matched": int(h["matched"]), "total": int(h["total"])}


def positions_figure(series: Mapping[str, np.ndarray], *, bins: int | Sequence[float] = 10,
                     value_range: tuple[float, float] | None = (0.0, 1.0), xlabel: str = "relative position of the first match",
                     title: str = "positional bias", styles: Mapping[str, Style] | None = None):
    """One step histogram per series (e.g. {"g": ..., "g' DPG": ..., "g' CAP": ...}), as fractions of each
    series' matched samples, with a marker at each bin centre. -> a matplotlib Figure (outside pyplot:
    display it in a notebook by leaving it as a cell's value).

    styles: a Style per series name (default `guard_jax.plots.series_styles` in the order given: a distinct
    colour and marker for up to 20 series); the legend sits outside the axes.
    """
    if not series:
        raise ValueError("series must hold at least one named array of positions")
    styles = dict(styles) if styles is not None else series_styles(list(series))
    missing = [name for name in series if name not in styles]
    if missing:
        raise ValueError(f"styles has no entry for series {missing}: pass a Style for every series name")
    fig, ax = new_figure(figsize=(6, 3.5))
    for name, positions in series.items():
        h = histogram(positions, bins, value_range)
        color, marker = styles[name]
        ax.stairs(h["fractions"], h["edges"], color=color, linewidth=1.5)
        centres = (h["edges"][:-1] + h["edges"][1:]) / 2
        ax.plot(centres, h["fractions"], ls="none", marker=marker, color=color, markersize=5, label=f"{name} (n={h['matched']})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples")
    ax.set_title(title)
    legend_outside(ax)
    return fig


def plot_positions(series: Mapping[str, np.ndarray], stem: str | pathlib.Path, **kwargs) -> list[pathlib.Path]:
    """`positions_figure(series, **kwargs)` saved as `stem.png` and `stem.svg`. -> the two paths."""
    return save_figure(positions_figure(series, **kwargs), stem)
