"""The lexical and sentiment experiments end to end: results files complete and parsable, figures regenerated
from the saved results alone, proposals looked up by name. The fast test runs lexical on a tiny random
GPT-2 with the shipped tokenizer; the slow ones run both `--quick` configs on the embedded base LM."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from experiments import figures, lexical, sentiment

ROOT = pathlib.Path(__file__).resolve().parent.parent

REQUIRED = {"Z", "AR_a2", "AR_gain", "KL(g||a)", "KL(g||a2)", "KL(g||g2)", "KL(g2||g)"} - {"KL(g||a)"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from guard_jax.data import tokenizer as tok_lib
    from guard_jax.models import gpt2, hf

    tok = tok_lib.load()
    model = gpt2.GPT2(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_id=tok.bos_token_id,
                      eos_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return hf.export(tmp_path_factory.mktemp("tiny_lm"), model, model.init(jax.random.PRNGKey(0)), tok)


TINY = {
    "name": "lexical_tiny",
    "seed": 0,
    "keyword": "wow",
    "constraint": "regex:!",  # a random model writes '!' in about 1% of 10-token samples
    "position_regex": "!",
    "cap_prompt": "The next fortune contains the word \"{keyword}\"!\n\n",
    "max_new_tokens": 10,
    "batch_size": 256,
    "semantic": False,
    "proposals": ["cap", "sft_a", "sft_dpg"],
    "eval": {"n_a": 4096, "n_a2": 512, "n_diversity": 30, "n_curve": 256},
    "train": {
        "sft_a": {"draws": 1024, "batch_size": 4, "learning_rate": 1e-2, "epochs": 1, "eval_points": 2},
        "sft_dpg": {"steps": 2, "n_samples": 512, "minibatch": 256, "learning_rate": 1e-2, "eval_points": 1, "swap_every": 1},
    },
}


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    results = lexical.main(["--config", str(config), "--model", str(tiny_model), "--out", str(root), "--quiet"])
    return results, root / "lexical_tiny_seed0"


def _check_estimate(e):
    assert set(e) - {"note"} == {"value", "lo", "hi", "level", "n"}  # a note says why a bound was widened
    assert "note" not in e or (isinstance(e["note"], str) and e["note"])
    assert e["lo"] <= e["value"] <= e["hi"] and e["level"] == 0.95 and e["n"] > 0


def check_results(out: pathlib.Path, config: dict) -> dict:
    """Everything the experiments promise to write, parsed and checked for completeness and sanity."""
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["name"] == config["name"] and results["seconds"] > 0
    md = (out / "results.md").read_text()
    for ctx in results["contexts"]:
        g = ctx["gold"]
        assert 2 <= g["accepted"] <= g["draws"] == config["eval"]["n_a"]
        _check_estimate(g["Z"])
        assert math.isclose(g["KL(g||a)"]["value"], -math.log(g["Z"]["value"]))
        assert set(g["diversity"]["self_bleu"]) == {"2", "3", "4", "5"}
        rows = [g] + list(ctx["methods"].values())
        scored = [r["diversity"] for r in rows if r["diversity"]["self_bleu"] is not None]
        # every row's Self-BLEU at one set size: the fewest samples of a row that has enough
        assert {d["self_bleu_set"] for d in scored} == {ctx["self_bleu_set"]}
        assert ctx["self_bleu_set"] == min(d["n"] for d in scored)
        assert all(r["diversity"]["n"] < ctx["self_bleu_set"] for r in rows if r["diversity"]["self_bleu"] is None)
        assert f"Self-BLEU on sets of {ctx['self_bleu_set']} samples" in md
        assert all(0 <= p < 1 for p in g["positions"]) and len(g["positions"]) >= 1
        assert set(ctx["methods"]) == set(config["proposals"])
        for name, m in ctx["methods"].items():
            assert f"| {name} |" in md
            assert REQUIRED <= set(m["estimates"])
            for q in ("Z", "AR_a2", "KL(g||a2)"):
                _check_estimate(m["estimates"][q])
            for e in m["estimates"].values():
                if e is not None:
                    _check_estimate(e)
            assert m["estimates"]["Z"] == g["Z"]  # one gold set for every proposal
            assert m["config"] == results["config"]["train"][name]  # the settings it was trained with
            assert isinstance(m["train_samples"], int) and m["train_samples"] >= 0
            assert all(0 <= p < 1 for p in m["positions"])
            if m["train_samples"] > 0:  # trained: a curve from its start to its budget, and the trainer's log
                samples = [p["samples"] for p in figures._points(m)]  # the curve, then the full evaluation
                assert len(samples) >= 2 and samples == sorted(samples) and samples[-1] == m["train_samples"]
                assert all(p["samples"] < m["train_samples"] for p in m["curve"])
                lines = pathlib.Path(m["metrics_jsonl"]).read_text().splitlines()
                assert lines and all("loss" in json.loads(line) for line in lines)
    for f in results["figures"]:
        for ext in (".png", ".svg"):
            assert (out / f).with_suffix(ext).stat().st_size > 1000
    assert len(results["figures"]) == 4 * len(results["contexts"])
    return results


def test_lexical_tiny_end_to_end(tiny_run):
    results, out = tiny_run
    check_results(out, TINY)
    m = results["contexts"][0]["methods"]
    assert m["cap"]["train_samples"] == 0 and m["sft_a"]["train_samples"] == 1024
    assert m["sft_dpg"]["train_samples"] == 1024 + 2 * 512  # warm start: SFT's draws plus DPG's
    sft_final = {q: m["sft_a"]["estimates"][q] for q in ("KL(g||a2)", "AR_a2", "KL(g||g2)")}
    assert {q: m["sft_dpg"]["curve"][0][q] for q in sft_final} == sft_final  # DPG starts where SFT ended
    phases = results["phase_seconds"]  # every part of the run timed: wall, CPU and compile seconds
    assert list(phases)[:2] == ["total", "gold"] and {"diversity", "figures", "curve:sft_a"} <= set(phases)
    assert all(f"train:{n}" in phases and f"eval:{n}" in phases for n in TINY["proposals"])
    assert all(set(r) == {"wall", "cpu", "compile"} and min(r.values()) >= 0 for r in phases.values())
    assert phases["train:sft_a"]["wall"] >= phases["curve:sft_a"]["wall"] and phases["total"]["wall"] >= phases["gold"]["wall"]
    assert "| train:sft_dpg |" in (out / "results.md").read_text()


def _without_timings_and_paths(x, root: str):
    """A results tree with wall-clock times dropped and the run folder replaced by a placeholder."""
    if isinstance(x, dict):
        return {k: _without_timings_and_paths(v, root) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [_without_timings_and_paths(v, root) for v in x]
    return x.replace(root, "<root>") if isinstance(x, str) else x


def test_lexical_tiny_is_reproducible(tiny_model, tiny_run, tmp_path):
    """The same config and seed in a fresh folder give the same numbers, bit for bit (no resumed state)."""
    _, out = tiny_run
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    lexical.main(["--config", str(config), "--model", str(tiny_model), "--out", str(tmp_path), "--quiet"])
    first = json.loads((out / "results.json").read_text())
    again = json.loads((tmp_path / "lexical_tiny_seed0" / "results.json").read_text())
    assert _without_timings_and_paths(again, str(tmp_path)) == _without_timings_and_paths(first, str(out.parent))


def test_figures_regenerate_from_saved_results(tiny_run):
    _, out = tiny_run
    before = (out / "results.json").stat().st_mtime_ns
    pngs = sorted((out / "figures").glob("*.png"))
    for f in (out / "figures").iterdir():
        f.unlink()
    paths = figures.main([str(out)])
    assert sorted(p for p in paths if p.suffix == ".png") == pngs
    assert all(p.stat().st_size > 1000 for p in paths)
    assert (out / "results.json").stat().st_mtime_ns == before  # nothing was rerun


def test_figures_refuse_missing_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        figures.make_all(tmp_path)


def test_pareto_front():
    pts = [(0.0, 0.01), (0.5, 0.2), (1.0, 0.1), (0.2, 0.2), (0.3, 0.5)]
    assert sorted(figures.pareto_front(pts)) == [0, 3, 4]


def test_sentiment_contexts_and_positions():
    openings = sentiment.negative_openings(3, -0.3)
    assert len(openings) == 3 and len(set(openings)) == 3
    from guard_jax.constraints import vader_positive

    assert np.all(vader_positive(openings) < -0.3)
    pos = sentiment.continuation_positions("It was bad.")([" Then it rained. But all was great!", " Great!", ""])
    assert pos[0] == pytest.approx(len(" Then it rained. ") / len(" Then it rained. But all was great!"))
    assert pos[1] == pytest.approx(1 / 7) and np.isnan(pos[2])  # after the leading space


@pytest.mark.slow
@pytest.mark.parametrize("module,name", [(lexical, "lexical_quick"), (sentiment, "sentiment_quick")])
def test_quick_configs_on_the_embedded_model(module, name, tmp_path):
    config = json.loads((lexical.CONFIGS / f"{name}.json").read_text())
    module.main(["--quick", "--out", str(tmp_path), "--quiet"])
    check_results(tmp_path / f"{name}_seed0", config)


BASELINES = ["l3m", "aux", "aux_q", "rl", "rl:0.5", "masked", "sft_masked", "sft_asap"]
TINY_BASELINES = {
    **TINY,
    "name": "lexical_tiny_baselines",
    "proposals": BASELINES,
    "eval": {"n_a": 4096, "n_a2": 256, "n_diversity": 20, "n_curve": 128},
    "train": {
        "l3m": {"draws": 1024, "batch_size": 4, "steps": 2, "n_samples": 64, "learning_rate": 1e-2, "threshold": 0.5, "eval_points": 1},
        "aux": {"steps": 2, "n_samples": 64, "learning_rate": 1e-2, "eval_points": 1},
        "rl": {"steps": 2, "n_samples": 64, "learning_rate": 1e-2, "beta": 0.1, "eval_points": 1},
        "sft_masked": {"draws": 64, "batch_size": 8, "learning_rate": 1e-2, "epochs": 1, "eval_points": 1},
        "sft_asap": {"draws": 32, "asap_batch": 16, "batch_size": 8, "learning_rate": 1e-2, "epochs": 1, "eval_points": 1},
    },
}


def test_baseline_proposals_end_to_end(tiny_model, tmp_path):
    """Every other proposal (L3M, aux value head and policy, RL at two betas, masking, SFT on masked and ASAp
    samples) in the same results table, on the tiny random GPT-2."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_BASELINES))
    results = lexical.main(["--config", str(config), "--model", str(tiny_model), "--out", str(tmp_path), "--quiet"])
    check_results(tmp_path / "lexical_tiny_baselines_seed0", TINY_BASELINES)
    m = results["contexts"][0]["methods"]
    assert m["l3m"]["train_samples"] == 1024 + 2 * 64 and m["rl"]["train_samples"] == m["rl:0.5"]["train_samples"] == 2 * 64
    assert m["aux"]["train_samples"] == m["aux_q"]["train_samples"] == 2 * 64
    assert m["masked"]["train_samples"] == 0 and m["sft_masked"]["train_samples"] == 64 and m["sft_asap"]["train_samples"] == 32
    # masking guarantees b (the automaton walks every token's bytes, multi-byte characters included)
    assert m["masked"]["estimates"]["AR_a2"]["value"] == 1.0
    # rl and rl:0.5 are different runs (different beta) in different folders
    assert m["rl"]["metrics_jsonl"] != m["rl:0.5"]["metrics_jsonl"]
    metrics = [json.loads(line) for line in pathlib.Path(m["l3m"]["metrics_jsonl"]).read_text().splitlines()]
    assert {"mu", "lambda_0", "C_0"} <= set(metrics[-1])


