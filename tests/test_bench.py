"""The sampling benchmark runs as a user runs it and its lines say what they measure (no timing is asserted)."""

import json
import os
import subprocess
import sys
import time

import pytest


def test_bench_sampling_quick_on_two_host_devices():
    env = {**os.environ, "XLA_FLAGS": ""}  # the bench sets the device count itself
    out = subprocess.run([sys.executable, "-m", "bench.bench_sampling", "--quick", "--host-devices", "2"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["bench"] for r in records] == ["sampling", "per_token", "per_token", "scoring"]
    assert all(r["host_devices"] == 2 and r["config"] == "tiny" for r in records)
    sampling = records[0]
    for key in ("jax_tokens_per_s", "torch_tokens_per_s", "jax_one_device_tokens_per_s"):
        assert sampling[key] > 0
    assert 0 < sampling["cpu_cores_used"] <= os.cpu_count() + 0.1  # CPU seconds per wall second of the timed turns
    speedup = sampling["jax_tokens_per_s"] / sampling["jax_one_device_tokens_per_s"]
    assert abs(sampling["host_devices_speedup"] - speedup) < 0.02  # both sides timed in the same turns
    assert [r["new_tokens"] for r in records[1:3]] == [32, 128]
    assert records[3]["max_abs_logp_diff_vs_torch"] < 1e-3  # the sharded scorer agrees with transformers


def test_interleaved_reports_the_cores_it_got():
    from bench.common import interleaved

    def busy():  # one thread busy for 50 ms: about one core
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.05:
            pass

    r = interleaved({"busy": busy, "idle": lambda: time.sleep(0.05)}, 2)
    assert set(r["median"]) == set(r["first"]) == {"busy", "idle"}
    assert r["median"]["idle"] >= 0.05
    assert 0 < r["cores"] <= 1.05  # one busy thread for half the turns; the process's other threads are idle


def test_bench_sampling_refuses_bad_host_devices():
    r = subprocess.run([sys.executable, "-m", "bench.bench_sampling", "--quick", "--host-devices", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--host-devices must be >= 1" in r.stderr


@pytest.mark.slow  # compiles the DPG update and runs torch beside it: minutes on the shared CPU
def test_bench_dpg_embedded_times_each_part_beside_torch():
    out = subprocess.run([sys.executable, "-m", "bench.bench_dpg", "--configs", "embedded", "--batches", "8", "--repeats", "1"],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert (record["config"], record["batch"], record["new_tokens"]) == ("embedded", 8, 30)
    assert set(record["parts"]) == {"sample", "score", "forward_backward", "optimizer", "step"}
    for name, part in record["parts"].items():
        assert part["jax_ms"] > 0 and part["torch_ms"] > 0, name
        assert abs(part["speedup_vs_torch"] - part["torch_ms"] / part["jax_ms"]) < 0.02 + 0.01 * part["speedup_vs_torch"], name
    assert record["speedup_vs_torch"] == record["parts"]["step"]["speedup_vs_torch"]
    assert 0 < record["mfu"] == record["parts"]["step"]["jax_mfu"] and record["peak_gflops"] > 0 and record["torch_peak_gflops"] > 0
    assert len(record["load_average_1min"]) == 2
    assert 0 < record["cpu_cores_used"] <= os.cpu_count() + 0.1


@pytest.mark.slow
def test_bench_sampling_embedded_lines():
    out = subprocess.run([sys.executable, "-m", "bench.bench_sampling", "--configs", "embedded", "--batches", "8", "--repeats", "1"],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["bench"], r["config"], r["batch"]) for r in records] == [("sampling", "embedded", 8), ("scoring", "embedded", 8)]
    sampling, scoring = records
    assert sampling["new_tokens"] == 30 and sampling["goal_ratio"] == 5.0
    assert sampling["jax_ms_per_step"] > 0 and sampling["matmul_peak_gflops"] > 0 and sampling["torch_matmul_peak_gflops"] > 0
    assert scoring["max_abs_logp_diff_vs_torch"] < 1e-3  # the fused scorer agrees with transformers on the shipped model


@pytest.mark.slow  # binds two vocabularies and times nine masked samplers beside plain sampling: minutes on the shared CPU
def test_bench_decoding_grammar_lines():
    out = subprocess.run([sys.executable, "-m", "bench.bench_decoding", "--grammars-only", "--quick", "--repeats", "1"],
                         capture_output=True, text=True, timeout=1200, check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    builds = [r for r in records if r["bench"] == "grammar_build"]
    for config, V in (("embedded V=8192", 8192), ("synthetic V=50257", 50257)):
        rows = [(r["what"], r.get("slices")) for r in builds if r["config"] == config]
        for slices in ("general slices", "no slices"):
            assert [w for w, s in rows if s == slices] == ["bind tokenizer", "bind tokenizer again (cached)", "regex", "json_schema", "cfg"]
        assert ("dense regex_automaton", None) in rows and all(r["V"] == V for r in builds if r["config"] == config)
    assert all(r["goal_seconds"] == 1.0 and r["goal_mb"] == 100 for r in builds if r["what"] == "json_schema")
    masked = [r for r in records if r["bench"] == "grammar_masked_vs_plain"]
    assert [(r["mask"], r["route"]) for r in masked] == [
        ("regex", "dense table"), ("json_schema", "dense table"), ("cfg", "dense table"),
        ("regex, llguidance masks (dense=False)", "llguidance masks"), ("json_schema, llguidance masks (dense=False)", "llguidance masks"),
        ("cfg, llguidance masks (dense=False)", "llguidance masks"),
        ("host loop floor: every token allowed, llguidance masks (dense=False)", "llguidance masks"), ("dense regex_automaton", "dense table"),
        ("cfg, masked LM (host bias in the jitted scan)", "llguidance masks")]
    dense_builds = [r for r in builds if r["config"] == "embedded GPT-2 V=8192"]
    assert [r["what"] for r in dense_builds] == ["regex dense_masks (checked)", "json_schema dense_masks (checked)", "cfg dense_masks (checked)"]
    assert all(r["states"] > 0 for r in dense_builds)
    for r in masked:
        assert r["goal_ratio"] == 1.3 and 0 < r["steps"] <= r["T"] == 30
        assert r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1] and r["cpu_ratio"] > 0  # medians of (plain, masked) pairs
    for slices in ("general slices", "no slices"):
        (row,) = [r for r in records if r["bench"] == "grammar_bind" and r["slices"] == slices]
        assert row["config"] == "byte-level HF BPE V=50257" and row["llguidance_hf_seconds"] > 0 and row["byte_list_seconds"] > 0
