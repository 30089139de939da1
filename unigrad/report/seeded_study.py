"""`unigrad study FILE.yaml`: a comparison pinned to one file, run over seeds, written up as a docs page.

A study file holds everything the study depends on (nothing is read from another config):

    title: GRPO, GSPO, SAPO and CISPO off-policy
    doc: docs/studies/offpolicy_objectives.md     # the page it writes (hand-written notes below the marker kept)
    question: what the study asks, in a paragraph (top of the page)
    seeds: 3                                       # seeds 0 .. seeds-1 (`--seeds N` overrides)
    steps: 150                                     # fixed rollout steps per run (never wall-clock)
    parallel: 2                                    # runs at once, one torch thread each
    eval: {prompts: 200, splits: [validation, test]}
    baseline: grpo                                 # the arm the others are compared with, seed by seed; or per
                                                   # model: {unigrad-tiny: grpo, unigrad-tiny-moe: grpo-moe}
    train: {...}                                   # the whole training config every run starts from
    arms: {grpo: {objective: grpo}, gspo: {objective: gspo}, ...}   # per arm: overrides of `train`, and two
                                                   # study keys: steps (this arm's budget) and from: ARM (start
                                                   # from that arm's final weights, same seed: a staged method)
    columns: {clip fraction: mean(rl/clip/region_fraction), grad-norm spikes: alarms(grad_spike)}
    curves: [reward/mean, grad_norm]               # plotted per arm, mean over seeds
    lr_note: chosen in a one-seed pilot on training reward (seed 1000)   # when not tuned: how the rate was chosen
    tuning: {key: optim.lr, grid: [3.0e-5, 1.0e-4, 3.0e-4], per: arm}   # chosen on validation first: `unigrad
                                                   # tune FILE` (`tuning_spec`, `tuning`); the study then runs with
                                                   # the picks recorded in tuned/NAME.yaml beside the file
    control: grpo                                  # collapse: a run's reward (or collapse_metric) below half this arm's
    boundary: {dial: rollout.router_noise, lines: {GRPO: [grpo, grpo_s1]}}   # where along a mismatch dial each
                                                   # method fails, against the measured KL (`boundary`)
    retired: "2026-12-08: its rate degraded its control; replaced by ..."   # not to be run or tuned again: both
                                                   # commands refuse it (--page-only still rewrites its page)

Each (arm, seed) trains with the real CLI (`unigrad train`) into OUT/ARM/seedK, resuming a run a cut-off study
left behind and skipping a finished one, then is evaluated with `unigrad eval --per-prompt` on every split in
`eval.splits` (cached in the run directory). Each model an arm starts from is evaluated once the same way. The page
reports test numbers (validation numbers are there to choose on): the mean over seeds with a 95% t interval,
the change against the start checkpoint and the difference against the baseline arm, each with its interval over
seeds and its paired per-prompt standard error (`unigrad.report.seeds`). A run that stops itself (exit code 3:
an alarm in `monitors.stop_on`, non-finite steps) is recorded as stopped and counted as a collapse. A run collapsed
when its training reward (10-step trailing mean from step 1) ends below half of the `control` arm's at the same step,
or, with `collapse_metric: test pass@1`, when its test pass@1 is below half of the control's mean over seeds; a study
without a declared `control` gets no collapse verdict. Each comparison is also tested with Holm's adjustment
over all the comparisons the study makes (`study_verdicts`).

Column statistics (`stat(metric)`): mean (over the run's steps), median (for heavy-tailed ones such as
ratios), sum (e.g. of `flops/learner`: the run's compute), max, min, last (mean of the last tenth),
growth (mean of the last third / mean of the first third), alarms (how many steps fired `alarm/NAME`; give the
alarm's name), count (steps where the metric is > 0). Each is computed per run, then summarised over seeds.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from unigrad.report.boundary import BoundarySpec
from unigrad.report.run_report import read_metrics
from unigrad.report.seeds import collapsed, series
from unigrad.report.study import run_training
from unigrad.report.tuning_spec import TUNING_SEED_BASE, TuningSpec

HELD_OUT = "test pass@1"  # collapse_metric: judge collapse on held-out accuracy, not on a training curve
STATS = ("mean", "median", "sum", "max", "min", "last", "growth", "alarms", "count")
COLUMN = re.compile(r"^(\w+)\(([^()]+)\)$")


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: int = Field(200, ge=2, description="held-out prompts per task")
    splits: list[Literal["validation", "test"]] = Field(["test"], min_length=1)


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    doc: str = Field(description="the page the study writes, relative to the repository root")
    question: str = ""
    seeds: int = Field(3, ge=1, lt=TUNING_SEED_BASE, description="seeds 0 .. seeds-1 (tuning runs use 1000 ..)")
    steps: int = Field(ge=1, description="rollout steps per run (train.max_steps)")
    parallel: int = Field(1, ge=1, le=8)
    eval: EvalSpec = EvalSpec()
    baseline: str | dict[str, str] | None = Field(
        None, description="the arm every other is compared with, or per model name the arm its arms are compared with")
    train: dict[str, Any]
    arms: dict[str, dict[str, Any]] = Field(min_length=1)
    columns: dict[str, str] = {}
    comparisons: list[list[str]] = Field(
        [], description="further seed-paired differences to report, each [arm, other arm]: arm minus other")
    curves: list[str] = []
    collapse_metric: str = Field(
        "reward/mean", description="the per-step metric the collapse rule reads (10-step trailing mean against the "
        f"control's), or {HELD_OUT!r}: a run collapsed when its held-out test pass@1 is below half of the control's "
        "mean (for studies whose arms perturb the sampler, so their training reward is low before any update)")
    tuning: TuningSpec | None = Field(None, description="a value chosen on the validation split before the study "
                                      "runs (`unigrad tune`; `tuning_spec`)")
    _source: Path | None = PrivateAttr(None)  # the file it was loaded from (`load_study`), for the page's git record
    _tuned: dict[str, Any] | None = PrivateAttr(None)  # the tuning record applied to the arms (`tuning_record`)
    control: str | dict[str, str] | None = Field(
        None, description="the arm a run's collapse is judged against (its `collapse_metric` ending below half the "
        "control's), or per model name; without one the page gives no collapse verdict")
    lr_note: str = Field("", description="how the file's learning rate was chosen when it is not tuned (the page "
                         "states it instead of assuming the inherited rate)")
    boundary: BoundarySpec | None = Field(None, description="where along a mismatch dial each method fails, against "
                                          "the measured KL (`boundary`)")
    retired: str = Field("", description="when and why the study was retired: `unigrad study` and `unigrad tune` "
                         "refuse it (its page is kept as the record of its runs; --page-only still rewrites it), and "
                         "the page says so under its title")

    @field_validator("train")
    @classmethod
    def _no_budget_in_train(cls, train: dict[str, Any]) -> dict[str, Any]:
        for key in ("max_steps", "max_minutes", "seed", "output_dir"):
            if key in train:
                raise ValueError(f"train.{key}: set by the study (steps, seeds, its output directory); leave it out")
        return train

    @field_validator("columns")
    @classmethod
    def _columns(cls, columns: dict[str, str]) -> dict[str, str]:
        for label, text in columns.items():
            m = COLUMN.match(text.strip())
            if m is None or m.group(1) not in STATS:
                raise ValueError(f"column {label!r}: expected stat(metric) with stat one of {STATS}, got {text!r}")
        return columns

    @model_validator(mode="after")
    def _baseline_is_an_arm(self) -> StudySpec:
        for key, value in (("baseline", self.baseline), ("control", self.control)):
            for base in [value] if isinstance(value, str) else list((value or {}).values()):
                if base not in self.arms:
                    raise ValueError(f"{key} {base!r} is not an arm; arms: {', '.join(self.arms)}")
        for pair in self.comparisons:
            if len(pair) != 2:
                raise ValueError(f"comparison {pair}: expected two arms, [arm, other arm]")
            for arm in pair:
                if arm not in self.arms:
                    raise ValueError(f"comparison {list(pair)}: {arm!r} is not an arm; arms: {', '.join(self.arms)}")
            if pair[0] == pair[1]:
                raise ValueError(f"comparison {list(pair)}: an arm compared with itself")
        for arm, overrides in self.arms.items():
            if not re.fullmatch(r"[\w.+-]+", arm):
                raise ValueError(f"arm name {arm!r}: use letters, digits and _ . + - (it names a directory)")
            steps = overrides.get("steps")
            if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
                raise ValueError(f"arm {arm!r}: steps must be a positive integer, got {steps!r}")
            chain = [arm]
            while (parent := self.arms[chain[-1]].get("from")) is not None:
                if parent not in self.arms:
                    raise ValueError(f"arm {chain[-1]!r}: from {parent!r} is not an arm; arms: {', '.join(self.arms)}")
                if parent in chain:
                    raise ValueError(f"arms {' -> '.join([*chain, parent])}: a cycle of from")
                chain.append(parent)
        return self

    @model_validator(mode="after")
    def _held_out_collapse_is_evaluated(self) -> StudySpec:
        if self.collapse_metric == HELD_OUT and "test" not in self.eval.splits:
            raise ValueError(f"collapse_metric {HELD_OUT!r} reads each run's test evaluation: add test to eval.splits")
        return self

    @model_validator(mode="after")
    def _tuning_fits(self) -> StudySpec:
        from unigrad.report.tuning_spec import check_tuning_fits

        if self.tuning is not None:
            check_tuning_fits(self.tuning, self.arms)
            if self.tuning.per == "control":
                controls = [self.control] if isinstance(self.control, str) else list((self.control or {}).values())
                if not controls:
                    raise ValueError("tuning.per: control needs the study's control arm (control: ARM)")
                if isinstance(self.control, dict):
                    models = {model_of(self, a) for a in self.arms}
                    if missing := sorted(models - set(self.control)):
                        raise ValueError(f"tuning.per: control: no control arm for model(s) {', '.join(missing)}; "
                                         "every arm takes its model's control's pick")
                if self.tuning.fixed or any("from" in self.arms[c] for c in controls):
                    raise ValueError("tuning.per: control tunes the control arm alone: no fixed arms, and a control "
                                     "that starts from a model, not `from` another arm")
        return self

    @model_validator(mode="after")
    def _boundary_fits(self) -> StudySpec:
        from unigrad.report.boundary import check_boundary

        if self.boundary is not None:
            check_boundary(self, self.boundary)
        return self


def load_study(path: str | Path) -> StudySpec:
    """The study file, checked: valid YAML, a valid study, and every arm's config a valid training config (else
    ValueError naming the file and the line or key)."""
    from pydantic import ValidationError

    from unigrad.report.study_checks import check_arm_configs, compact, read_mapping

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} not found")
    try:
        spec = StudySpec.model_validate(read_mapping(path))
    except ValidationError as err:
        raise ValueError(compact(err, path)) from None
    check_arm_configs(spec, path)
    spec._source = path
    return spec


def flat_overrides(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """{"optim": {"lr": 1e-4}, "objective": "gspo"} -> ["optim.lr=0.0001", "objective=gspo"] (YAML flow for lists)."""
    out = []
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flat_overrides(value, f"{name}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            out.append(f"{name}={text.removesuffix('...').strip()}")
    return out


def _merged(train: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(train))
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _merged(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


STUDY_KEYS = ("from", "steps")  # arm keys the study reads itself; the rest override `train`


def arm_config(spec: StudySpec, arm: str) -> dict[str, Any]:
    """The training config of one arm: `train` with the arm's overrides (dotted keys allowed) and its budget (the
    arm's `steps`, else the study's). An arm `from` another starts from that arm's final weights of the same seed;
    `model.name` then names the first arm's model here and is set to those weights when the arm runs."""
    overrides = {k: v for k, v in spec.arms[arm].items() if k not in STUDY_KEYS}
    config = _merged(spec.train, overrides)
    root = root_arm(spec, arm)
    if root != arm:
        config = _merged(config, {"model.name": _merged(spec.train, spec.arms[root]).get("model", {}).get(
            "name", "unigrad-tiny")})
    return {**config, "max_steps": spec.arms[arm].get("steps", spec.steps)}


