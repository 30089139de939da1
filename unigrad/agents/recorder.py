"""The training side of the endpoint: every call an agent makes, recorded into its episode's `Trajectory`.

Each episode's client carries its own API key; the recorder knows the keys of the episodes now running and refuses
(HTTP 400, the agent's client raises) a call with another key (an episode already over, a stray client), a call asking
for more than one choice (an episode is one trajectory), and calls beyond the episode's budget. It also sets what
sampling the run trains with: the run's temperature, top-p and top-k whatever the agent asked, at most the run's
`max_new_tokens` per call, and a seed per call derived from the episode's random stream.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass

from unigrad.agents.trajectory import Trajectory
from unigrad.serve.hooks import CompletedCall, PromptCall, RefusedCall


@dataclass
class EpisodeState:
    trajectory: Trajectory
    seed: int  # the episode's random stream: call c samples from stream_seed(seed, c)
    max_calls: int
    tool_calls: int = 0  # choices that ended in tool calls
    open: bool = True


def call_seed(episode_seed: int, call: int) -> int:
    """The seed of call `call` (0, 1, ...) of an episode whose stream is `episode_seed`."""
    return (episode_seed * 1_000_003 + 7_919 * (call + 1)) % 2**62


class EpisodeRecorder:
    """A `unigrad.serve.hooks.ServeHook` recording the calls of a set of agent episodes, one key each."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.episodes: dict[str, EpisodeState] = {}
        self.nonce = secrets.token_hex(6)  # keys of an earlier batch of episodes are refused
        self._lock = threading.Lock()

    def open_episode(self, index: int, seed: int, max_calls: int) -> str:
        """A new episode's API key."""
        key = f"unigrad-episode-{self.nonce}-{index}"
        with self._lock:
            self.episodes[key] = EpisodeState(Trajectory(self.tokenizer), seed, max_calls)
        return key

    def close(self, key: str) -> None:
        """No more calls for this episode (it returned, raised or ran out of time)."""
        with self._lock:
            self.episodes[key].open = False

    def waiting_calls(self) -> int:
        """How many calls may come next: one per open episode with calls left (what the endpoint's batcher waits
        for, so that the agents' requests share engine calls)."""
        with self._lock:
            return sum(s.open and s.trajectory.calls < s.max_calls for s in self.episodes.values())

    def _episode(self, key: str | None) -> EpisodeState:
        state = self.episodes.get(key or "")
        if state is None:
            raise RefusedCall("this API key belongs to no running episode (use the client the agent was given)")
        if not state.open:
            raise RefusedCall("this episode is over: its agent returned, raised or ran out of time")
        return state

    def seed_for(self, key: str | None) -> int | None:
        """The seed of the next call of the episode of `key` (None for a key that is no episode's)."""
        state = self.episodes.get(key or "")
        return None if state is None else call_seed(state.seed, state.trajectory.calls)

    def prompt_ids(self, call: PromptCall) -> list[int]:
        with self._lock:
            state = self._episode(call.api_key)
            if state.trajectory.calls >= state.max_calls:
                raise RefusedCall(f"this episode has made its {state.max_calls} model calls (the task's max_calls)")
            return state.trajectory.prompt_for(call.rendered_ids)

    def completed(self, call: CompletedCall) -> None:
        with self._lock:
            state = self._episode(call.api_key)
            if len(call.choices) != 1:
                raise RefusedCall(f"an agent episode is one trajectory: ask for n=1, not {len(call.choices)}")
            choice = call.choices[0]
            state.trajectory.record(choice.token_ids, choice.logprobs, truncated=choice.finish_reason == "length")
            state.tool_calls += choice.finish_reason == "tool_calls"
