"""`unigrad tune FILE`: the study's `tuning:` grid run through the study runner and the pick made on validation.

The grid is itself a study (`grid_spec`): one arm per (study arm, grid value), named ARM+VALUE, each the study arm
with the tuned key set to the value, trained for the tuning's steps with the tuning seeds (1000, 1001, ...: never a
seed of the study's own runs, `tuning_spec`) and evaluated on the validation split only. `Study` trains and
evaluates it, resuming a cut-off tuning as it resumes a study.

Staged arms (`tuning_spec`): a `fixed` arm is one grid arm under its own name, at the file's value; a tuned arm
`from` a fixed arm starts from that arm's run; a tuned arm `from` a tuned arm starts from that arm's run at the same
value (ARM+VALUE from PARENT+VALUE), so each grid value trains the whole method.

Pick rule (`pick`): per arm (or, with `per: study`, over all arms' runs together) the value with the highest mean
validation pass@1 over its runs. A value with a run that stopped itself or has no evaluation is not eligible.
Ties (means equal to 1e-9) go to the smaller value: for a learning rate, the more conservative one. A stage another
tuned arm starts from takes the pick of its last stage (it is judged by where the method ends, not halfway).
"""

from __future__ import annotations

import datetime
import math
import statistics
from pathlib import Path
from typing import Any

from unigrad.report.seeded_study import Study, StudySpec, arm_config, model_of
from unigrad.report.tuning_spec import last_stage, tuning_seeds

TIE = 1e-9


def grid_arm(arm: str, value: float) -> str:
    """The grid study's name for (study arm, value): "grpo+0.0001"."""
    return f"{arm}+{value:g}"


def grid_spec(spec: StudySpec) -> StudySpec:
    """The grid as a study: every (tuned arm, value) an arm with the tuned key set (a stage starting from its parent
    at the same value), every fixed arm as it is, the tuning's seeds and steps, the validation split only, no
    comparisons (nothing on it is reported as a result)."""
    tuning = spec.tuning
    arms = {}
    for arm, overrides in spec.arms.items():
        if arm not in scored_arms(spec) and arm not in tuning.fixed:
            continue
        if arm in tuning.fixed:  # trained as in the study: its own steps, else the study's (not tuning.steps)
            arms[arm] = {"steps": spec.steps, **overrides}
            continue
        kept = {k: v for k, v in overrides.items() if not (k == "steps" and tuning.steps is not None)}
        parent = overrides.get("from")
        for value in tuning.grid:
            stage = {"from": grid_arm(parent, value)} if parent is not None and parent not in tuning.fixed else {}
            arms[grid_arm(arm, value)] = {**kept, **stage, tuning.key: value}
    data = {**spec.model_dump(exclude={"tuning", "baseline", "control", "comparisons", "columns", "curves",
                                               "boundary", "collapse_metric"}),
            "arms": arms, "seeds": tuning.seeds, "steps": tuning.steps or spec.steps,
            "eval": {"prompts": tuning.prompts, "splits": ["validation"]}}
    return StudySpec.model_validate(data)


class GridStudy(Study):
    """The grid study, run with the tuning seeds instead of 0 .. seeds-1."""

    def seeds(self) -> list[int]:
        return tuning_seeds(self.spec.seeds)

    def score(self, arm: str, seed: int) -> float:
        """Validation mean pass@1 of one run; NaN when it stopped itself or was not evaluated."""
        result = None if self.status(arm, seed).get("stopped") else self.evaluation(arm, seed, "validation")
        return float("nan") if result is None else float(result["mean"]["pass@1"])


def scored_arms(spec: StudySpec) -> list[str]:
    """The study's arms trained on the grid and scored: all but the fixed ones; with `per: control` the control
    arm(s) alone."""
    if spec.tuning.per == "control":
        control = spec.control
        return [control] if isinstance(control, str) else list(dict.fromkeys(control.values()))
    return [arm for arm in spec.arms if arm not in spec.tuning.fixed]


def control_of(spec: StudySpec, arm: str) -> str:
    """The control arm whose pick `arm` takes under `per: control` (the one for its model)."""
    control = spec.control
    return control if isinstance(control, str) else control[model_of(spec, arm)]


