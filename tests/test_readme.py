"""The README is a user guide that works as printed: the two commands first, at most 200 lines, its Python
quickstart runs (with small settings through GUARD_JAX_QUICK_N), every relative link resolves, and the docs'
results tables regenerate from results.json files."""

import ast
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "docs" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quickstart() -> str:
    """The first ```python block of the README."""
    m = re.search(r"^```python\n(.*?)^```$", README.read_text(), re.M | re.S)
    assert m, "README.md has no ```python block"
    return m.group(1)


def test_readme_starts_with_the_two_commands_and_stays_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200: move details to docs/)"
    first_block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [ln.split("#")[0].strip() for ln in first_block[:2]] == ["bash scripts/dev.sh main", "bash scripts/dev.sh test"]
    assert "test-slow" in README.read_text(), "the README must name the slow suite's command"
    assert "bash scripts/dev.sh test" in (ROOT / ".ci" / "run").read_text(), "CI must run the README's default test command"


def test_readme_constraint_grammar_examples_hold():
    """The README's paragraph on --constraint: its example parses, the run-together spec is refused, and
    the keyword rule matches as written."""
    from guard_jax import constraints as C

    text = " ".join(README.read_text().split())
    example = re.search(r'parentheses: `"(.*?)"`', text).group(1)
    tree = C.parse_spec(example)
    assert tree.op == "&" and tree.operands[0] == C.SpecAtom("keyword", "love") and tree.operands[1].op == "~"
    assert "`keyword:love&keyword:the`) is an error" in text
    with pytest.raises(C.SpecError, match="ambiguous"):
        C.parse_spec("keyword:love&keyword:the")
    assert "`keyword:c++` matches \"I write c++ code.\" but not \"c++x\"" in text
    word = C.keyword_pattern("c++")
    assert word.search("I write c++ code.") and not word.search("c++x")


def _resolve(node: ast.expr, names: dict):
    """The object an expression like `gj.proposals.sft` or `SFTRecipeConfig` names, or None (a local value)."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, names)
        if base is None:
            return None
        assert hasattr(base, node.attr), f"the quickstart uses {ast.unparse(node)}, which the library does not have"
        return getattr(base, node.attr)
    return None


def test_readme_quickstart_calls_match_the_library():
    """Every library call of the quickstart names an existing function and binds to its signature (argument
    count and keyword names): the API the README prints is the one the package has. The run is the slow test."""
    import inspect

    code = quickstart()
    assert len(code.strip().splitlines()) <= 15, "the quickstart should stay about 10 lines"
    tree = ast.parse(code)
    names: dict = {}
    for stmt in tree.body:  # the imports, executed as printed
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([stmt], []), "<quickstart>", "exec"), names)
    assert "gj" in names, "the quickstart imports guard_jax as gj"
    checked = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        fn = _resolve(call.func, names)
        if fn is None or getattr(fn, "__module__", "").split(".")[0] != "guard_jax":
            continue
        args = [object()] * len(call.args)
        kwargs = {k.arg: object() for k in call.keywords}
        inspect.signature(fn).bind(*args, **kwargs)  # TypeError names a wrong or missing argument
        checked.append(ast.unparse(call.func))
    for name in ("gj.LM.load", "gj.draw_gold", "gj.proposals.warm_start_dpg", "gj.guard_sample", "gj.evaluate_proposal"):
        assert name in checked, f"{name} is not called (or not found) in the quickstart"


@pytest.mark.slow
def test_readme_quickstart_runs_as_printed(tmp_path):
    code = quickstart()
    env = {**os.environ, "GUARD_JAX_QUICK_N": "4096", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    estimate = r"(-?[\d.e+-]+) \[(-?[\d.e+-]+), (-?[\d.e+-]+)\]"
    m = re.fullmatch(rf"Z = {estimate}  AR_a' = {estimate}  KL\(g\|\|a'\) = {estimate}  KL\(g\|\|g'\) = {estimate}", lines[-2])
    assert m, lines[-2]
    values = np.asarray(m.groups(), float).reshape(4, 3)
    assert np.all(values[:, 1] <= values[:, 0]) and np.all(values[:, 0] <= values[:, 2])  # lo <= value <= hi
    assert 0 < values[0, 0] < 1 and 0 < values[1, 0] <= 1, "Z and AR_a' are probabilities"
    samples = ast.literal_eval(lines[-1])
    assert len(samples) == 3 and all(re.search(r"\blove\b", s) for s in samples), samples


def test_relative_links_in_readme_and_docs_resolve():
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [(p.relative_to(ROOT), t) for p in pages for t in re.findall(r"\]\(([^)#\s]+)", p.read_text())
              if "://" not in t and not (p.parent / t).exists()]
    assert not broken, broken


def _estimate(v: float) -> dict:
    return {"value": v, "lo": v / 2, "hi": v * 2}


def _diversity(n: int) -> dict:
    return {"n": n, "self_bleu": {"2": 0.25, "3": 0.1, "4": 0.05, "5": 0.03}, "semantic_similarity": None}


def _results(n_contexts: int) -> dict:
    """A results.json as the experiments write it (only the fields the docs tables use), made-up numbers."""
    def method(i):
        est = {q: _estimate(0.1 * (i + 1)) for q in ("AR_a2", "AR_gain", "KL(g||a2)", "KL(g||g2)")} | {"KL(g2||g)": None}
        return {"train_samples": 1024 * i, "estimates": est, "diversity": _diversity(20 + i)}
    contexts = [{"gold": {"diversity": _diversity(50)}, "methods": {"cap": method(0), "sft_a": method(1)}} for _ in range(n_contexts)]
    average = {"cap": {"AR_a2": 0.1, "AR_gain": 1.5, "KL(g||a2)": 2.0, "KL(g||g2)": 1.0, "KL(g2||g)": None}, "_Z": 0.01}
    # results.json stores methods sorted by name; the tables follow the config's order
    return {"config": {"proposals": ["sft_a", "cap"]}, "contexts": contexts, "average": average,
            "tables": {"models": "| model | rate |\n|---|---|\n| base | 0.1 |"}}  # a single-run experiment's own tables


PAGE = """# a page

