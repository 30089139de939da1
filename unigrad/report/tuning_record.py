"""The record `unigrad tune FILE` leaves beside a study file (tuned/NAME.yaml next to FILE) and how `unigrad study`
reads it: the picked values, the split they were picked on, the tuning table, the commit, and a digest of what the
tuning trained (train, arms, tuning section, steps), so a study file edited after its tuning is refused until it is
tuned again. Also the sentence each study page opens its method with: where its learning rate came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

INHERITED_LR = 1.0e-4  # results.md's rate, chosen by reading test accuracy before a validation split existed


def record_path(study_file: str | Path) -> Path:
    """tuned/NAME.yaml in the study file's directory (a subdirectory: the study files' glob does not take it)."""
    path = Path(study_file)
    return path.parent / "tuned" / f"{path.stem}.yaml"


def table_path(spec) -> Path:
    """docs/studies/NAME_tuning.md for a study whose page is docs/studies/NAME.md (relative to the doc root)."""
    doc = Path(spec.doc)
    return doc.with_name(f"{doc.stem}_tuning.md")


def digest(spec) -> str:
    """What the tuning trained and evaluated: train, arms, the tuning section and its steps (sha256, 16 hex)."""
    tuning = spec.tuning.model_dump()
    if not tuning["fixed"]:  # records made before `fixed` existed keep their digest
        del tuning["fixed"]
    what = {"train": spec.train, "arms": spec.arms, "tuning": tuning,
            "steps": tuning["steps"] or spec.steps}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_record(study_file: str | Path, record: dict[str, Any]) -> Path:
    path = record_path(study_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# Written by `{record['command']}`; read by `unigrad study {Path(study_file).name}`, which trains each "
            f"arm with {record['key']} as picked here. Do not edit: rerun the tuning.\n")
    path.write_text(head + yaml.safe_dump(record, sort_keys=False))
    return path


def read_record(spec, study_file: str | Path) -> dict[str, Any] | None:
    """The tuning record of the study (None: never tuned); ValueError when it cannot be used: picked on a split other
    than validation, or made for another version of the study file (the digest differs)."""
    path = record_path(study_file)
    if spec.tuning is None or not path.is_file():
        return None
    record = yaml.safe_load(path.read_text())
    if record.get("split") != "validation":
        raise ValueError(f"{path}: values picked on the {record.get('split')!r} split; the study reports test "
                         "numbers and takes values tuned on validation only: rerun `unigrad tune`")
    if record.get("digest") != digest(spec):
        raise ValueError(f"{path}: tuned for another version of {Path(study_file).name} (train, arms or tuning "
                         f"changed since); rerun `unigrad tune {study_file}`")
    missing = [arm for arm in spec.arms if arm not in record.get("picks", {}) and arm not in record.get("fixed", {})]
    if missing:
        raise ValueError(f"{path}: no pick for arm(s) {', '.join(missing)}; rerun `unigrad tune {study_file}`")
    return record


def apply_record(spec, record: dict[str, Any]):
    """The study with each tuned arm's value set (as the arm's last override, so it wins over `train`); a fixed arm
    keeps the file's value."""
    picked = record["picks"]
    arms = {arm: {**overrides, record["key"]: picked[arm]} if arm in picked else dict(overrides)
            for arm, overrides in spec.arms.items()}
    tuned = type(spec).model_validate({**spec.model_dump(), "arms": arms, "tuning": None})
    tuned._source, tuned._tuned = spec._source, record
    return tuned


def load_tuned_study(path: str | Path):
    """(the study as it runs, its tuning record or None): with a record, every arm carries its tuned value."""
    from unigrad.report.seeded_study import load_study

    spec = load_study(path)
    record = read_record(spec, path)
    return (apply_record(spec, record), record) if record is not None else (spec, None)


def provenance(spec, record: dict[str, Any] | None) -> str:
    """For the study page: what was tuned, on which split, from which table; and whether the learning rate was."""
    tuned = _tuned_sentence(record) if record is not None else ""
    if record is not None and record["key"] == "optim.lr":
        return tuned
    pending = (f"`{spec.tuning.key}` not tuned yet (the file's tuning section awaits `unigrad tune`). "
               if spec.tuning is not None and record is None else "")
    return " ".join(x for x in (tuned, pending + _untuned_rate(spec)) if x)


def _tuned_sentence(record: dict[str, Any]) -> str:
    picks = record["picks"]
    one = len(set(picks.values())) == 1
    values = (f"{_g(next(iter(picks.values())))} for every arm" if record["per"] == "study" or one and
              record["per"] == "control" else ", ".join(f"{arm} {_g(v)}" for arm, v in picks.items()))
    table = Path(record["table"]).name
    how = "pick on the control arm" if record["per"] == "control" else f"{record['per']}-wise pick"
    fixed = record.get("fixed", {})
    if fixed:
        values += "; not tuned (fixed, the file's value): " + ", ".join(f"{arm} {_g(v)}" for arm, v in fixed.items())
    return (f"`{record['key']}` tuned on the **validation** split ({how} over grid "
            f"{', '.join(_g(x) for x in record['grid'])}; seeds {record['seeds'][0]}-{record['seeds'][-1]}, disjoint "
            f"from this page's; {record['steps']} steps per run): {values}. Table: [{table}]({table}), written by "
            f"`{record['command']}` at commit {record['commit']} ({record['date']}).")


def _untuned_rate(spec) -> str:
    from unigrad.report.seeded_study import arm_config

    rates = {arm_config(spec, arm).get("optim", {}).get("lr", INHERITED_LR) for arm in spec.arms}
    if spec.lr_note:
        return ("Learning rate not tuned on validation (optim.lr " + ", ".join(_g(r) for r in sorted(rates))
                + f"): {spec.lr_note.strip().rstrip('.')}.")
    if rates == {INHERITED_LR}:
        return "Learning rate not tuned (inherited 1e-4, chosen on test in docs/results.md)."
    return ("Learning rate not tuned on validation (optim.lr " + ", ".join(_g(r) for r in sorted(rates))
            + " as set in the study file; its comment says how it was chosen).")


def _g(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else "(the config's default)"


def refuse_untuned(spec, study_file: str | Path) -> None:
    """ValueError when the study file has a tuning section and no record: its test numbers would come from values
    nobody chose on validation."""
    if spec.tuning is not None and spec._tuned is None:
        raise ValueError(f"{study_file} has a tuning section and no tuning record ({record_path(study_file)}): run "
                         f"`unigrad tune {study_file}` first (values chosen on validation), then the study; "
                         "--steps/--seeds smoke runs and --page-only are allowed without one")