def model_of(spec: StudySpec, arm: str) -> str:
    """The model `arm`'s chain of `from` starts from (its config's model.name)."""
    return str(arm_config(spec, arm).get("model", {}).get("name", "unigrad-tiny"))


def chain(spec: StudySpec, arm: str) -> list[str]:
    """`arm`, the arm it starts `from`, that arm's, ... (just `arm` when it starts from a model)."""
    out = [arm]
    while (parent := spec.arms[out[-1]].get("from")) is not None:
        out.append(parent)
    return out


def root_arm(spec: StudySpec, arm: str) -> str:
    """The first arm of `arm`'s chain of `from` (itself when it has none)."""
    return chain(spec, arm)[-1]


def depth(spec: StudySpec, arm: str) -> int:
    """How many `from` links lead to `arm` (0: it starts from a model)."""
    return len(chain(spec, arm)) - 1


class Study:
    """One study file run into `out`: train, evaluate, summarise (the page is written by `study_page`)."""

    def __init__(self, spec: StudySpec, out: str | Path, *, seeds: int | None = None, steps: int | None = None,
                 parallel: int | None = None, log=print, source: str | Path | None = None):
        source = source if source is not None else spec._source
        given = {k: v for k, v in (("steps", steps), ("seeds", seeds), ("parallel", parallel)) if v is not None}
        if given:  # checked as the file's own values are (seeds >= 1, ...)
            tuned = spec._tuned
            spec = StudySpec.model_validate({**spec.model_dump(), **given})
            spec._tuned = tuned
        self.spec, self.out, self.log = spec, Path(out), log
        self.source = Path(source) if source is not None else None  # the study file, for the page's git record

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / arm / f"seed{seed}"

    def seeds(self) -> list[int]:
        """The seeds every arm runs with: 0 .. seeds-1."""
        return list(range(self.spec.seeds))

    def jobs(self) -> list[list[tuple[str, int]]]:
        """The (arm, seed) runs in waves: an arm trained `from` another runs in a later wave than that arm."""
        levels = sorted({depth(self.spec, arm) for arm in self.spec.arms})
        return [[(arm, seed) for seed in self.seeds() for arm in self.spec.arms
                 if depth(self.spec, arm) == level] for level in levels]

    def run_config(self, arm: str, seed: int) -> dict[str, Any]:
        """The training config of run (arm, seed), as `_one` trains it (a staged arm: from its parent's weights)."""
        config = {**arm_config(self.spec, arm), "seed": seed}
        parent = self.spec.arms[arm].get("from")
        return config if parent is None else _merged(config, {"model.name": str(self.run_dir(parent, seed) / "final")})

    def run(self) -> None:
        """Train and evaluate every (arm, seed) not done yet, `parallel` at a time; then the start checkpoints.
        Runs left by a study with other settings are refused, never reused (`study_checks`)."""
        from unigrad.report.study_checks import refuse_other_settings

        refuse_other_settings(self)
        self.out.mkdir(parents=True, exist_ok=True)
        for arm in self.spec.arms:  # the pinned config of each arm, next to its runs
            (self.out / arm).mkdir(exist_ok=True)
            (self.out / arm / "config.yaml").write_text(yaml.safe_dump(arm_config(self.spec, arm), sort_keys=False))
        waves = self.jobs()
        total, done = sum(len(w) for w in waves), 0
        started = time.time()
        with ThreadPoolExecutor(self.spec.parallel) as pool:
            for wave in waves:
                for _ in pool.map(lambda job: self._one(*job), wave):
                    done += 1
                    self.log(f"study: {done}/{total} runs done ({(time.time() - started) / 60:.1f} min)")
        for model in sorted({self.model_of(arm) for arm in self.spec.arms}):
            for split in self.spec.eval.splits:
                self._evaluate(model, self.start_dir(model), split, self.spec.arms[self._arm_of_model(model)])

    def model_of(self, arm: str) -> str:
        """The model the arm's chain starts from (for an arm `from` another: the first arm's)."""
        return model_of(self.spec, arm)

    def baseline_of(self, arm: str) -> str | None:
        """The arm `arm` is compared with (None: no baseline for its model)."""
        base = self.spec.baseline
        return base.get(self.model_of(arm)) if isinstance(base, dict) else base

    def _arm_of_model(self, model: str) -> str:
        return next(a for a in self.spec.arms if self.model_of(a) == model)

    def start_dir(self, model: str) -> Path:
        return self.out / "start" / re.sub(r"[^\w.+-]", "_", model)

    def status(self, arm: str, seed: int) -> dict[str, Any]:
        path = self.run_dir(arm, seed) / "study_status.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _one(self, arm: str, seed: int) -> None:
        run_dir = self.run_dir(arm, seed)
        if self.status(arm, seed).get("stopped"):
            return
        config = self.out / arm / "config.yaml"
        threads = ["threads=1"] if self.spec.parallel > 1 else []
        parent = self.spec.arms[arm].get("from")
        start = []
        if parent is not None:
            weights = self.run_dir(parent, seed) / "final"
            if self.status(parent, seed).get("stopped"):  # the method's first stage stopped: so did the method
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "study_status.json").write_text(json.dumps({"stopped": f"{parent} stopped"}))
                return
            if not weights.is_dir():
                raise RuntimeError(f"study: {arm} seed {seed} starts from {parent}'s final weights, and {weights} "
                                   f"is missing ({parent} seed {seed} stopped early or failed)")
            start = [f"model.name={weights}"]
        try:
            run_training(run_dir, config, [f"seed={seed}", *threads, *start], report=False,
                         log=Path(f"{run_dir}.log") if self.spec.parallel > 1 else None)
        except subprocess.CalledProcessError as err:
            if err.returncode != 3:  # 3: the run stopped itself (an alarm, non-finite steps); anything else is a bug
                where = f"{run_dir}.log" if self.spec.parallel > 1 else "its output above"
                raise RuntimeError(f"study: {arm} seed {seed} failed (exit {err.returncode}); see {where} or rerun "
                                   f"it alone: unigrad train {config} seed={seed} --output-dir {run_dir} "
                                   "--resume") from err
            (run_dir / "study_status.json").write_text(json.dumps({"stopped": f"exit {err.returncode}"}))
            return
        for split in self.spec.eval.splits:
            self._evaluate(str(run_dir), run_dir, split, None)

    def _evaluate(self, model: str, where: Path, split: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """`unigrad eval MODEL --split SPLIT --per-prompt --json`, cached in where/study_eval_SPLIT.json. A run
        directory is evaluated with its own tasks and budget; a start model with the study's."""
        path, record = where / f"study_eval_{split}.json", where / f"study_eval_{split}.args.json"
        cmd = [sys.executable, "-m", "unigrad.cli", "eval", model, "--split", split, "--prompts",
               str(self.spec.eval.prompts), "--json", "--per-prompt"]
        if overrides is not None:  # a start checkpoint: the tasks and budget of the arms that start from it
            cfg = _merged(self.spec.train, overrides)
            cmd += ["--tasks", *cfg.get("tasks", ["arithmetic", "countdown", "word_problems", "code", "table_qa"]),
                    "--max-new-tokens", str(cfg.get("rollout", {}).get("max_new_tokens", 40))]
        # a cached evaluation counts when it was run with these arguments (older caches recorded none)
        if not path.is_file() or (record.is_file() and json.loads(record.read_text()) != cmd[3:]):
            env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if self.spec.parallel > 1 else {})}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"study: evaluating {model} failed: {res.stderr.strip()[-2000:]}")
            where.mkdir(parents=True, exist_ok=True)
            path.write_text(res.stdout.strip().splitlines()[-1])
            record.write_text(json.dumps(cmd[3:]))
        return json.loads(path.read_text())

    # --- reading the results -------------------------------------------------------------------------------

    def evaluation(self, arm: str, seed: int, split: str) -> dict[str, Any] | None:
        path = self.run_dir(arm, seed) / f"study_eval_{split}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def start_evaluation(self, arm: str, split: str) -> dict[str, Any]:
        return json.loads((self.start_dir(self.model_of(arm)) / f"study_eval_{split}.json").read_text())

    def metrics(self, arm: str, seed: int) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir(arm, seed))

    def control_of(self, arm: str) -> str | None:
        """The arm `arm`'s collapse is judged against (None: the study declares no control for its model)."""
        control = self.spec.control
        return control.get(self.model_of(arm)) if isinstance(control, dict) else control

    def is_collapsed(self, arm: str, seed: int) -> bool | None:
        """Whether run (arm, seed) collapsed against the control arm (`seeds.collapsed`), or stopped itself; None
        for the control arm itself and for arms without a declared control (no verdict)."""
        control = self.control_of(arm)
        if control is None or control == arm:
            return None
        if self.status(arm, seed).get("stopped"):
            return True
        key = self.spec.collapse_metric
        if key == HELD_OUT:
            from unigrad.report.boundary import accuracy_collapses

            def score(a: str, s: int) -> float:
                result = self.evaluation(a, s, "test")
                return float(result["mean"]["pass@1"]) if result is not None else math.nan

            control_scores = [x for s in self.seeds() if math.isfinite(x := score(control, s))]
            own = score(arm, seed)
            if not control_scores or not math.isfinite(own):  # nothing to judge on: no verdict, not "held up"
                return None
            return accuracy_collapses([own], control_scores, [False])[0]
        runs = [series(self.metrics(control, s), key) for s in range(self.spec.seeds)
                if (self.run_dir(control, s) / "metrics.jsonl").is_file()]
        return collapsed(series(self.metrics(arm, seed), key), runs) if runs else None

    def train_minutes(self, arm: str, seed: int, chain: bool = True) -> float:
        """Training time of the run (`chain`: and of the runs it starts `from`): the sum of their steps' `time/step`
        (model loading and evaluation excluded)."""
        own = sum(x for x in series(self.metrics(arm, seed), "time/step") if math.isfinite(x)) / 60
        parent = self.spec.arms[arm].get("from")
        return own + (self.train_minutes(parent, seed) if chain and parent is not None else 0.0)

    def column(self, arm: str, seed: int, text: str) -> float:
        stat, key = COLUMN.match(text.strip()).groups()
        rows = self.metrics(arm, seed)
        if stat == "alarms":
            return float(sum(1 for r in rows if r.get(f"alarm/{key}")))
        values = [x for x in series(rows, key) if math.isfinite(x)]
        if not values:
            return float("nan")
        if stat == "count":
            return float(sum(1 for x in values if x > 0))
        if stat == "last":
            return statistics.fmean(values[-max(1, len(values) // 10):])
        if stat == "growth":
            third = max(1, len(values) // 3)
            first = statistics.fmean(values[:third])
            return statistics.fmean(values[-third:]) / first if first else float("nan")
        return {"mean": statistics.fmean, "median": statistics.median, "sum": math.fsum, "max": max, "min": min}[stat](
            values)
