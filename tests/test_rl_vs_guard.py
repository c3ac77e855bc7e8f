"""experiments/rl_vs_guard.py writes complete results and redraws its figure from them alone."""

import json

from experiments.rl_vs_guard import main


def test_rl_vs_guard_results_and_plot_only(tmp_path):
    assert main(["--out", str(tmp_path), "--betas", "0.5", "2.0", "--steps", "300"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["beta"] for r in res["rows"]] == [0.5, 2.0]
    for r in res["rows"]:
        assert r["mass_on_b0"] > 0 and abs(r["mass_on_b0"] + r["AR"] - 1) < 1e-12 and abs(r["KL(g||g')"]) < 1e-9
    assert res["rows"][0]["mass_on_b0"] < res["rows"][1]["mass_on_b0"]  # smaller beta, closer to g
    (tmp_path / "rl_vs_guard.png").unlink()
    assert main(["--out", str(tmp_path), "--plot-only"]) == 0
    assert (tmp_path / "rl_vs_guard.png").stat().st_size > 0 and (tmp_path / "rl_vs_guard.svg").exists()
