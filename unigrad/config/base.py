"""What every config section shares: unknown keys refused, no boolean where a number is expected; and the
error every configuration problem is raised as."""

from __future__ import annotations

from types import UnionType as _UnionType
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """`max_steps=true` would otherwise be read as 1: a boolean is refused wherever a number is expected."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, bool) and _numeric(field.annotation):
                    raise ValueError(f"{name}: expected a number, got the boolean {value}")
        return data


def _numeric(annotation: Any) -> bool:
    """int or float (or either with None), and no bool among the choices."""
    import typing

    choices = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _UnionType) else (
        annotation,)
    return bool(set(choices) & {int, float}) and bool not in choices
