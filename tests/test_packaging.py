"""The built wheel: its declared dependencies match the lock (requirements*.txt), it ships the licence and
the assets, and installed into a fresh venv it runs `guard-jax --help` and the library from outside the
repository. The slow test installs it from PyPI into a clean venv, dependencies and all."""

import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
SNIPPET = (  # the three lines a user runs after installing: the shipped model and tokenizer round-trip a text
    "import guard_jax, guard_jax.lm\n"
    "a = guard_jax.lm.LM.load('embedded').with_context('Love is all you need.')\n"
    "print(guard_jax.__file__, a.model.vocab_size, a.decode([a.prompt[1:]], [len(a.prompt) - 1]) == [a.context])\n"
)


def _pins(path: pathlib.Path) -> dict[str, Version]:
    """{canonical name: pinned version} of the `name==version` lines of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: '{line}' is not an exact pin (name==version)"
            out[canonicalize_name(name)] = Version(version)
    return out


def _next_breaking(v: Version) -> Version:
    """The first version a compatible range must exclude: the next major, or the next minor for 0.x."""
    return Version(f"0.{v.minor + 1}") if v.major == 0 else Version(f"{v.major + 1}")


def test_the_full_lock_holds_every_pin_and_this_environment():
    """requirements-lock.txt (every package, transitive ones too) agrees with each pin of requirements*.txt, and
    the environment the tests run in is the lock: a transitive package that drifted (a newer ml_dtypes beside a
    pinned jaxlib, say) fails here by name instead of somewhere in the suite."""
    import importlib.metadata

    lock = _pins(ROOT / "requirements-lock.txt")
    pins = {**_pins(ROOT / "requirements.txt"), **_pins(ROOT / "requirements-test.txt")}
    torch = pins.pop("torch")  # a local build (2.13.0+cpu): pinned by requirements-test.txt, not the lock
    assert {n: v for n, v in pins.items() if lock.get(n) != v} == {}, "requirements*.txt pins that the lock contradicts or lacks"
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in importlib.metadata.distributions()}
    drift = {n: f"lock {v}, installed {installed.get(n)}" for n, v in lock.items() if installed.get(n) != v}
    assert drift == {}, f"the environment differs from requirements-lock.txt (re-run `bash scripts/dev.sh test`): {drift}"
    assert installed["torch"].base_version == str(torch)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel built offline (setuptools from this venv, no build isolation) from a copy of the sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "guard_jax", src / "guard_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    (path,) = (tmp / "dist").glob("guard_jax-*.whl")
    return path


def _metadata(wheel: pathlib.Path) -> tuple[list[str], dict[str, list[str]]]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        text = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    fields: dict[str, list[str]] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    return names, fields


def test_wheel_declares_compatible_ranges_around_the_lock(wheel):
    _, fields = _metadata(wheel)
    runtime, extras = {}, {}
    for line in fields["Requires-Dist"]:
        req = Requirement(line)
        (extras if req.marker else runtime)[canonicalize_name(req.name)] = req
    pins = _pins(ROOT / "requirements.txt")
    assert sorted(runtime) == sorted(pins), "pyproject's dependencies and requirements.txt must name the same packages"
    test_pins = _pins(ROOT / "requirements-test.txt")
    assert set(extras) <= set(test_pins), f"extras not pinned in requirements-test.txt: {sorted(set(extras) - set(test_pins))}"
    for name, req in {**runtime, **extras}.items():
        pin = pins.get(name, test_pins.get(name))
        assert req.specifier.contains(pin, prereleases=True), f"{name}: {req.specifier} excludes the pinned {pin}"
        assert any(s.operator == ">=" and Version(s.version) == pin for s in req.specifier), f"{name}: {req.specifier} needs the lower bound >={pin}"
        assert not req.specifier.contains(_next_breaking(pin), prereleases=True), f"{name}: {req.specifier} admits {_next_breaking(pin)}"


def test_wheel_ships_the_licence_assets_and_the_command(wheel):
    names, fields = _metadata(wheel)
    assert fields["License-Expression"] == ["Apache-2.0"]
    assert fields["License-File"] == ["LICENSE"]
    licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    with zipfile.ZipFile(wheel) as z:
        assert "Apache License" in z.read(licence).decode() and (ROOT / "LICENSE").read_bytes() == z.read(licence)
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "guard-jax = guard_jax.cli:main" in entry_points
    for asset in ("guard_jax/assets/base_lm/model.safetensors", "guard_jax/assets/base_lm/config.json",
                  "guard_jax/assets/tokenizer/tokenizer.json"):
        assert asset in names, asset
    assert not [n for n in names if n.startswith(("tests/", "experiments/", "bench/", "notebooks/"))]


def _check_installed(venv: pathlib.Path, cwd: pathlib.Path) -> None:
    """`guard-jax --help` and the three-line snippet, run side by side from `cwd` with a bare environment."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(pathlib.Path.home())}
    cmds = [[str(venv / "bin" / "guard-jax"), "--help"], [str(venv / "bin" / "python"), "-c", SNIPPET]]
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    (help_out, help_err), (out, err) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == 0 and "usage: guard-jax" in help_out, help_err[-3000:]
    assert procs[1].returncode == 0, err[-3000:]
    file, vocab, round_trip = out.split()
    assert pathlib.Path(file).is_relative_to(venv), f"imported {file}, not the installed copy"
    assert (vocab, round_trip) == ("8192", "True")


