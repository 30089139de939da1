"""Checks that refuse a study before it trains anything: a study file that is not valid YAML (a tab, a key given
twice), arms whose training config is not a valid `unigrad train` config, and runs left in the output directory by
a study with other settings (a smoke run with `--steps 1`, an edited study file), which would otherwise be reused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from unigrad.config import ConfigError, TrainConfig, _flat, _UniqueKeyLoader, load_run_config, validate_config

IGNORED = ("threads",)  # set by the study's `parallel`, not part of what a run computes


def read_mapping(path: Path) -> dict[str, Any]:
    """The study file's top-level mapping; a YAML error names the file and the line (a tab: replace it)."""
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}: line {mark.line + 1}" if mark is not None else str(path)
        line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        if "\t" in line:
            raise ValueError(f"{where}: a tab character; YAML indents with spaces only: replace the tab with "
                             "spaces") from None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}); fix that line") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def compact(err: ValidationError, path: Path) -> str:
    """A pydantic error about the study file as one line: each problem with its key."""
    problems = [f"{'.'.join(map(str, e['loc'])) or 'study'}: {e['msg'].removeprefix('Value error, ')}"
                .replace("Extra inputs are not permitted", "unknown key") for e in err.errors()]
    return f"{path}: invalid study file: " + "; ".join(problems)


def check_arm_configs(spec, path: Path) -> None:
    """Every arm's training config (`train` with the arm's overrides) is a valid config, or ValueError naming the
    arm and the key."""
    from unigrad.report.seeded_study import arm_config

    for arm in spec.arms:
        try:
            validate_config(arm_config(spec, arm))
        except ConfigError as err:
            raise ValueError(f"{path}: arm {arm!r} (train: with the arm's overrides): {err}; `unigrad train --help` "
                             "lists the config keys") from None


def _same(key: str, old: Any, new: Any) -> bool:
    if key == "model.name" and isinstance(old, str) and isinstance(new, str):  # a staged arm's start: a path
        return Path(old).resolve() == Path(new).resolve()
    return old == new


def differences(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """'key: value in the run, value in the study' for each setting (but `IGNORED`) that differs."""
    old, new = _flat(saved), _flat(wanted)
    return [f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} in the study" for k in sorted(set(old) | set(new))
            if k not in IGNORED and not _same(k, old.get(k), new.get(k))]


def runs_with_other_settings(study) -> list[str]:
    """The runs in the study's output directory trained with settings other than the study's (as it is now, with
    --steps): one line each, naming the run directory and what differs."""
    out = []
    for wave in study.jobs():
        for arm, seed in wave:
            run_dir = study.run_dir(arm, seed)
            if not (run_dir / "config.yaml").is_file():
                continue
            diff = differences(load_run_config(run_dir), validate_config(study.run_config(arm, seed)))
            if diff:
                out.append(f"{run_dir} ({'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''})")
    return out


def refuse_other_settings(study) -> None:
    """ValueError when runs in the study's directory were trained with other settings (they would be reused)."""
    stale = runs_with_other_settings(study)
    if stale:
        raise ValueError(f"{len(stale)} run(s) in {study.out} were trained with other settings than this study's "
                         f"and would be reused: {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}. Give "
                         "another --out for this study, or delete those run directories to train them again")


def refuse_page_without_results(study) -> None:
    """ValueError when the page cannot be written yet: a start model's evaluation is missing (no study ran there)."""
    for model in sorted({study.model_of(arm) for arm in study.spec.arms}):
        if not (study.start_dir(model) / "study_eval_test.json").is_file():
            raise ValueError(f"--page-only: {study.out} holds no results of this study yet (no evaluation of its "
                             f"start model {model}); run the study first (without --page-only), or give its --out")
