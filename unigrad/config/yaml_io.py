"""A TrainConfig from YAML and dotted overrides, and back to YAML: loading (keys given twice refused), the
spelling of saved runs migrated, every problem raised as a ConfigError naming its key; and the --help text."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from unigrad.config.base import ConfigError
from unigrad.config.sections import GRADIENT_COMBINATIONS
from unigrad.config.train_config import TrainConfig
from unigrad.objective.presets import OBJECTIVE_FIELDS


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def migrate_saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run directory's config.yaml in today's spelling: runs saved before gradients.combine existed said
    `sampler.name: balanced | pcgrad` and `sampler.balance_target` (refused in a config a user writes); runs saved
    before DAPO's trainer options existed trained without them (today's dapo preset would turn them on)."""
    rollout = data.get("rollout", {})
    if isinstance(rollout, dict) and "dynamic_sampling" not in rollout:
        data = {**data, "rollout": {"dynamic_sampling": False, "overlong_buffer": 0, **rollout}}
    sampler = data.get("sampler")
    if not isinstance(sampler, dict):
        return data
    sampler, gradients = dict(sampler), dict(data.get("gradients") or {})
    if sampler.get("name") in GRADIENT_COMBINATIONS:
        gradients["combine"], sampler["name"] = sampler["name"], "uniform"
    if "balance_target" in sampler:
        gradients["balance_target"] = sampler.pop("balance_target")
    return {**data, "sampler": sampler, **({"gradients": gradients} if gradients else {})}


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory was trained with (its config.yaml, in any spelling this version has written)."""
    path = Path(run_dir) / "config.yaml"
    return load_config(path, migrate=True)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                migrate: bool = False) -> TrainConfig:
    """Config from an optional YAML file plus `key.sub=value` overrides (YAML-typed values). `migrate`: the file is
    a saved run's config.yaml, read in today's spelling (`migrate_saved_config`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = migrate_saved_config(loaded) if migrate else loaded
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_dotted(data, keys, value)
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> TrainConfig:
    """A `TrainConfig` from a nested mapping; every problem is reported as a `ConfigError` naming its key."""
    try:
        return TrainConfig(**data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "config"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            if key == "config":  # a check of the whole config: its message names the keys
                problems.append(msg)
            elif re.match(r"^\w+: ", msg) and not e["loc"][-1:] == (msg.split(":")[0],):  # a section's check
                problems.append(f"{key}.{msg}")
            else:
                problems.append(f"{key}: {msg}")
        raise ConfigError("invalid config: " + "; ".join(problems)) from None


def config_to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML, with `objective_args` holding every field of the resolved objective: a saved run
    reproduces even if a preset's defaults change later (and loads as any config does)."""
    data = cfg.model_dump(mode="json")
    resolved = cfg.resolved_objective().model_dump(mode="json")
    data["objective_args"] = {k: resolved[k] for k in OBJECTIVE_FIELDS}
    return yaml.safe_dump(data, sort_keys=False)


def config_help() -> str:
    """Every config key with its type, default, bounds and description, from `TrainConfig` (for --help)."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, prefix + name + ".")
                continue
            default = field.default_factory() if field.default_factory is not None else field.default
            bounds = " ".join(f"{op}{getattr(m, attr)}" for m in field.metadata
                              for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                              if getattr(m, attr, None) is not None)
            type_text = str(kind).replace("typing.", "") if not isinstance(kind, type) else kind.__name__
            head = f"{prefix}{name} ({type_text}{', ' + bounds if bounds else ''}; default {default!r})"
            lines.append(f"  {head}\n      {field.description}")

    walk(TrainConfig, "")
    return "\n".join(lines)
