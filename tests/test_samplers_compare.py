"""experiments/samplers_compare.py end to end on a tiny budget: every row present, costs counted, files written."""

import json

import pytest

from experiments.samplers_compare import CompareConfig, main

TINY = {
    "name": "samplers_tiny", "seed": 0, "keyword": "the", "cap_prompt": "Use the word \"{keyword}\".\n\n",
    "max_new_tokens": 4, "n_gold": 256, "budget": 64, "batch_size": 64, "proposals": ["cap"],
    "samplers": {"guard": {"kind": "guard"}, "qrs": {"kind": "qrs"}, "imh": {"kind": "imh", "steps": 1},
                 "smc_mask": {"kind": "smc", "mask": True}, "awrs": {"kind": "awrs"}},
}


SMALL = {**TINY, "budget": 32, "proposals": ["a"],
         "samplers": {"guard": {"kind": "guard"}, "awrs": {"kind": "awrs"}}}


def test_samplers_compare_small_runs_and_redraws(tmp_path):
    """The default suite's case: a′ = a, GUARD and AWRS (one model, two compiled programs)."""
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    guard, awrs = res["rows"]
    assert (guard["sampler"], awrs["sampler"]) == ("guard", "awrs")
    assert guard["model_calls"] == awrs["model_calls"] == 32  # a′ = a: one call per draw or particle
    assert awrs["log_Z"] is not None and awrs["effective"] > 0 and guard["KL(g||law)"] is not None
    (tmp_path / "out" / "samplers_compare.png").unlink()
    assert main(["--out", str(tmp_path / "out"), "--plot-only"]) == 0
    assert (tmp_path / "out" / "samplers_compare.png").stat().st_size > 0


@pytest.mark.slow
def test_samplers_compare_every_sampler_with_cap(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["sampler"]: r for r in res["rows"]}
    assert list(rows) == list(TINY["samplers"])
    assert rows["guard"]["model_calls"] == 64 and rows["qrs"]["model_calls"] == 64  # QRS: 32 draws + 32 scores
    assert rows["smc_mask"]["model_calls"] == rows["awrs"]["model_calls"] == 64  # 32 particles x (a′, a)
    assert rows["awrs"]["constraint_calls"] < rows["smc_mask"]["constraint_calls"]
    for r in rows.values():
        assert r["effective"] > 0 and r["bias_log_a"] is not None
    assert rows["guard"]["KL(g||law)"] is not None and rows["smc_mask"]["log_Z"] is not None
    assert (tmp_path / "out" / "results.md").read_text().count("| cap |") == 5


def test_samplers_compare_config_is_strict():
    with pytest.raises(ValueError, match="unknown config keys"):
        CompareConfig.from_dict({**TINY, "budgett": 3})
    with pytest.raises(ValueError, match="samplers.qrs: unknown keys"):
        CompareConfig.from_dict({**TINY, "samplers": {"qrs": {"kind": "qrs", "beta": 1}}})
    with pytest.raises(ValueError, match="sampler kind must be one of"):
        CompareConfig.from_dict({**TINY, "samplers": {"x": {"kind": "mcmc"}}})
