"""experiments/toy_proposals.py --quick end to end: complete, parsable results; figures; --plot-only redraws them
from the saved results alone; DPG beats the base; RL keeps mass on b = 0."""

import json
import math

import pytest

from experiments.sweep import cells
from experiments.toy_proposals import CONFIGS, CURVES, QUANTITIES, main, methods_of


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_proposals")
    assert main(["--quick", "--out", str(out)]) == 0
    return out / "quick"


@pytest.mark.slow
def test_quick_run_writes_complete_results_and_figures(quick):
    cfg = CONFIGS["quick"]
    config = json.loads((quick / "config.json").read_text())
    base_kl = config["references"]["a"]["kl_g_a2"]
    assert abs(base_kl + math.log(config["references"]["z"])) < 1e-9  # KL(g||a) = -log Z
    curves = {c for m in methods_of(cfg) for c in CURVES.get(m, (m,))}
    for seed in cfg.seeds:
        result = json.loads((quick / f"seed={seed}" / "result.json").read_text())
        assert result["complete"] and set(result["final"]) == curves
        rows = [json.loads(line) for line in (quick / f"seed={seed}" / "curves.jsonl").read_text().splitlines()]
        for row in rows:
            assert all(math.isfinite(row[q]) for q in QUANTITIES), row
            assert row["samples"] <= cfg.budgets[-1]
            # Theorem 2 holds exactly for every trained proposal
            assert abs(row["kl_g_a2"] - (-math.log(row["ar"]) + row["kl_g_g2"])) < 1e-6, row
        by_curve = {c: [r for r in rows if r["curve"] == c] for c in curves}
        for curve, pts in by_curve.items():
            assert [p["samples"] for p in pts] == sorted(p["samples"] for p in pts) and pts, curve
        assert [p["samples"] for p in by_curve["dpg"]] == list(cfg.budgets)  # the samples each trainer logged
        assert result["final"]["dpg"]["kl_g_a2"] < base_kl - 1.0  # DPG moves a' toward g
        assert result["final"]["dpg"]["ar"] > 5 * config["references"]["z"]
        # masked samples satisfy b: AR 1 for ASAp's law; ASAp's law approaches g, beyond the masked law's distortion
        assert abs(result["final"]["asap"]["ar"] - 1) < 1e-9 and abs(config["references"]["masked"]["ar"] - 1) < 1e-9
        assert result["final"]["asap"]["kl_g_g2"] < 0.5 * config["references"]["masked"]["kl_g_g2"]
        assert by_curve["asap"][-1]["kl_g_g2"] <= by_curve["asap"][0]["kl_g_g2"] + 1e-9
    summary = json.loads((quick / "summary.json").read_text())
    assert summary["n_seeds"] == len(cfg.seeds) and set(summary["curves"]) == curves
    table = (quick / "table.md").read_text()
    assert "| dpg |" in table and "GUARD's g | 0 |" in table
    for ideal in config["references"]["rl_ideal"]:  # RL's ideal law keeps mass on b = 0 and is undistorted by GUARD
        assert ideal["mass_b0"] > 0 and abs(ideal["kl_g_g2"]) < 1e-9
    for name in ("sample_efficiency", "pareto", "rl_vs_guard"):
        for ext in ("png", "svg"):
            assert (quick / "figures" / f"{name}.{ext}").stat().st_size > 1000


@pytest.mark.slow
def test_plot_only_regenerates_every_figure_without_training(quick):
    before = (quick / "summary.json").read_text()
    for path in (quick / "figures").iterdir():
        path.unlink()
    (quick / "table.md").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in quick.glob("seed=*/*")}
    assert main(["--quick", "--out", str(quick.parent), "--plot-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in quick.glob("seed=*/*")} == mtimes  # nothing retrained
    assert (quick / "summary.json").read_text() == before and (quick / "table.md").exists()
    assert sorted(p.name for p in (quick / "figures").iterdir()) == sorted(
        f"{n}.{e}" for n in ("sample_efficiency", "pareto", "rl_vs_guard") for e in ("png", "svg"))


def test_plot_only_without_results_says_so(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--quick", "--out", str(tmp_path), "--plot-only"])


def test_sweep_config_names_known_methods():
    spec = json.loads(open("experiments/configs/toy_proposals_sweep.json").read())
    known = set(methods_of(CONFIGS["full"])) | set(methods_of(CONFIGS["quick"]))
    grid = cells(spec["grid"])
    assert {c["method"] for c in grid} >= {"sft_a", "sft_cap", "dpg", "warm_dpg", "l3m", "aux", "sft_masked", "asap"}
    assert all(c["method"] in known or c["method"].startswith("rl:") for c in grid)
    assert any(c["method"].startswith("rl:") for c in grid)
