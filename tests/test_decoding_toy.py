"""experiments/decoding_toy.py: complete results, written atomically, with the exact facts they must show."""

import json

from experiments.decoding_toy import SOURCES, main


def test_decoding_toy_results(tmp_path):
    assert main(["--out", str(tmp_path), "--n", "48", "--steps", "40", "--max-len", "3", "--asap-batch", "8"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["source"]: r for r in res["rows"]}
    assert list(rows) == list(SOURCES)
    assert abs(rows["a filtered"]["population_KL(g||data)"]) < 1e-9  # b-filtered samples of a are samples of g
    assert rows["masked"]["population_KL(g||data)"] > 1e-2  # masking distorts g ...
    assert rows["ASAp"]["population_KL(g||data)"] < rows["masked"]["population_KL(g||data)"]  # ... ASAp less so
    assert all(r["sft_AR_gain"] > 1 and 0 < r["distinct_share"] <= 1 for r in rows.values())
    assert "| masked |" in (tmp_path / "results.md").read_text()