def test_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
    """`pip install --no-deps` of the wheel into a fresh venv that sees this venv's dependencies."""
    venv = tmp_path / "venv"
    python = _fresh_venv_seeing_shared_packages(venv)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True)
    _check_installed(venv, tmp_path)


@pytest.mark.slow
def test_pip_install_pulls_the_dependencies_into_a_clean_venv(wheel, tmp_path):
    """A clean venv, `pip install guard_jax-*.whl` from PyPI (the pip cache makes repeats fast)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_installed(venv, tmp_path)


def _fresh_venv_seeing_shared_packages(venv: pathlib.Path) -> pathlib.Path:
    """A venv without guard_jax whose interpreter imports this venv's packages (pip included) through a
    .pth path: a plain path line runs none of that folder's own .pth hooks, so its guard_jax stays hidden."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = pathlib.Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       check=True, capture_output=True, text=True).stdout.strip())
    (site / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


def test_notebook_install_cell_makes_guard_jax_importable_in_the_same_process(wheel, tmp_path):
    """The notebooks' first cell, with GUARD_JAX_SOURCE pointing at the wheel, in an interpreter where
    guard_jax is not importable: after the cell, `import guard_jax` works without a restart."""
    import re

    from notebooks.make_notebooks import INSTALL, NOTEBOOKS

    assert all(cells[1].source == INSTALL for cells in NOTEBOOKS.values()), "every notebook starts with the install cell"
    cell, n = re.subn(r"^GUARD_JAX_SOURCE = .*$", f"GUARD_JAX_SOURCE = {str(wheel)!r}", INSTALL, flags=re.M)
    assert n == 1, "the install cell sets GUARD_JAX_SOURCE on one line"
    python = _fresh_venv_seeing_shared_packages(tmp_path / "venv")
    check = "import importlib.util; assert importlib.util.find_spec('guard_jax') is None\n" + cell + "\nfrom guard_jax import exact\n"
    # offline, no dependency resolution, and nothing of the shared venv uninstalled or replaced
    env = {"PATH": "/usr/bin:/bin", "HOME": str(pathlib.Path.home()), "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PIP_IGNORE_INSTALLED": "1"}
    out = subprocess.run([str(python), "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    installed = pathlib.Path(out.stdout.split("guard_jax from", 1)[1].strip())
    assert installed.is_relative_to(tmp_path / "venv"), installed


def test_notebooks_import_only_the_installed_library():
    """No notebook reaches into the repository: no `experiments` import, no sys.path edit (the install cell
    only adds site-packages folders that pip created)."""
    import re

    from notebooks.make_notebooks import INSTALL, NOTEBOOKS

    for name, cells in NOTEBOOKS.items():
        for cell in cells:
            if cell.cell_type != "code" or cell.source == INSTALL:
                continue
            assert not re.search(r"^\s*(from|import)\s+experiments\b", cell.source, re.M), f"{name} imports experiments"
            assert "sys.path" not in cell.source, f"{name} edits sys.path"
