"""The grammar task end to end at tiny sizes through the shared pipeline: every row with its CIs, the masked
and ASAp rows from the grammar's masks, and the config parsed strictly (file and --set)."""

import json

import pytest

from experiments import grammar_task, lexical
from experiments.config import GrammarConfig


def _check(results: dict, out, proposals: list[str]) -> dict:
    saved = json.loads((out / "results.json").read_text())
    (context,) = saved["contexts"]
    methods = context["methods"]
    assert list(saved["config"]["proposals"]) == proposals and set(methods) == set(proposals)
    md = (out / "results.md").read_text()
    z = context["gold"]["Z"]
    assert 0 < z["lo"] <= z["value"] <= z["hi"] < 0.5 and context["constraint"].startswith("lark:")
    for name, m in methods.items():
        assert f"| {name} |" in md
        for q in ("AR_a2", "KL(g||a2)", "KL(g||g2)", "KL(g2||g)"):
            e = m["estimates"][q]
            assert e is not None and e["lo"] <= e["value"] <= e["hi"], (name, q)
    masked = methods["masked"]["estimates"]["AR_a2"]
    assert masked["lo"] > z["hi"]  # the grammar's masks raise the acceptance rate
    summary = methods["asap"]["summary"]
    assert summary["samples"] == methods["asap"]["train_samples"] and summary["root_bound"] >= z["lo"]
    assert f"`asap`: samples {summary['samples']}" in md
    return methods


def test_grammar_task_quick_masking_asap_and_dpg(tmp_path):
    """The default suite's share: DPG (a trained GUARD proposal on the grammar's b), masking and ASAp's law as
    LMs, at the quick config's sizes with fewer evaluation draws."""
    proposals = ["dpg", "masked", "asap"]
    results = grammar_task.main(["--quick", "--quiet", "--out", str(tmp_path), "--set", f"proposals={json.dumps(proposals)}",
                                 "--set", "eval.n_a2=48"])
    methods = _check(results, tmp_path / "grammar_quick_seed0", proposals)
    assert methods["dpg"]["train_samples"] == 128


@pytest.mark.slow  # every proposal of the quick config: minutes on the shared CPU
def test_grammar_task_quick_every_proposal(tmp_path):
    results = grammar_task.main(["--quick", "--quiet", "--out", str(tmp_path)])
    quick = json.loads((lexical.CONFIGS / "grammar_quick.json").read_text())
    methods = _check(results, tmp_path / "grammar_quick_seed0", quick["proposals"])
    assert methods["sft_dpg"]["train_samples"] == methods["sft_a"]["train_samples"] + 128  # warm start: SFT's draws + DPG's


def test_grammar_task_config_is_strict():
    assert lexical.check_settings(["--quick"], "grammar", GrammarConfig) == []
    (msg,) = lexical.check_settings(["--quick", "--set", "n_draws=3"], "grammar", GrammarConfig)
    assert "n_draws" in msg and "grammar" in msg  # names the key and lists the valid ones
    (msg,) = lexical.check_settings(["--quick", "--set", "train.l3m.steps=2"], "grammar", GrammarConfig)
    assert "train.l3m" in msg
