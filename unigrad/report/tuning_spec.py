"""The `tuning:` section of a study file: which value is chosen on the validation split before the study runs, from
which grid, per arm or once for the whole study, with how many seeds and steps (`unigrad tune FILE` runs it).

    tuning: {key: optim.lr, grid: [3.0e-5, 1.0e-4, 3.0e-4], per: arm, seeds: 2, steps: 60, prompts: 100}

Seed rule: the study's own runs use seeds 0 .. seeds-1, which must stay below TUNING_SEED_BASE (1000); tuning runs
use TUNING_SEED_BASE, TUNING_SEED_BASE + 1, ... So no tuning run shares a seed (its sampling, its initial prompt
order) with a run whose test numbers are reported.

Split rule: only the validation split is evaluated; a tuning section naming the test split is refused, since the
study's page reports test numbers and a value chosen on them would make those numbers optimistic.
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
    per: Literal["arm", "study"] = Field(
        "arm", description="arm: each arm gets its own pick (objectives compared at their own best value); study: "
        "one pick for every arm (the best mean over all arms' runs)")
    seeds: int = Field(2, ge=1, le=50, description="tuning seeds per (arm, value): 1000, 1001, ...")
    steps: int | None = Field(None, ge=1, description="rollout steps per tuning run (default: the study's)")
    prompts: int = Field(100, ge=2, description="validation prompts per task")
    split: str = Field("validation", description="the split the pick is made on: validation only")
    metric: Literal["mean pass@1"] = "mean pass@1"

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
    itself (which value would it run?), or an arm trained `from` another (staged arms are not tuned yet)."""
    for arm, overrides in arms.items():
        if sets_key(overrides, tuning.key):
            raise ValueError(f"tuning.key {tuning.key}: arm {arm!r} sets it itself; the tuning sets it per arm "
                             "(drop it from the arm)")
        if "from" in overrides:
            raise ValueError(f"tuning: arm {arm!r} starts from another arm's weights; tuning staged arms is not "
                             "supported (tune a study without `from`)")


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
