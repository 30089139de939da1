"""The `tuning:` section of a study file: which value is chosen on the validation split before the study runs, from
which grid, per arm or once for the whole study, with how many seeds and steps (`unigrad tune FILE` runs it).

    tuning: {key: optim.lr, grid: [3.0e-5, 1.0e-4, 3.0e-4], per: arm, seeds: 2, steps: 60, prompts: 100}

Seed rule: the study's own runs use seeds 0 .. seeds-1, which must stay below TUNING_SEED_BASE (1000); tuning runs
use TUNING_SEED_BASE, TUNING_SEED_BASE + 1, ... So no tuning run shares a seed (its sampling, its initial prompt
order) with a run whose test numbers are reported.

Split rule: only the validation split is evaluated; a tuning section naming the test split is refused, since the
study's page reports test numbers and a value chosen on them would make those numbers optimistic.

`per: control` trains only the study's `control` arm (per model, when the control is given per model) on the grid,
and every arm takes its control's pick: for studies that ask where methods fail under a perturbation, at one rate
at which the unperturbed run does best on validation. It needs a declared control and takes no `fixed` arms.

Staged arms (an arm trained `from` another's final weights):
- an arm listed in `fixed` is not tuned: it trains once per tuning seed at the file's value (a shared start that
  the methods train from, chosen before the study; its own `steps` kept);
- a tuned arm `from` a fixed arm trains from that arm's run of the same tuning seed;
- a tuned arm `from` a tuned arm is a stage of one method (SFT for 100 steps, then GRPO from it): the grid runs
  the whole chain at each value, the pick is made on the last stage's validation score, and every stage of the
  chain gets that pick. A tuned arm may therefore have at most one tuned arm starting from it, and `steps` is left
  out of the tuning section (each stage keeps its own budget).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TUNING_SEED_BASE = 1000


def tuning_seeds(n: int) -> list[int]:
    """The seeds of a study's tuning runs: TUNING_SEED_BASE .. TUNING_SEED_BASE + n - 1 (never a study seed)."""
    return [TUNING_SEED_BASE + i for i in range(n)]


class TuningSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field("optim.lr", description="the dotted training-config key tuned (an arm may not set it itself)")
    grid: list[float] = Field(min_length=2, description="the values tried, at least two, distinct")
    per: Literal["arm", "study", "control"] = Field(
        "arm", description="arm: each arm gets its own pick (objectives compared at their own best value); study: "
        "one pick for every arm (the best mean over all arms' runs); control: only the study's control arm is "
        "trained on the grid, and its pick goes to every arm (methods compared at the rate best for the unperturbed "
        "run)")
    seeds: int = Field(2, ge=1, le=50, description="tuning seeds per (arm, value): 1000, 1001, ...")
    steps: int | None = Field(None, ge=1, description="rollout steps per tuning run (default: the study's)")
    prompts: int = Field(100, ge=2, description="validation prompts per task")
    split: str = Field("validation", description="the split the pick is made on: validation only")
    metric: Literal["mean pass@1"] = "mean pass@1"
    fixed: list[str] = Field([], description="arms not tuned: trained at the file's value once per tuning seed (a "
                             "shared start that staged arms train `from`)")

    @field_validator("split")
    @classmethod
    def _validation_only(cls, split: str) -> str:
        if split == "test":
            raise ValueError("tuning on the test split is refused: the study reports test numbers, and a value "
                             "chosen on them makes those numbers optimistic; use split: validation")
        if split != "validation":
            raise ValueError(f"unknown split {split!r}; tuning uses the validation split")
        return split

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: list[float]) -> list[float]:
        if any(not math.isfinite(x) for x in grid):
            raise ValueError(f"grid {grid}: every value must be a finite number")
        if len(set(grid)) != len(grid):
            raise ValueError(f"grid {grid}: a value given twice")
        return sorted(grid)

    @field_validator("key")
    @classmethod
    def _key(cls, key: str) -> str:
        if key.split(".")[0] in ("max_steps", "max_minutes", "seed", "output_dir", "model", "tasks"):
            raise ValueError(f"key {key!r}: the study sets that (or it changes what is evaluated); tune a "
                             "training setting such as optim.lr")
        return key

    @model_validator(mode="after")
    def _positive_rate(self) -> TuningSpec:
        if self.key.split(".")[-1] == "lr" and any(x <= 0 for x in self.grid):
            raise ValueError(f"grid {self.grid}: a learning rate must be positive")
        return self


def check_tuning_fits(tuning: TuningSpec, arms: dict[str, dict]) -> None:
    """ValueError when the study's arms leave the tuning nothing well-defined to do: an arm that sets the tuned key
    itself (which value would it run?), a `fixed` arm that is not an arm or starts from a tuned one, a tuned arm two
    tuned arms start from (whose pick would it take?), or no tuned arm at all."""
    fixed = set(tuning.fixed)
    for arm in tuning.fixed:
        if arm not in arms:
            raise ValueError(f"tuning.fixed: {arm!r} is not an arm; arms: {', '.join(arms)}")
        parent = arms[arm].get("from")
        if parent is not None and parent not in fixed:
            raise ValueError(f"tuning.fixed: {arm!r} starts from {parent!r}, which is tuned; a fixed arm starts from "
                             "a model or from another fixed arm")
    if not set(arms) - fixed:
        raise ValueError("tuning: every arm is fixed; nothing is tuned")
    for arm, overrides in arms.items():
        if arm not in fixed and sets_key(overrides, tuning.key):
            raise ValueError(f"tuning.key {tuning.key}: arm {arm!r} sets it itself; the tuning sets it per arm "
                             "(drop it from the arm" + (")" if tuning.per == "control" else
                                                         ", or list the arm in tuning.fixed)"))
        if tuning.per == "control":  # only the control is trained on the grid: no stages to tune
            continue
        stages = [a for a in successors(arms, arm) if a not in fixed]
        if arm not in fixed and stages and tuning.steps is not None:
            raise ValueError(f"tuning.steps with tuned stages ({arm} then {stages[0]}): every stage would train "
                             "tuning.steps, changing the method's shape; leave tuning.steps out (each arm keeps its "
                             "own budget)")
        if arm not in fixed and len(stages) > 1:
            raise ValueError(f"tuning: tuned arm {arm!r} is the start of {' and '.join(stages)}; a tuned stage "
                             "takes its successor's pick, so it may have one (list it in tuning.fixed to train it "
                             "once at the file's value)")


def successors(arms: dict[str, dict], arm: str) -> list[str]:
    """The arms trained `from` `arm`."""
    return [a for a, overrides in arms.items() if overrides.get("from") == arm]


def last_stage(tuning: TuningSpec, arms: dict[str, dict], arm: str) -> str:
    """The tuned arm whose validation score picks `arm`'s value: `arm` itself, or, when a tuned arm starts from it,
    that arm's last stage. With `per: control` there are no stages (only the control is trained on the grid)."""
    if tuning.per == "control":
        return arm
    nxt = [a for a in successors(arms, arm) if a not in tuning.fixed]
    return last_stage(tuning, arms, nxt[0]) if nxt else arm


def sets_key(overrides: dict, key: str) -> bool:
    """Whether `overrides` sets the dotted `key`, written dotted ({"optim.lr": x}), nested ({"optim": {"lr": x}}) or
    partly both."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        node = overrides.get(".".join(parts[:i]))
        for part in parts[i:]:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return True
    return False
