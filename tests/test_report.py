"""The single-run experiments' command line (experiments/report.py): strict config, --set, --quick, the files it writes."""

import dataclasses
import json

import pytest

from experiments import report
from guard_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Toy:
    steps: int = 3
    rate: float = 0.5


def _run(cfg, *, progress=False):
    return {"config": dataclasses.asdict(cfg), "total": cfg.steps * cfg.rate}


def _markdown(results, command):
    return f"`{command}`: {results['total']}\n"


def _main(argv):
    return report.main(argv, name="toy", doc="A toy experiment.\n\nmore", config_cls=Toy, run_experiment=_run, markdown=_markdown)


def test_main_reads_the_config_applies_settings_and_writes_both_files(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"steps": 4}))
    results = _main(["--config", str(path), "--set", "rate=0.25", "--out", str(tmp_path / "out")])
    assert results["config"] == {"steps": 4, "rate": 0.25} and results["total"] == 1.0
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert (tmp_path / "out" / "results.md").read_text() == f"`python -m experiments.toy --config {path} --set rate=0.25`: 1.0\n"
    assert _main(["--set", "steps=2", "--out", str(tmp_path / "d")])["config"] == {"steps": 2, "rate": 0.5}  # defaults + --set


def test_main_refuses_unknown_keys_and_two_configs(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"stpes": 4}))
    with pytest.raises(ConfigError, match="stpes"):
        _main(["--config", str(path), "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="rat"):
        _main(["--set", "rat=1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        _main(["--quick", "--config", str(path)])
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("name", ["l3m_length", "attribute_finetune"])
def test_shipped_configs_parse_strictly(name):
    """Each experiment's quick and full JSON configs parse into its config class (a typo there fails here)."""
    import importlib

    from guard_jax.config import load_json

    module = importlib.import_module(f"experiments.{name}")
    cls = module.LengthConfig if name == "l3m_length" else module.AttributeConfig
    for size in ("quick", "full"):
        cfg = load_json(cls, report.CONFIGS / f"{name}_{size}.json")
        assert isinstance(cfg, cls)
