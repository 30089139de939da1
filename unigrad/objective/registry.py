"""One registry per part of the objective: name -> function, formula text, label, metric names.

A part's module registers each of its choices once, next to its function:

    @RATIO.register("token", formula=lambda o: "r = π/π_old")
    def _token(logp, old, mask, *, shaping, clamp): ...

Traits name what other code asks of a part: a ratio "uses_old_logprobs" (it needs pi_old, and only then a
stabiliser to clip it against) or "is_self" (SFT's form); a stabiliser "clips" (needs epsilon < 1); a correction
"zeroes_tokens" (it can take tokens out of the loss); an advantage "needs_groups" (a group of one gets 0).

Everything else reads from here: the allowed values of `Objective`'s fields (`Registry.literal`), the dispatch in
each part's module, `Objective.parts()` (the labels), the composed formulas of `unigrad presets` and of the table in
docs/objectives.md, and the metric names a part adds. A new part is one function and one registration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Part:
    name: str
    function: Callable[..., Any]
    formula: Callable[[Any], str]  # the part's formula with the objective's parameters ("" = nothing to say)
    label: Callable[[Any], str]  # a short label with the active parameters, for tables and logs
    metrics: tuple[str, ...] = ()  # metric names the part adds to `compute_policy_loss`'s metrics
    traits: frozenset[str] = frozenset()  # what other code asks of a part (e.g. "zeroes_tokens"), by name


class Registry:
    """The registered choices of one part (e.g. every stabiliser), in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._parts: dict[str, Part] = {}

    def register(self, name: str, *, formula: Callable[[Any], str], label: Callable[[Any], str] | None = None,
                 metrics: tuple[str, ...] = (), traits: tuple[str, ...] = ()) -> Callable:
        if name in self._parts:
            raise ValueError(f"{self.kind} {name!r} is registered twice")

        def add(function: Callable) -> Callable:
            self._parts[name] = Part(name, function, formula, label or (lambda o: name), tuple(metrics),
                                     frozenset(traits))
            return function

        return add

    def __getitem__(self, name: str) -> Part:
        try:
            return self._parts[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._parts)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[Part]:
        return iter(self._parts.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._parts)

    def with_trait(self, trait: str) -> tuple[str, ...]:
        return tuple(p.name for p in self._parts.values() if trait in p.traits)

    def literal(self) -> Any:
        """`Literal[...]` of the registered names, for a pydantic field's type."""
        return Literal[self.names()]  # type: ignore[valid-type]


RATIO = Registry("ratio level")
STABILISER = Registry("stabiliser")
CORRECTION = Registry("behaviour correction")
ADVANTAGE = Registry("advantage estimator")
AGGREGATION = Registry("aggregation")
KL_ESTIMATOR = Registry("KL estimator")
