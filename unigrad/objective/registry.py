"""One registry per part of the objective: name -> function, its typed arguments, texts, metrics and traits.

A part's module registers each of its choices once, next to its function; every choice of a kind has one
signature, `function(inputs, args)`, where `inputs` is the kind's typed input object and `args` the part's own
typed arguments, built from the `Objective` by the registration's `args`:

    @STABILISER.register("clip", args=lambda o: ClipRange(o.epsilon, ...), metrics={"clip/region_fraction": "..."},
                         text=PartText(lambda o: "ℓ = −min(r·A, clip(r, ...)·A)", summary="PPO's clipped surrogate"))
    def _clip(x: StabiliserInput, a: ClipRange) -> Stabilised: ...

Traits name what other code asks of a part, so no code compares part names: a ratio "uses_old_logprobs" (it needs
pi_old, and only then a stabiliser to clip it against) or "is_self" (SFT's form); a stabiliser "clips" (needs
epsilon < 1) or "needs_old_logprobs" (there must be a pi_old to stabilise against); a correction "reads_infer_logprobs"
(needs the rollout engine's log-probs) or "zeroes_tokens" (it can take tokens out of the loss); an advantage
"needs_groups" (a group of one gets 0) or "is_supervised" (A = 1 on demonstrations); an aggregation
"per_token_normaliser" (it divides by a token count).

Everything else reads from here: the allowed values and the descriptions of `Objective`'s fields, the dispatch in
each part's module, `Objective.parts()` (the labels), the composed formulas of `unigrad presets`, the parts tables
and the metrics table of docs/objectives.md, and the metric names and meanings a part adds. A new part is one
function and one registration (and an `Objective` field if it takes a new parameter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal


def no_args(objective: Any) -> None:
    """The arguments of a part that takes none from the objective."""
    return None


@dataclass(frozen=True)
class PartText:
    """How a part is written for people: its formula with the objective's parameters (`formula(objective)`, "" =
    nothing to say), a one-line `summary` (the Objective field's description and the docs), a short `label` with the
    active parameters for tables and logs (`label(objective)`; None: the part's name), and its row's cells in
    docs/objectives.md (`doc`, one per column of the registry)."""

    formula: Callable[[Any], str]
    summary: str = ""
    label: Callable[[Any], str] | None = None
    doc: tuple[str, ...] = ()


@dataclass(frozen=True)
class Part:
    name: str
    function: Callable[..., Any]  # function(inputs, args): the kind's typed inputs, the part's own arguments
    formula: Callable[[Any], str]  # the part's formula with the objective's parameters ("" = nothing to say)
    label: Callable[[Any], str]  # a short label with the active parameters, for tables and logs
    summary: str = ""  # what the part is, in one line: the Objective field's description and the docs
    doc: tuple[str, ...] = ()  # its row's cells in docs/objectives.md, one per column of the registry
    args: Callable[[Any], Any] = no_args  # the part's typed arguments, read from an `Objective`
    metrics: Mapping[str, str] = field(default_factory=dict)  # metric name -> meaning, added to the loss's metrics
    traits: frozenset[str] = frozenset()  # what other code asks of a part (e.g. "zeroes_tokens"), by name


class Registry:
    """The registered choices of one part (e.g. every stabiliser), in registration order.

    `field` is the `Objective` field that names the choice, `purpose` opens that field's description, `columns`
    head the part-specific columns of its table in docs/objectives.md (filled by each part's `doc`)."""

    def __init__(self, kind: str, *, field: str = "", purpose: str = "", columns: tuple[str, ...] = ()) -> None:
        self.kind, self.field, self.purpose, self.columns = kind, field, purpose or kind, columns
        self._parts: dict[str, Part] = {}
        self._listeners: list[Callable[[], None]] = []

    def register(self, name: str, *, text: PartText, args: Callable[[Any], Any] = no_args,
                 metrics: Mapping[str, str] | None = None, traits: tuple[str, ...] = ()) -> Callable:
        """A decorator registering its function as the choice `name`: `text` how it is written, `args` its typed
        arguments read from an `Objective`, `metrics` the metric names it adds and their meanings, `traits` what
        other code asks of it."""
        if name in self._parts:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        doc = tuple(text.doc)
        if doc and len(doc) != len(self.columns):
            raise ValueError(f"{self.kind} {name!r}: doc has {len(doc)} cells, the table has {len(self.columns)}")

        def add(function: Callable) -> Callable:
            self._parts[name] = Part(name, function, text.formula, text.label or (lambda o: name), text.summary, doc,
                                     args, MappingProxyType(dict(metrics or {})), frozenset(traits))
            self._changed()
            return function

        return add

    def unregister(self, name: str) -> None:
        """Remove a registered choice (e.g. a part a test added)."""
        self[name]  # an unknown name is an error naming the valid ones
        del self._parts[name]
        self._changed()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every registration or removal (e.g. to refresh the `Objective` field)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def __getitem__(self, name: str) -> Part:
        try:
            return self._parts[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._parts)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[Part]:
        return iter(list(self._parts.values()))

    def names(self) -> tuple[str, ...]:
        return tuple(self._parts)

    def has(self, name: str, trait: str) -> bool:
        """Whether the registered choice `name` has `trait`."""
        return trait in self[name].traits

    def with_trait(self, trait: str) -> tuple[str, ...]:
        return tuple(p.name for p in self._parts.values() if trait in p.traits)

    def literal(self) -> Any:
        """`Literal[...]` of the registered names, for a pydantic field's type."""
        return Literal[self.names()]  # type: ignore[valid-type]

    def field_description(self) -> str:
        """The description of the `Objective` field that names this part: its purpose and every choice."""
        return f"{self.purpose}: " + "; ".join(f"{p.name}: {p.summary}" for p in self._parts.values())

    def metric_descriptions(self) -> dict[str, str]:
        """Every metric name the registered choices add, with its meaning (first registration wins)."""
        out: dict[str, str] = {}
        for part in self._parts.values():
            for name, meaning in part.metrics.items():
                out.setdefault(name, meaning)
        return out


RATIO = Registry("ratio level", field="ratio", purpose="the reference denominator, which ratio multiplies the "
                 "advantage", columns=("value of r", "gradient", "used by"))
STABILISER = Registry("stabiliser", field="stabiliser", purpose="the stabilisation mask, how ratio and advantage "
                      "become a per-token loss", columns=("per-token loss ℓ", "defaults"))
CORRECTION = Registry("behaviour correction", field="correction", purpose="the behaviour correction against the "
                      "rollout engine, a detached weight of each token's policy term", columns=("weight", "defaults"))
ADVANTAGE = Registry("advantage estimator", field="advantage", purpose="the advantage estimator used by the trainer",
                     columns=("A_i", "source"))
AGGREGATION = Registry("aggregation", field="aggregation", purpose="how per-token losses become a scalar",
                       columns=("loss", "source"))
KL_ESTIMATOR = Registry("KL estimator", field="kl_estimator", purpose="Schulman's estimator of the per-token KL "
                        "to the reference, with d = ref − logp", columns=("KL_t",))

REGISTRIES: tuple[Registry, ...] = (RATIO, STABILISER, CORRECTION, ADVANTAGE, AGGREGATION, KL_ESTIMATOR)
