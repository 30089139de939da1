"""Resuming a run: the config it continues with, and the keys an override may change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from unigrad.config.base import ConfigError
from unigrad.config.train_config import TrainConfig
from unigrad.config.yaml_io import _set_dotted, config_to_yaml, parse_override, validate_config

# Keys a resumed run may change (`unigrad train --resume --override KEY=VALUE`): how long it runs, what it logs and
# evaluates, how it is watched, how long a reward may take (what a reward-timeout stop asks to raise). Everything
# else would make the resumed steps differ from the run they continue.
RESUMABLE_KEYS = ("max_steps", "max_minutes", "save_every", "keep_checkpoints", "samples_per_step", "tensorboard",
                  "report_to", "threads", "rollout.engine_threads", "rollout.worker_timeout", "reward_timeout",
                  "eval.", "monitors.")


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of a config as {dotted key: value}, the objective resolved (so a preset's name and its fields
    compare equal)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node and prefix != "task_weights." and prefix != "objective_args.":
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(yaml.safe_load(config_to_yaml(cfg)), "")
    for key, value in (out.pop("objective_args", None) or {}).items():
        out[f"objective_args.{key}"] = value
    return out


def resume_config(saved: TrainConfig, given: TrainConfig | None, overrides: list[str], run_dir: Path) -> TrainConfig:
    """The config a resumed run continues with: its own (`saved`), with `overrides` of `RESUMABLE_KEYS` applied.
    Refuses (ConfigError) settings `given` on the command line that differ from the run's, listing them, and
    overrides of any other key."""
    if given is not None:
        old, new = _flat(saved), _flat(given)
        differing = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if differing:
            listed = "; ".join(f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} given" for k in differing[:12])
            more = f" (and {len(differing) - 12} more)" if len(differing) > 12 else ""
            raise ConfigError(
                f"--resume: these settings differ from the run's own ({run_dir / 'config.yaml'}): {listed}{more}. "
                "A resumed run continues with its own config: leave the settings out (or give the same ones); "
                "max_steps, max_minutes, logging, eval.* and monitors.* can change with --override KEY=VALUE; "
                "anything else needs a new run (another --output-dir)")
    data = yaml.safe_load(config_to_yaml(saved))
    for item in overrides:
        keys, value = parse_override(item)
        dotted = ".".join(keys)
        if not any(dotted == k or (k.endswith(".") and dotted.startswith(k)) for k in RESUMABLE_KEYS):
            raise ConfigError(f"--override {dotted}: a resumed run can only change {', '.join(RESUMABLE_KEYS)} "
                              "(keys ending in '.' are sections); other settings need a new run")
        _set_dotted(data, keys, value)
    return validate_config(data)
