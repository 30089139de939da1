"""One agent episode's model calls as the rows the learner trains on: token in, token out.

An agent sends whole conversations; the endpoint renders each request through the chat template. Training on those
renderings would train on re-tokenised text, not on what the model sampled: a BPE tokenizer can merge the end of a
turn with what follows, a template can re-render an earlier turn differently (drop its reasoning, re-serialise a
tool call's JSON, strip a space). So the endpoint does not sample from the rendering when the conversation goes on
from where the episode stands:

- The episode's context is the ids of its current row: the row's first prompt, then every sampled turn and every
  observation (what the agent sent in between) so far.
- A request whose rendered text starts with the text of that context (decoded with its special tokens) extends it:
  the rest of the text, tokenised on its own, is an observation (in the context, out of the loss), and the call
  samples from the context plus those ids. The sampled ids are appended as they are.
- A request that does not (the agent edited its history, or the template rendered an earlier turn differently from
  what the model wrote) starts a new row at its own rendering: the trajectory is split there. Every row of an
  episode gets the episode's advantage; `splits` counts the splits (metric `agents/splits`).

The comparison is on text, so it holds for any tokenizer whose decoding is lossless (byte-level BPE, the tiny
model's characters): a turn the model ended without its end-of-turn token (cut by max_tokens) still matches, the
template's end-of-turn token then being observation.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Segment:
    """One row of an episode: the prompt it starts from, then sampled turns and observations."""

    prompt: list[int]
    ids: list[int] = field(default_factory=list)  # after the prompt: sampled turns and observations
    observed: list[bool] = field(default_factory=list)  # True on observation ids
    logps: list[float] = field(default_factory=list)  # the engine's log-prob of each sampled id; 0 on observations
    truncated: bool = False  # its last call was cut by the token budget before the end-of-turn token

    @property
    def context(self) -> list[int]:
        return self.prompt + self.ids

    @property
    def sampled(self) -> list[int]:
        return [t for t, obs in zip(self.ids, self.observed, strict=True) if not obs]


class Trajectory:
    """The calls of one episode, row by row (see the module docstring)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.segments: list[Segment] = []
        self.calls = 0  # model calls recorded
        self.splits = 0  # rows started because a request did not extend the context

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def prompt_for(self, rendered: list[int]) -> list[int]:
        """The ids the next call samples from, given its request rendered as `rendered`."""
        if not self.segments:
            self.segments.append(Segment(list(rendered)))
            return list(rendered)
        row = self.segments[-1]
        said, asked = self._text(row.context), self._text(rendered)
        if not asked.startswith(said):
            self.splits += 1
            self.segments.append(Segment(list(rendered)))
            return list(rendered)
        observation = self.tokenizer.encode(asked[len(said):], add_special_tokens=False) if len(asked) > len(said) \
            else []
        row.ids += observation
        row.observed += [True] * len(observation)
        row.logps += [0.0] * len(observation)
        return row.context

    def record(self, sampled: list[int], logps: list[float], truncated: bool = False) -> None:
        """The ids the call sampled and the engine's log-prob of each, appended to the current row; `truncated`: the
        call was cut by its token budget."""
        if not self.segments:
            raise RuntimeError("record() before prompt_for()")
        if len(sampled) != len(logps):
            raise ValueError(f"{len(sampled)} sampled ids and {len(logps)} log-probs")
        row = self.segments[-1]
        row.ids += list(sampled)
        row.observed += [False] * len(sampled)
        row.logps += [float(x) for x in logps]
        row.truncated = truncated
        self.calls += 1

    def rows(self) -> list[Segment]:
        """The rows to train on: every segment in which the model sampled at least one token."""
        return [s for s in self.segments if any(not o for o in s.observed)]
