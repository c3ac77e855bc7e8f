"""The experiments' typed configs: a JSON file (experiments/configs/*.json) plus `--set KEY=VALUE` overrides,
parsed strictly (`guard_jax.config`): an unknown or misspelled key, in the file or in a `--set`, is an error
naming it and the valid keys.

`train` maps proposal names to their recipe configs (`guard_jax.proposals`): each section is parsed into the
config class its recipe registers, with the library's defaults for what it does not set (`rl:0.5` reads
`train.rl`, then `train["rl:0.5"]`, then beta = 0.5). Every proposal the
experiment builds (those listed and those they start from) gets a resolved config, whose `seed` is the
experiment's seed unless its section sets one; `to_dict(config)` is what results.json records.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from guard_jax.config import ConfigError, apply_settings, build, from_dict, parse_setting
from guard_jax.proposals import lookup, resolve_config


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """n_a draws of a (gold), n_a2 draws of each a' for its evaluation, n_curve per curve point; Self-BLEU on at
    most n_diversity samples per row, on sets of one size per context (none below min_diversity_set)."""

    n_a: int
    n_a2: int
    n_curve: int = 2000
    n_diversity: int = 1000
    min_diversity_set: int = 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """What every experiment reads. `batch_size`: draws per sampling batch; `score_batch_size`: teacher-forced
    scoring batch (gold sets are small: a smaller padded batch wastes less)."""

    name: str
    description: str = ""
    seed: int = 0
    model: str | None = None
    max_new_tokens: int
    batch_size: int = 512
    score_batch_size: int = 128
    semantic: bool = True
    tensorboard: bool = True
    cap_prompt: str = ""
    proposals: tuple[str, ...]
    eval: EvalConfig
    train: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict_hook(cls, data, where: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {data!r}")
        train = data.get("train", {})
        if not isinstance(train, dict):
            raise ConfigError(f"{where}.train: expected a section mapping proposal names to their settings, got {train!r}")
        config = build(cls, {**data, "train": {}}, where)
        for name in config.proposals:
            _lookup(name, f"{where}.proposals")
        names = list(dict.fromkeys([*config.proposals, *train]))
        resolved: dict[str, Any] = {}
        while names:
            name = names.pop(0)
            if name in resolved:
                continue
            recipe, _ = _lookup(name, f"{where}.train")
            base = {k: v for k, v in dict(train.get(name.partition(":")[0], {})).items() if k != recipe.param}
            section = base | dict(train.get(name, {})) if ":" in name else dict(train.get(name, {}))  # rl:0.5 reads train.rl too
            if "seed" in {f.name for f in dataclasses.fields(recipe.config_cls)}:
                section.setdefault("seed", config.seed)
            resolved[name] = resolve_config(name, section, f"{where}.train")
            names += recipe.needs(resolved[name])
        return dataclasses.replace(config, train=resolved)

    def built(self) -> list[str]:
        """The proposals this config builds: those listed and, transitively, those they start from."""
        out, todo = [], list(self.proposals)
        while todo:
            name = todo.pop(0)
            if name not in out:
                out.append(name)
                todo += lookup(name)[0].needs(self.train[name])
        return out

    def unread(self, settings: list[str]) -> list[str]:
        """The `KEY=VALUE` settings no part of this run reads (a `train.NAME...` key where NAME is not built),
        each with the reason."""
        built, out = self.built(), []
        for item in settings:
            path, _ = parse_setting(item)
            if path[0] == "train" and len(path) > 1 and path[1] not in built:
                out.append(f"{item}: no proposal of this run reads train.{path[1]} (it builds {', '.join(built)})")
        return out


def _lookup(name: str, where: str):
    try:
        return lookup(name)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LexicalConfig(ExperimentConfig):
    """Unconditional generation that must contain `keyword` (the constraint spec, `{keyword}` filled in);
    positions of the keyword, or of `position_regex`."""

    keyword: str
    constraint: str = "keyword:{keyword}"
    position_regex: str | None = None

    def spec(self) -> str:
        return self.constraint.format(keyword=self.keyword, Keyword=self.keyword.capitalize())

    def cap_text(self) -> str:
        return self.cap_prompt.format(keyword=self.keyword, Keyword=self.keyword.capitalize())


@dataclasses.dataclass(frozen=True, kw_only=True)
class SentimentConfig(ExperimentConfig):
    """Continuations of `n_contexts` negative openings (VADER compound < context_threshold) whose last sentence
    scores above `threshold`."""

    n_contexts: int
    context_threshold: float
    threshold: float
    position_label: str = "relative position of the last sentence in the continuation"


def load(cls, path: str | pathlib.Path, settings: list[str] = (), overrides: dict | None = None):
    """The JSON config at `path`, command-line `overrides` (None values ignored) and `--set` settings applied in
    order, parsed into `cls`. A bad key in the file is reported against the file, one in a `--set` against it."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    data |= {k: v for k, v in (overrides or {}).items() if v is not None}
    config = from_dict(cls, data, path.name)
    for item in settings:
        data = apply_settings(data, [item])
        try:
            config = from_dict(cls, data, path.name)
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {e}") from None
    unread = config.unread(list(settings))
    if unread:
        raise ConfigError(f"--set {unread[0]}; drop it or add the proposal to `proposals`")
    return config
