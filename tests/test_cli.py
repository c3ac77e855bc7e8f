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