prose stays

<!-- table: run_seed0 1 -->
| old table |
<!-- /table -->

<!-- table: run_seed0 average -->
| old average |
<!-- /table -->

<!-- table: run_seed0 models -->
| old named table |
<!-- /table -->

<!-- table: absent_seed0 0 -->
| kept as is |
<!-- /table -->
"""


def test_docs_tables_regenerate_from_results_json(tmp_path):
    make_docs = _make_docs()
    (tmp_path / "results" / "run_seed0").mkdir(parents=True)
    (tmp_path / "results" / "run_seed0" / "results.json").write_text(json.dumps(_results(2)))
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    argv = ["--results", str(tmp_path / "results"), "--pages", str(page)]
    assert make_docs.main(argv + ["--check"]) == 1 and page.read_text() == PAGE  # --check writes nothing
    assert make_docs.main(argv) == 0
    text = page.read_text()
    assert "prose stays" in text and "| old table |" not in text and "| old average |" not in text and "| kept as is |" in text
    table = text.split("<!-- table: run_seed0 1 -->\n")[1].split("<!-- /table -->")[0].splitlines()
    assert table[0].startswith("| proposal | train samples | AR_a' |") and len(table) == 5
    assert table[2] == "| gold g | – | – | – | – | – | – | 50 | 0.250 | 0.100 | 0.050 | 0.030 | n/a |"
    assert table[3].startswith("| sft_a |") and table[4].startswith("| cap |")
    assert table[3] == "| sft_a | 1,024 | 0.2 [0.1, 0.4] | 0.2 [0.1, 0.4] | 0.2 [0.1, 0.4] | 0.2 [0.1, 0.4] | n/a | 21 | 0.250 | 0.100 | 0.050 | 0.030 | n/a |"
    assert "| cap | 0.1 | 1.5 | 2 | 1 | n/a |" in text
    assert "| old named table |" not in text and "<!-- table: run_seed0 models -->\n| model | rate |\n|---|---|\n| base | 0.1 |\n" in text
    assert make_docs.main(argv + ["--check"]) == 0  # regenerating again changes nothing


def test_docs_pages_hold_well_formed_table_markers():
    """Every marked table in docs/results names a run and a context, and the page is unchanged without results."""
    make_docs = _make_docs()
    pages = sorted((ROOT / "docs" / "results").glob("*.md"))
    marked = sum(len(make_docs.MARKER.findall(p.read_text())) for p in pages)
    assert marked == sum(p.read_text().count("<!-- table:") for p in pages) >= 10
    for p in pages:
        after, used, missing = make_docs.regenerate(p.read_text(), ROOT / "no_such_results_folder")
        assert after == p.read_text() and not used


def test_no_issue_numbers_in_code_or_docs():
    """Code, docs and notebooks say what they do, not which tracker item asked for it."""
    pattern = re.compile(r"\bissues?\s+#?\d", re.I)
    files = [README, *(p for d in ("guard_jax", "experiments", "bench", "tests", "docs", "notebooks", "scripts")
                       for p in (ROOT / d).rglob("*") if p.suffix in {".py", ".md", ".ipynb", ".json", ".sh", ".toml"})]
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in files for i, line in enumerate(p.read_text(errors="ignore").splitlines())
            if pattern.search(line)]
    assert not hits, hits
