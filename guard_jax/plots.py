"""Figures with matplotlib's object API: the library never imports pyplot nor changes the backend.

`new_figure` builds a `matplotlib.figure.Figure` that no pyplot state knows about, so a notebook's inline
`plt.show()` keeps working after `import guard_jax`; `save_figure` writes it atomically as PNG and SVG.
`series_styles` gives every series of a figure its own colour and its own marker (distinct for up to 20
series), and `legend_outside` puts the legend to the right of the axes, off the data.
"""

from __future__ import annotations

import io
import pathlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from guard_jax.io import atomic_write_bytes

# tab20's dark tones first (= tab10), then its light tones: 20 colours, the first 10 the familiar ones.
_TAB20 = matplotlib.colormaps["tab20"].colors
COLORS: tuple[str, ...] = tuple(matplotlib.colors.to_hex(c) for c in _TAB20[0::2] + _TAB20[1::2])
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p", "d", "8", "H", "x", "+", "1", "2", "3")
MAX_DISTINCT = min(len(COLORS), len(MARKERS))


class Style(NamedTuple):
    """The look of one series: a colour (hex string) and a marker (matplotlib marker code)."""

    color: str
    marker: str


def series_styles(names: Sequence[str]) -> dict[str, Style]:
    """One Style per name, in order: series i gets COLORS[i] and MARKERS[i], all distinct for up to 20 names.

    Beyond 20 the colours repeat but each (colour, marker) pair stays unique. Give the same `names` list
    to every figure of a run so a proposal keeps its look across figures.
    """
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {list(names)}")
    n = MAX_DISTINCT
    return {name: Style(COLORS[i % n], MARKERS[(i + i // n) % n]) for i, name in enumerate(names)}


def new_figure(figsize: tuple[float, float] = (6.5, 4), ncols: int = 1):
    """A figure outside pyplot (on its own Agg canvas) and its axes: -> (fig, ax) for ncols == 1, else (fig, axes_list)."""
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return (fig, axes[0]) if ncols == 1 else (fig, axes)


def legend_outside(ax, fontsize: float = 8, **kwargs):
    """The legend of `ax` to the right of the axes (top-aligned), where it cannot cover data. -> the Legend."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False,
                     fontsize=fontsize, **kwargs)


def save_figure(fig, stem: str | pathlib.Path, dpi: int = 120) -> list[pathlib.Path]:
    """Write `stem.png` and `stem.svg` atomically (the legend outside the axes included), return the paths.

    A figure that pyplot manages (made with plt.subplots) is closed afterwards, so scripts that make many
    figures do not accumulate them; a figure from `new_figure` is left to the caller (e.g. to display).
    """
    paths = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight")
        paths.append(atomic_write_bytes(pathlib.Path(f"{stem}.{ext}"), buf.getvalue()))
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return paths
