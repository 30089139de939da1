"""Scoring a batch so that one completion cannot fail the others: what the trainer and `unigrad eval` call.

A verifier scores a batch at once (so that sandboxes run in parallel). If it raises, the batch is scored again one
completion at a time, and only the completions it still raises on lose their reward (NaN: unscorable, counted under
"verifier_raised"); the others keep theirs. A `VerifierError` is a fault of the verifier itself (a reward function
that returns a dict, say), which no completion caused: it is raised as it is, never retried.

Verifiers may also say why they scored some completions as failed, as `task.last_failures` ({reason: count}, set
by their `verify`; the `code` task's unreadable outputs, for instance): those are added in.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class VerifierError(ValueError):
    """A verifier's own fault (not a completion's): it names the verifier, what it did and the fix."""


@dataclass
class Verified:
    values: list  # one reward per completion (NaN where the verifier raised on it)
    failures: dict[str, int] = field(default_factory=dict)  # {reason: completions scored as failed for it}
    error: str | None = None  # what the verifier raised (the first time), for messages


def verify_guarded(task, completions: list[str], examples: list) -> Verified:
    """`task.verify(completions, examples)`, and if it raises (a `VerifierError` excepted), one completion at a time."""
    try:
        return Verified(list(task.verify(completions, examples)), _failures_of(task))
    except VerifierError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a verifier's crash on one completion must stay there
        first = f"raised {type(err).__name__}: {err}"
    failures: Counter[str] = Counter()
    values: list = []
    for completion, example in zip(completions, examples, strict=True):
        try:
            (value,) = task.verify([completion], [example])
            failures.update(_failures_of(task))
        except VerifierError:
            raise
        except (Exception, SystemExit):  # noqa: BLE001
            value = math.nan
            failures["verifier_raised"] += 1
        values.append(value)
    log.warning("verifier of task %s %s; scored one completion at a time, %d of %d raised (unscorable)",
                getattr(task, "name", "?"), first, failures["verifier_raised"], len(completions))
    return Verified(values, dict(failures), first if failures["verifier_raised"] else None)


def _failures_of(task) -> dict[str, int]:
    failures = getattr(task, "last_failures", None)
    return dict(failures) if isinstance(failures, dict) else {}


def score_each(name: str, score_one, completions: list, examples: list) -> tuple[list[float], dict[str, int]]:
    """(scores, {reason: count}): `score_one(completion, example)` for each pair, as a float. A completion that is not
    a string scores 0.0; one that `score_one` raises on scores 0.0 too, counted under "scoring_raised" (a completion
    must never fail its batch: built-in verifiers score one at a time through this)."""
    if len(completions) != len(examples):
        raise ValueError(f"{name}: {len(completions)} completions for {len(examples)} examples")
    scores, raised = [], 0
    for completion, example in zip(completions, examples, strict=True):
        try:
            scores.append(float(score_one(completion, example)) if isinstance(completion, str) else 0.0)
        except Exception:  # noqa: BLE001 - one completion's failure is its own: it scores 0
            log.debug("%s: scoring failed for %r", name, completion, exc_info=True)
            scores.append(0.0)
            raised += 1
    return scores, {"scoring_raised": raised} if raised else {}
