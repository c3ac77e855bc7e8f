"""Figures saved atomically as PNG and SVG (matplotlib, headless)."""

from __future__ import annotations

import io
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from guard_jax.io import atomic_write_bytes  # noqa: E402


def save_figure(fig, stem: str | pathlib.Path, dpi: int = 120) -> list[pathlib.Path]:
    """Write `stem.png` and `stem.svg` atomically, close the figure, return the paths."""
    paths = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight")
        paths.append(atomic_write_bytes(pathlib.Path(f"{stem}.{ext}"), buf.getvalue()))
    plt.close(fig)
    return paths
