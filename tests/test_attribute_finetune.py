"""The attribute fine-tuning experiment: its "toxicity" attribute, and its --quick run end to end."""

import json

import numpy as np
import pytest

from experiments import attribute_finetune


def test_negative_sentence_attribute():
    toxic = attribute_finetune.has_negative_sentence(-0.5)
    texts = ["What a lovely day. I like it.", "What a lovely day. I hate this horrible, awful mess.", ""]
    assert toxic(texts).tolist() == [False, True, False]


def check_results(results, cfg):
    names = list(results["models"])
    assert "base" in names and len(names) == 1 + len(cfg["lambdas"])
    for m in results["models"].values():
        r = m["attribute_rate"]
        assert 0 <= r["lo"] <= r["value"] <= r["hi"] <= 1 and r["n"] == cfg["n_eval"]
        assert np.isfinite(m["validation_perplexity"]) and m["validation_perplexity"] > 1
        assert m["kl_to_base"]["lo"] <= m["kl_to_base"]["value"] <= m["kl_to_base"]["hi"]
    assert abs(results["models"]["base"]["kl_to_base"]["value"]) < 1e-4  # a's samples scored by a itself
    for g in results["guard"].values():
        assert g["attribute_rate"]["value"] == 0.0 and g["attribute_rate"]["n"] == cfg["n_guard"]  # rejection sampling: no violations
        assert g["draws"] >= g["accepted"] >= cfg["n_guard"]


@pytest.mark.slow  # about 1-10 min on 2 cores: trains three models
def test_quick_attribute_experiment_runs(tmp_path):
    results = attribute_finetune.main(["--quick", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    check_results(on_disk, on_disk["config"])
    assert len(results["models"]["aux lambda=10"]["history"]["nll"]) == on_disk["config"]["steps"]
    assert "GUARD with a" in (tmp_path / "results.md").read_text()
