"""Figures: the library never switches matplotlib's backend, every series has its own colour and marker (up
to 20), and legends sit outside the data area."""

import json
import subprocess
import sys

import matplotlib.colors
import numpy as np
import pytest
from matplotlib.figure import Figure

from experiments import figures
from guard_jax import plots
from guard_jax.metrics import position


def test_importing_the_library_keeps_the_backend_and_pyplot_untouched():
    code = (
        "import importlib, pkgutil, sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import guard_jax\n"
        "for m in pkgutil.walk_packages(guard_jax.__path__, 'guard_jax.'):\n"
        "    importlib.import_module(m.name)\n"
        "import experiments.figures\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["svg", "False"], out.stderr


@pytest.mark.parametrize("n", [1, 10, 20])
def test_series_styles_are_distinct_up_to_20(n):
    styles = plots.series_styles([f"s{i}" for i in range(n)])
    assert list(styles) == [f"s{i}" for i in range(n)]
    assert len({s.color for s in styles.values()}) == n
    assert len({s.marker for s in styles.values()}) == n


def test_series_styles_beyond_20_keep_pairs_unique_and_refuse_duplicates():
    styles = plots.series_styles([f"s{i}" for i in range(45)])
    assert len(set(styles.values())) == 45
    with pytest.raises(ValueError, match="names must be distinct"):
        plots.series_styles(["a", "b", "a"])


def _legend_outside_axes(fig: Figure) -> None:
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.x0 > axes_box.x1, (box, axes_box)  # entirely to the right of the data area


def _line_looks(ax) -> list[tuple[str, str]]:
    return [(matplotlib.colors.to_hex(line.get_color()), line.get_marker()) for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_positions_figure_has_20_distinct_series_and_the_legend_outside(tmp_path):
    rng = np.random.default_rng(0)
    series = {f"g' {i}": rng.uniform(size=30) for i in range(20)}
    fig = position.positions_figure(series)
    assert isinstance(fig, Figure)
    looks = _line_looks(fig.axes[0])
    assert len(looks) == 20 and len({c for c, _ in looks}) == 20 and len({m for _, m in looks}) == 20
    _legend_outside_axes(fig)
    with pytest.raises(ValueError, match="styles has no entry"):
        position.positions_figure(series, styles={"g' 0": plots.Style("#000000", "o")})
    paths = plots.save_figure(fig, tmp_path / "f")
    assert [p.name for p in paths] == ["f.png", "f.svg"] and all(p.stat().st_size > 1000 for p in paths)


def _estimate(v):
    return {"value": v, "lo": v * 0.9, "hi": v * 1.1}


def _results(n_methods: int) -> dict:
    """A results.json as the lexical experiment writes it, with n_methods proposals and made-up numbers."""
    rng = np.random.default_rng(1)
    methods = {}
    for i in range(n_methods):
        curve = [{"samples": s, "KL(g||a2)": _estimate(5.0 - i * 0.1 - s / 1e4), "AR_a2": _estimate(0.01 + s / 1e5),
                  "KL(g||g2)": _estimate(1.0 + i * 0.1)} for s in (0, 1024, 2048)]
        methods[f"m{i:02d}"] = {"train_samples": 4096, "curve": curve, "positions": rng.uniform(size=20).tolist(),
                                "estimates": {"KL(g||a2)": _estimate(4.0), "AR_a2": _estimate(0.05), "KL(g||g2)": _estimate(1.5 + i * 0.05)}}
    gold = {"KL(g||a)": _estimate(5.1), "Z": _estimate(0.006), "positions": rng.uniform(size=40).tolist()}
    return {"config": {"name": "synthetic", "proposals": list(methods)}, "contexts": [{"name": "bos", "gold": gold, "methods": methods}]}


def test_experiment_figures_keep_one_look_per_proposal_with_legends_outside(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text(json.dumps(_results(12)))
    saved = {}

    def keep_and_save(fig, stem):
        saved[stem.name] = fig
        return plots.save_figure(fig, stem)

    monkeypatch.setattr(figures, "save_figure", keep_and_save)
    monkeypatch.setattr(position, "save_figure", keep_and_save)
    paths = figures.make_all(tmp_path)
    assert sorted(saved) == ["ar_vs_samples_bos", "pareto_bos", "positional_bias_bos", "sample_efficiency_bos"]
    assert len(paths) == 8 and all(p.is_file() for p in paths)
    for name in ("ar_vs_samples_bos", "sample_efficiency_bos", "positional_bias_bos"):
        looks = _line_looks(saved[name].axes[0])
        methods = [lk for lk in looks if lk != (figures.GOLD.color, figures.GOLD.marker) and lk[1] != "None"]  # not g, not the Z line
        assert len(methods) == 12 and len(set(methods)) == 12 and len({m for _, m in methods}) == 12, name
        _legend_outside_axes(saved[name])
    # the same proposal has the same look in every figure
    expected = figures.styles([json.loads((tmp_path / "results.json").read_text())], 0)
    pareto_colors = {c.get_label(): matplotlib.colors.to_hex(c.get_facecolor()[0]) for c in saved["pareto_bos"].axes[0].collections}
    assert {name: pareto_colors[name] for name in expected} == {name: style.color for name, style in expected.items()}
    assert len(set(pareto_colors.values())) == len(pareto_colors)
    _legend_outside_axes(saved["pareto_bos"])
