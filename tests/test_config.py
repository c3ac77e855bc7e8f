"""guard_jax.config: strict parsing of nested dataclass configs, JSON files and --set overrides; the experiments'
typed config (experiments/config.py) on top of it: a misspelled key in a file or in a --set names itself and the
valid keys, every built proposal gets a resolved recipe config with the library's defaults."""

import dataclasses
import json

import pytest

from experiments.config import LexicalConfig, load
from guard_jax import proposals as P
from guard_jax.config import ConfigError, apply_settings, config_hash, from_dict, load_json, parse_setting, to_dict
from guard_jax.train.dpg import DPGConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
    rate: float = 0.5
    sizes: tuple[int, ...] = (1, 2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    inner: Inner = Inner()
    extra: int | None = None
    named: dict[str, Inner] = dataclasses.field(default_factory=dict)


def test_nested_sections_round_trip():
    cfg = from_dict(Outer, {"name": "x", "inner": {"rate": 1, "sizes": [3]}, "named": {"a": {"rate": 2.0}}})
    assert cfg == Outer(name="x", inner=Inner(rate=1.0, sizes=(3,)), named={"a": Inner(rate=2.0)})
    assert isinstance(cfg.inner.rate, float)  # an int is accepted for a float field, as a float
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert config_hash(cfg) == config_hash(from_dict(Outer, to_dict(cfg))) != config_hash(dataclasses.replace(cfg, extra=1))


def test_unknown_key_names_it_its_section_and_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'rte' in cfg.inner \(Inner\); valid keys: rate, sizes"):
        from_dict(Outer, {"name": "x", "inner": {"rte": 1.0}}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg \(Outer\) needs 'name'"):
        from_dict(Outer, {}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg.inner.rate: expected a number, got 'fast'"):
        from_dict(Outer, {"name": "x", "inner": {"rate": "fast"}}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg.extra: .*1.5"):
        from_dict(Outer, {"name": "x", "extra": 1.5}, "cfg")


def test_settings_parse_as_json_and_create_sections(tmp_path):
    assert parse_setting("train.dpg.learning_rate=3e-4") == (["train", "dpg", "learning_rate"], 3e-4)
    assert parse_setting('proposals=["dpg"]') == (["proposals"], ["dpg"])
    assert parse_setting("keyword=love") == (["keyword"], "love")
    data = {"name": "x"}
    assert apply_settings(data, ["inner.rate=2", "named.b.sizes=[4,5]"]) == {"name": "x", "inner": {"rate": 2}, "named": {"b": {"sizes": [4, 5]}}}
    assert data == {"name": "x"}  # the input is not modified
    for bad in ("rate", "=1", "inner..rate=1"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_setting(bad)
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_settings(data, ["name.x=1"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "x"}))
    assert load_json(Outer, path, ["inner.rate=0.25"]).inner.rate == 0.25
    with pytest.raises(ConfigError, match="unknown key 'rat'"):
        load_json(Outer, path, ["inner.rat=0.25"])


def test_recipe_defaults_are_the_trainers():
    cfg = P.DPGRecipeConfig()
    assert (cfg.learning_rate, cfg.n_samples, cfg.minibatch, cfg.swap_every) == (DPGConfig.learning_rate, DPGConfig.n_samples,
                                                                                 DPGConfig.minibatch, DPGConfig.swap_every)
    assert P.resolve_config("rl:0.5").beta == 0.5 and P.resolve_config("rl").beta == P.RLRecipeConfig().beta
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate' in train.dpg \(DPGRecipeConfig\); valid keys: .*learning_rate"):
        P.resolve_config("dpg", {"lerning_rate": 1e-2})
    with pytest.raises(ConfigError, match="contradicts the name's suffix"):
        P.resolve_config("rl:0.5", {"beta": 0.2})


QUICK = "experiments/configs/lexical_quick.json"


def test_experiment_config_resolves_every_built_proposal():
    cfg = load(LexicalConfig, QUICK, ["seed=3", "train.sft_dpg.learning_rate=1e-2", 'proposals=["sft_dpg"]'])
    assert cfg.built() == ["sft_dpg", "sft_a"]  # a warm start needs its source
    assert cfg.train["sft_dpg"].learning_rate == 1e-2 and isinstance(cfg.train["sft_dpg"], P.WarmStartConfig)
    assert {cfg.train[n].seed for n in ("sft_a", "sft_dpg", "dpg")} == {3}  # the experiment's seed unless a section sets one
    file = json.loads(open(QUICK).read())["train"]["sft_a"]
    assert all(getattr(cfg.train["sft_a"], k) == v for k, v in file.items())
    assert cfg.train["sft_a"].warmup_steps == P.SFTRecipeConfig().warmup_steps  # the library's default for what the file omits
    data = to_dict(cfg)
    assert data["train"]["sft_dpg"]["learning_rate"] == 1e-2 and data["proposals"] == ["sft_dpg"]
    dpg = load(LexicalConfig, QUICK, ["seed=3", "train.dpg.learning_rate=1e-2", 'proposals=["sft_dpg", "dpg"]']).train["dpg"]
    assert (dpg.seed, dpg.learning_rate) == (3, 1e-2)


def test_misspelled_keys_in_a_file_and_in_a_setting_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--set train.dpg.lerning_rate=0.01: unknown key 'lerning_rate' in lexical_quick.json.train.dpg"):
        load(LexicalConfig, QUICK, ["train.dpg.lerning_rate=0.01"])
    with pytest.raises(ConfigError, match=r"--set kewyord=x: unknown key 'kewyord' in lexical_quick.json \(LexicalConfig\); valid keys: .*keyword"):
        load(LexicalConfig, QUICK, ["kewyord=x"])
    data = json.loads(open(QUICK).read())
    data["eval"]["n_curv"] = 3
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown key 'n_curv' in typo.json.eval \(EvalConfig\); valid keys: n_a, n_a2, n_curve"):
        load(LexicalConfig, path)
    with pytest.raises(ConfigError, match=r"unknown proposal 'dgp'"):
        load(LexicalConfig, QUICK, ['proposals=["dgp"]'])


def test_a_setting_no_built_proposal_reads_is_refused():
    with pytest.raises(ConfigError, match=r"train.l3m.learning_rate=0.1: no proposal of this run reads train.l3m \(it builds cap"):
        load(LexicalConfig, QUICK, ["train.l3m.learning_rate=0.1"])
