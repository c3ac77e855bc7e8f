"""The README's main command on the toy problem: runs, prints the table, writes parsable JSON."""

import json

from guard_jax.cli import main


def test_toy_command(tmp_path, capsys):
    out = tmp_path / "toy.json"
    assert main(["toy", "--vocab", "4", "--max-len", "4", "--n-a", "20000", "--n-a2", "5000", "--num-guard", "200",
                 "--batch-size", "4096", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Theorem 2" in text and "exact in CI" in text and "all satisfy b: True" in text
    res = json.loads(out.read_text())
    ex = res["exact"]
    assert abs(ex["KL(g||a2)"] - (-__import__("math").log(ex["AR_a2"]) + ex["KL(g||g2)"])) < 1e-9
    assert res["guard"]["all_satisfy_b"] and set(res["monte_carlo"]) == set(ex)


import pytest

from guard_jax import cli
from guard_jax.lm import EMBEDDED

LM_DIR = str(EMBEDDED)


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a command gets past validation to load weights or sample."""
    def forbidden(*a, **k):
        raise AssertionError("the command loaded a model or sampled before validating its arguments")

    import guard_jax.evaluate
    import guard_jax.models.hf
    monkeypatch.setattr(guard_jax.models.hf, "load", forbidden)
    monkeypatch.setattr(guard_jax.evaluate, "monte_carlo", forbidden)
    monkeypatch.setattr("guard_jax.toy_demo.toy_problem", forbidden)


@pytest.mark.parametrize("argv,message", [
    (["sample", "--model", LM_DIR, "--constraint", "keyword:love&keyword:the"], "--constraint: .*ambiguous '&'"),
    (["sample", "--model", LM_DIR, "--constraint", "colour:red"], "--constraint: .*unknown kind 'colour'"),
    (["sample", "--model", LM_DIR, "--constraint", "keyword:the", "--num", "0"], "--num must be >= 1, got 0"),
    (["estimate", "--model", LM_DIR, "--constraint", "keyword:the", "--n-a", "-3"], "--n-a must be >= 1, got -3"),
    (["toy", "--num-guard", "0"], "--num-guard must be >= 1"),
    (["toy", "--beta", "2"], "--beta must be in \\[0, 1\\]"),
    (["toy", "--vocab", "40", "--max-len", "9"], "enumerates 40\\^9 sequences"),
    (["toy", "--max-len", "99999999999"], "enumerates 6\\^99999999999 sequences"),
    (["sample", "--model", LM_DIR, "--constraint", "keyword:the", "--max-new-tokens", "300"],
     "need 301 positions but --model .* has 256; use --max-new-tokens 255 or less"),
    (["sample", "--model", LM_DIR, "--constraint", "keyword:the", "--out", "/proc/x.jsonl"], "--out /proc/x.jsonl: cannot create files"),
    (["sample", "--model", "/no/such/folder", "--constraint", "keyword:the"], "--model /no/such/folder: model folder '/no/such/folder' does not exist"),
    (["estimate", "--model", LM_DIR, "--proposal", "/no/such", "--constraint", "keyword:the"], "--proposal /no/such: "),
    (["sample", "--model", LM_DIR, "--constraint", "keyword:the", "--num", "x"], "argument --num: invalid int value: 'x'"),
])
def test_user_errors_are_one_line_naming_the_flag_before_any_work(argv, message, no_work, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert __import__("re").search(message, err), err


def test_file_errors_name_the_file(tmp_path, capsys):
    import shutil

    folder = tmp_path / "lm"
    shutil.copytree(EMBEDDED, folder)
    (folder / "config.json").write_text("{ broken")
    assert cli.main(["sample", "--model", str(folder), "--constraint", "keyword:the"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'config.json'}' is not valid JSON" in err and err.count("\n") == 1
    shutil.copy(EMBEDDED / "config.json", folder / "config.json")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.1.attn.c_attn.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert cli.main(["sample", "--model", str(folder), "--constraint", "regex:^", "--num", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tensor 'transformer.h.1.attn.c_attn.weight' holds 1 NaN/Inf" in err and err.count("\n") == 1, err
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:1000])
    assert cli.main(["sample", "--model", str(folder), "--constraint", "keyword:the", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'model.safetensors'}' is not a readable safetensors file" in err and err.count("\n") == 1


def test_debug_shows_the_traceback(no_work):
    with pytest.raises(ValueError, match="--num must be >= 1"):
        cli.main(["sample", "--model", LM_DIR, "--constraint", "keyword:the", "--num", "0", "--debug"])


def test_library_errors_are_shown_with_the_flags(capsys):
    rc = cli.main(["sample", "--model", LM_DIR, "--constraint", "keyword:zzzqqqxx", "--max-draws", "64", "--batch-size", "64",
                   "--max-new-tokens", "4", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "draw budget exhausted" in err and "Raise --max-draws" in err and err.count("\n") == 1, err