def test_sweep_drives_the_lexical_experiment(tiny_model, tmp_path, monkeypatch):
    """A sweep cell per grid point: each runs the experiment in its own folder with --set overrides and writes
    its result file; a second run skips the finished cell."""
    from experiments import sweep

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    spec = {
        "command": ["python", "-m", "experiments.lexical", "--config", str(config), "--model", str(tiny_model), "--quiet",
                    "--out", "{cell_dir}"],
        "set_flag": "--set", "out_flag": "--result",
        "grid": {"proposals": [["cap"]], "eval.n_a2": [256]},
        "summary": {"metrics": ["average.cap.AR_a2", "average.dpg.AR_a2"]},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    monkeypatch.chdir(ROOT)
    assert sweep.main([str(tmp_path / "spec.json"), "--out", str(tmp_path / "sweep")]) == 0
    cell = tmp_path / "sweep" / "cells" / "proposals=cap,eval.n_a2=256"
    result = json.loads((cell / "result.json").read_text())
    assert result["config"]["proposals"] == ["cap"] and result["config"]["eval"]["n_a2"] == 256
    assert set(result["average"]) == {"_Z", "cap"}
    assert (cell / "lexical_tiny_seed0" / "results.json").exists()  # the experiment ran inside the cell's folder
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert rows[0]["average.cap.AR_a2"] == result["average"]["cap"]["AR_a2"] and rows[0]["average.dpg.AR_a2"] is None
    assert sweep.run_cell(spec, {"proposals": ["cap"], "eval.n_a2": 256}, tmp_path / "sweep")[1] == "skipped"


def test_sweep_refuses_a_grid_key_some_cell_does_not_read(tiny_model, tmp_path, monkeypatch):
    """train.dpg.learning_rate swept over a cell that never trains dpg: refused before any cell runs."""
    from experiments import sweep

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    spec = {"command": ["python", "-m", "experiments.lexical", "--config", str(config), "--model", str(tiny_model), "--quiet",
                        "--out", "{cell_dir}"],
            "set_flag": "--set", "out_flag": "--result",
            "grid": {"proposals": [["dpg"], ["cap"]], "train.dpg.learning_rate": [1e-3, 1e-2]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=r"proposals=cap,train.dpg.learning_rate=0.001: .*no proposal of this run reads train.dpg"):
        sweep.main([str(tmp_path / "spec.json"), "--out", str(tmp_path / "sweep")])
    assert not (tmp_path / "sweep" / "cells").exists()
    spec["grid"]["train.dpg.lerning_rate"] = spec["grid"].pop("train.dpg.learning_rate")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="unknown key 'lerning_rate'"):
        sweep.main([str(tmp_path / "spec.json"), "--out", str(tmp_path / "sweep")])


def test_shipped_sweep_reads_every_grid_key(monkeypatch):
    from experiments import sweep

    monkeypatch.chdir(ROOT)
    spec = json.loads((ROOT / "experiments" / "configs" / "lexical_sweep.json").read_text())
    assert sweep.unread_keys(spec, sweep.cells(spec["grid"])) == []


TINY_DPG = {**TINY, "name": "lexical_tiny_dpg", "proposals": ["dpg"], "eval": {"n_a": 2048, "n_a2": 256, "n_diversity": 20, "n_curve": 128},
            "train": {"dpg": {"steps": 2, "n_samples": 256, "minibatch": 256, "learning_rate": 1e-3, "eval_points": 1}}}


def _dpg_row(results: dict) -> dict:
    return results["contexts"][0]["methods"]["dpg"]


def test_changed_settings_retrain_instead_of_resuming(tiny_model, tmp_path):
    """A rerun with another learning rate trains dpg afresh in its own folder (the row changes and results.json
    states the rate used); rerunning the first settings resumes their finished run (no new training step)."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_DPG))
    args = ["--config", str(config), "--model", str(tiny_model), "--out", str(tmp_path), "--quiet"]
    first = _dpg_row(lexical.main(args))
    lines = pathlib.Path(first["metrics_jsonl"]).read_text().splitlines()
    changed = lexical.main(args + ["--set", "train.dpg.learning_rate=1e-1", "--set", 'proposals=["dpg"]'])
    row = _dpg_row(changed)
    assert changed["config"]["train"]["dpg"]["learning_rate"] == row["config"]["learning_rate"] == 0.1
    assert json.loads((tmp_path / "lexical_tiny_dpg_seed0" / "results.json").read_text())["config"]["train"]["dpg"]["learning_rate"] == 0.1
    assert row["run_dir"] != first["run_dir"] and json.loads((pathlib.Path(row["run_dir"]) / "config.json").read_text())["config"]["learning_rate"] == 0.1
    assert row["estimates"]["KL(g||a2)"] != first["estimates"]["KL(g||a2)"]  # retrained: another proposal
    assert len(pathlib.Path(row["metrics_jsonl"]).read_text().splitlines()) == 2
    again = _dpg_row(lexical.main(args))
    assert again["estimates"] == first["estimates"] and pathlib.Path(first["metrics_jsonl"]).read_text().splitlines() == lines


@pytest.mark.slow
def test_quick_run_then_a_changed_learning_rate_retrains_dpg(tmp_path):
    """The exact sequence: `--quick`, then `--set train.dpg.learning_rate=1e-2 --set 'proposals=["dpg"]'`."""
    first = _dpg_row(lexical.main(["--quick", "--out", str(tmp_path), "--quiet"]))
    second = lexical.main(["--quick", "--out", str(tmp_path), "--quiet", "--set", "train.dpg.learning_rate=1e-2", "--set", 'proposals=["dpg"]'])
    row = _dpg_row(second)
    assert list(second["contexts"][0]["methods"]) == ["dpg"] and second["config"]["train"]["dpg"]["learning_rate"] == 0.01
    assert row["config"]["learning_rate"] == 0.01 and row["run_dir"] != first["run_dir"]
    assert row["estimates"]["KL(g||a2)"] != first["estimates"]["KL(g||a2)"]
