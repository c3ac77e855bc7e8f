"""The attribute fine-tuning experiment: its "toxicity" attribute, and its --quick run end to end."""

import json

import numpy as np
import pytest

from experiments import attribute_finetune


def test_negative_sentence_attribute():
    toxic = attribute_finetune.has_negative_sentence(-0.5)
    texts = ["What a lovely day. I like it.", "What a lovely day. I hate this horrible, awful mess.", ""]
    assert toxic(texts).tolist() == [False, True, False]


def _model(rate, ppl):
    return {"attribute_rate": {"value": rate, "lo": rate - 0.02, "hi": rate + 0.02, "n": 512}, "validation_perplexity": ppl,
            "kl_to_base": {"value": 0.1, "lo": 0.05, "hi": 0.15}, "train_seconds": 1.0}


def test_trade_off_names_each_step_that_breaks_monotonicity():
    monotone = {"models": {"base": _model(0.12, 280.0), "aux lambda=0 (SFT)": _model(0.15, 270.0), "aux lambda=1": _model(0.10, 271.0),
                           "aux lambda=10": _model(0.05, 290.0)}}
    assert attribute_finetune.trade_off(monotone).startswith("Monotone trade-off")
    broken = {"models": {"aux lambda=0 (SFT)": _model(0.15, 270.0), "aux lambda=10": _model(0.16, 265.0), "aux lambda=100": _model(0.05, 300.0)}}
    text = attribute_finetune.trade_off(broken)
    assert text.startswith("Not monotone") and "rises from lambda=0 to 10 (0.150 -> 0.160, overlapping CIs)" in text
    assert "perplexity falls from lambda=0 to 10 (270.00 -> 265.00)" in text and "lambda=10 to 100" not in text


def test_guard_cost_interval_inverts_the_acceptance_interval():
    cost = attribute_finetune.inverse({"value": 0.5, "lo": 0.4, "hi": 0.8})
    assert cost == {"value": 2.0, "lo": 1.25, "hi": 2.5}
    assert attribute_finetune.inverse({"value": 0.0, "lo": 0.0, "hi": 0.1})["hi"] == float("inf")


def test_tables_hold_every_model_and_proposal():
    results = {"models": {"base": _model(0.12, 280.0), "aux lambda=1": _model(0.1, 281.0)},
               "guard": {"a": {"attribute_rate": {"value": 0.0, "lo": 0.0, "hi": 0.01}, "ar": {"value": 0.88, "lo": 0.85, "hi": 0.9},
                               "cost": attribute_finetune.inverse({"value": 0.88, "lo": 0.85, "hi": 0.9}), "draws": 291}}}
    t = attribute_finetune.tables(results)
    assert "| aux lambda=1 | 1 | 0.100 [0.080, 0.120] | 281.00 | 0.100 [0.050, 0.150] |" in t["models"].splitlines()
    assert "| a | 0.000 [0.000, 0.010] | 0.880 [0.850, 0.900] | 1.14 [1.11, 1.18] | 291 |" in t["guard"].splitlines()


def test_config_parses_the_warm_start_stages():
    from guard_jax.config import from_dict
    from guard_jax.proposals import DPGRecipeConfig, SFTRecipeConfig

    cfg = from_dict(attribute_finetune.AttributeConfig, {"lambdas": [0, 2], "sft": {"draws": 64}, "dpg": {"steps": 3}})
    assert cfg.lambdas == (0.0, 2.0) and isinstance(cfg.sft, SFTRecipeConfig) and isinstance(cfg.dpg, DPGRecipeConfig)
    assert cfg.sft.draws == 64 and cfg.dpg.steps == 3
    with pytest.raises(ValueError, match="lambdas"):
        attribute_finetune.AttributeConfig(lambdas=(-1.0,))


def check_results(results, cfg):
    assert "base" in results["models"] and attribute_finetune.WARM in results["models"]
    for m in results["models"].values():
        r = m["attribute_rate"]
        assert 0 <= r["lo"] <= r["value"] <= r["hi"] <= 1 and r["n"] == cfg["n_eval"]
        assert np.isfinite(m["validation_perplexity"]) and m["validation_perplexity"] > 1
        assert m["kl_to_base"]["lo"] <= m["kl_to_base"]["value"] <= m["kl_to_base"]["hi"]
    assert abs(results["models"]["base"]["kl_to_base"]["value"]) < 1e-4  # a's samples scored by a itself
    assert len(results["guard"]) == 3
    for g in results["guard"].values():
        assert g["attribute_rate"]["value"] == 0.0 and g["attribute_rate"]["n"] == cfg["n_guard"]  # rejection sampling: no violations
        assert g["draws"] >= g["accepted"] >= cfg["n_guard"]
        assert g["cost"]["lo"] <= g["cost"]["value"] <= g["cost"]["hi"]


@pytest.mark.slow  # 3-8 min on 2 loaded cores, nearly all compilation: trains two aux models, SFT and DPG
def test_quick_attribute_experiment_runs(tmp_path):
    results = attribute_finetune.main(["--quick", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    cfg = on_disk["config"]
    check_results(on_disk, cfg)
    lam = max(cfg["lambdas"])
    assert len(on_disk["models"]) == 1 + len(cfg["lambdas"]) + 2  # base, each lambda, q of the largest, warm-start DPG
    assert len(results["models"][f"aux lambda={lam:g}"]["history"]["nll"]) == cfg["steps"]
    text = (tmp_path / "results.md").read_text()
    assert attribute_finetune.WARM in text and on_disk["tables"]["trade_off"] in text
