"""Fuzzing the command line and the constraint-spec parser: every input gives a result or one error line."""

import contextlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard_jax import cli
from guard_jax import constraints as C
from guard_jax.lm import EMBEDDED

SPEC_ALPHABET = "kewyordgxsntim:&|~()'\"\\ .+*^$ab1-_0"


@given(st.text(SPEC_ALPHABET, max_size=40) | st.text(max_size=20))
def test_any_spec_parses_or_gives_one_spec_error(spec):
    try:
        tree = C.parse_spec(spec)
    except C.SpecError as e:
        assert "\n" not in str(e) and str(e).startswith("constraint spec"), str(e)
    else:
        assert C.parse_spec(C.spec_to_str(tree)) == tree


_ARGS = st.text("abc xyz&|()'\"\\+.", min_size=1, max_size=8)
_ATOMS = st.builds(C.SpecAtom, st.sampled_from(["keyword", "regex"]), _ARGS.filter(str.strip)) | st.builds(
    C.SpecAtom, st.just("sentiment"), st.floats(-1, 1).map(repr))
_TREES = st.recursive(_ATOMS, lambda sub: st.builds(C.SpecOp, st.just("~"), st.tuples(sub))
                      | st.builds(C.SpecOp, st.sampled_from("&|"), st.lists(sub, min_size=2, max_size=3).map(tuple)), max_leaves=6)


def _valid(tree) -> bool:
    try:
        C.parse_spec(C.spec_to_str(tree))
        return True
    except C.SpecError:  # e.g. an argument that is not a valid regex
        return False


@given(_TREES.filter(_valid))
def test_printed_specs_parse_back_to_the_same_tree(tree):
    parsed = C.parse_spec(C.spec_to_str(tree))
    flat = lambda t: t if isinstance(t, C.SpecAtom) else (t.op, tuple(flat(x) for x in t.operands))
    assert flat(parsed) == flat(_normalise(tree))


def _normalise(tree):
    """& and | are printed parenthesised, so nesting of the same operator is kept as written."""
    return tree if isinstance(tree, C.SpecAtom) else C.SpecOp(tree.op, tuple(_normalise(t) for t in tree.operands))


_INT = st.integers(-3, 3).map(str) | st.sampled_from(["10", "1e3", "x", "", "99999999999", "-0", "2.5"])
_FLOAT = st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.sampled_from(["x", "0.5", "1", ""])
_SPEC = st.sampled_from(["keyword:the"] * 4 + ["keyword:love&keyword:the", "regex:'a|b'", "sentiment:2", "(keyword:a", "", "~keyword:x",
                         "colour:red", "regex:'('"]) | st.text(SPEC_ALPHABET, max_size=15)
_PATH = st.sampled_from([str(EMBEDDED)] * 4 + ["/no/such/folder", str(EMBEDDED / "config.json"), "embedded", ""])
_OUT = st.sampled_from(["/proc/x.jsonl", "/tmp", "/tmp/guard_jax_fuzz/out.json", "relative/out.json"])
FLAGS = {
    "toy": {"--vocab": _INT, "--max-len": _INT, "--beta": _FLOAT, "--n-a": _INT, "--n-a2": _INT, "--num-guard": _INT,
            "--batch-size": _INT, "--seed": _INT, "--out": _OUT, "--no-eos": None, "--quiet": None, "--bogus": _INT},
    "sample": {"--model": _PATH, "--constraint": _SPEC, "--max-new-tokens": _INT, "--batch-size": _INT, "--num": _INT,
               "--max-draws": _INT, "--prompt": st.text(max_size=5), "--seed": _INT, "--out": _OUT, "--quiet": None, "--n": _INT},
    "estimate": {"--model": _PATH, "--proposal": _PATH, "--constraint": _SPEC, "--max-new-tokens": _INT, "--n-a": _INT,
                 "--n-a2": _INT, "--cap-prompt": st.text(max_size=5), "--context": st.text(max_size=5), "--out": _OUT},
}


@st.composite
def argvs(draw):
    command = draw(st.sampled_from(sorted(FLAGS) * 3 + ["nope"]))
    flags = FLAGS.get(command, FLAGS["toy"])
    argv = [command]
    if command in ("sample", "estimate") and draw(st.integers(0, 9)):  # mostly with the required flags
        argv += ["--model", draw(_PATH), "--constraint", draw(_SPEC)]
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=6)):
        argv.append(flag)
        if flags[flag] is not None:
            argv.append(draw(flags[flag]))
    return argv


@pytest.fixture(scope="module")
def patched_commands():
    """The commands themselves replaced by `return 0`: the fuzz covers parsing and validation, not sampling."""
    mp = pytest.MonkeyPatch()
    for name in ("_toy", "_sample", "_estimate"):
        mp.setattr(cli, name, lambda args: 0)
    yield
    mp.undo()


@given(argvs())
def test_any_command_line_gives_a_result_or_one_error_line(patched_commands, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    text = err.getvalue()
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        assert text.count("\n") == 1 and "Traceback" not in text and "error: " in text, (argv, text)
        assert "internal error" not in text, (argv, text)
    else:
        assert text == "", (argv, text)