def grid_scores(spec: StudySpec, grid: GridStudy) -> dict[str, dict[float, list[float]]]:
    """{scored arm: {value: validation pass@1 per tuning seed}}."""
    return {arm: {value: [grid.score(grid_arm(arm, value), seed) for seed in grid.seeds()]
                  for value in spec.tuning.grid} for arm in scored_arms(spec)}


def fixed_scores(spec: StudySpec, grid: GridStudy) -> dict[str, list[float]]:
    """{fixed arm: validation pass@1 per tuning seed}."""
    return {arm: [grid.score(arm, seed) for seed in grid.seeds()] for arm in spec.tuning.fixed}


def pick(scores: dict[float, list[float]]) -> float:
    """The value with the highest mean over its runs; a value with a missing run (NaN) is not eligible; ties within
    TIE go to the smaller value. ValueError when no value is eligible."""
    eligible = {v: statistics.fmean(xs) for v, xs in scores.items() if xs and all(math.isfinite(x) for x in xs)}
    if not eligible:
        raise ValueError("no grid value has a validation result from every tuning run (all stopped or failed)")
    best = max(eligible.values())
    return min(v for v, m in eligible.items() if m >= best - TIE)


def picks(spec: StudySpec, scores: dict[str, dict[float, list[float]]]) -> dict[str, float]:
    """Per tuned arm its pick; with `per: study` one pick from all last stages' runs pooled, given to every arm; with
    `per: control` every arm its control's pick. A stage another tuned arm starts from takes its last stage's pick
    (`tuning_spec.last_stage`)."""
    if spec.tuning.per == "control":
        chosen = {arm: pick(scores[arm]) for arm in scores}
        return {arm: chosen[control_of(spec, arm)] for arm in spec.arms}
    ends = [arm for arm in scores if last_stage(spec.tuning, spec.arms, arm) == arm]
    if spec.tuning.per == "arm":
        chosen = {arm: pick(scores[arm]) for arm in ends}
    else:
        value = pick({v: [x for arm in ends for x in scores[arm][v]] for v in spec.tuning.grid})
        chosen = dict.fromkeys(ends, value)
    return {arm: chosen[last_stage(spec.tuning, spec.arms, arm)] for arm in scores}


def make_record(spec: StudySpec, chosen: dict[str, float], command: str, commit: str) -> dict[str, Any]:
    """The tuning record (`tuning_record`) of picks made now."""
    from unigrad.report.tuning_record import digest, table_path

    tuning = spec.tuning
    fixed = {"fixed": {arm: setting(arm_config(spec, arm), tuning.key) for arm in tuning.fixed}} if tuning.fixed else {}
    return {"key": tuning.key, "split": tuning.split, "per": tuning.per, "metric": tuning.metric,
            "grid": list(tuning.grid), "seeds": tuning_seeds(tuning.seeds), "steps": tuning.steps or spec.steps,
            "prompts": tuning.prompts, "picks": chosen, "table": str(table_path(spec)), "command": command,
            "commit": commit, "date": datetime.date.today().isoformat(), "digest": digest(spec), **fixed}


def setting(config: dict[str, Any], key: str) -> Any:
    """The value of the dotted `key` the training config runs with (its default when the config leaves it out)."""
    from unigrad.config import validate_config

    node: Any = validate_config(config)
    for part in key.split("."):
        node = getattr(node, part)
    return node


def tune(spec: StudySpec, study_file: Path, out: Path, doc_root: Path, log=print) -> tuple[Path, Path]:
    """Run the grid into `out`, write the table under `doc_root` and the record beside the study file."""
    from unigrad.report.study_page import _commit
    from unigrad.report.tuning_page import write_tuning_table
    from unigrad.report.tuning_record import write_record

    if spec.tuning is None:
        raise ValueError(f"{study_file}: no tuning section; add one (tuning: {{key: optim.lr, grid: [...]}})")
    grid = GridStudy(grid_spec(spec), out, log=log)
    grid.run()
    scores = grid_scores(spec, grid)
    chosen = picks(spec, scores)
    record = make_record(spec, chosen, f"unigrad tune {study_file}", _commit())
    table = write_tuning_table(spec, grid, scores, record, doc_root)
    return table, write_record(study_file, record)
