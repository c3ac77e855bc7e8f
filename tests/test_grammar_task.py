"""The grammar task end to end at tiny size: GUARD, masking and ASAp in one table, every estimate with its CI."""

import json

import pytest

from experiments import grammar_task
from experiments.grammar_task import GrammarTaskConfig


def test_grammar_task_runs_and_reports_every_method(tmp_path):
    quick = json.loads((grammar_task.CONFIGS / "grammar_quick.json").read_text())
    config = GrammarTaskConfig.from_dict({**quick, "n_a": 512, "n_a2": 32, "n_guard": 8, "asap_samples": 16}, "test")
    results = grammar_task.run(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == results["rows"] and "| masking |" in (tmp_path / "results.md").read_text()
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"guard (a' = a)", "masking", "asap after 16"}
    for r in rows.values():
        for name in ("AR_a2", "KL(g||a2)", "KL(g||g2)", "KL(g2||g)"):
            e = r.get(name)
            assert e is not None and (e.get("exact") or e["lo"] <= e["value"] <= e["hi"]), (r["method"], name)
    z = results["Z"]
    assert 0 < z["value"] < 0.5 and rows["guard (a' = a)"]["KL(g||g2)"] == {"value": 0.0, "exact": True}
    assert rows["masking"]["AR_a2"]["value"] > z["hi"]  # masking raises the acceptance rate (and distorts g)
    assert results["asap"]["root_theta"] >= z["lo"]  # the root bound is an upper bound on Z


def test_grammar_task_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key.*'n_draws'.*valid keys"):
        GrammarTaskConfig.from_dict({"n_draws": 3}, "test")
