"""Multi-turn episodes on any `RolloutEngine`: turns sampled by the engine, observations from the environments.

Token in, token out. Turn 1 is one `engine.generate` call for every prompt (n samples each, sharing the prompt's
prefill). After it, each episode's environment reads the turn (its decoded text) and answers; the answer's chat
messages are encoded once, as the tokens the chat template puts between the end of an assistant turn and the start
of the next one (`observation_ids`), and appended to the episode's ids. The next turn is sampled from exactly those
ids: the engine's own tokens, never re-tokenised from text. The row the learner trains on is the prompt, then turn 1,
observation 1, turn 2, ...: the assistant turns' tokens are `completion_mask` (trained, counted), the observations'
are `observation_mask` (in the context, out of the loss and of every token count), and `infer_logprobs` are the
engine's log-probs of the turns' tokens.

An episode ends when its environment says done, after `max_turns` assistant turns, when a turn is cut by
`max_new_tokens` before its end-of-turn token (the row is `truncated`; the environment still reads that turn), or
when the next turn would not fit the model's context (`truncated` too). An environment whose `step` raises ends its
episode unscorable (reward NaN, what it raised in `Episodes.failures`), as a verifier that raises would.

Turn k > 1 of the episode of sample j of prompt p samples from its own random stream, a function of the prompt's
stream, j and k, so episodes do not depend on which other episodes share the call or how long they ran.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from unigrad.environments.base import Environment, Message, is_multi_turn
from unigrad.rollout.base import Rollout, RolloutEngine, SamplingParams, resolve_prompt_seeds
from unigrad.rollout.padding import pad_rows

# A fixed conversation the observation tokens are cut from: its rendering must be a prefix of its rendering with
# the observation messages and the next assistant header appended.
_BASE: tuple[Message, ...] = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})


@dataclass
class Episodes:
    """What `run_episodes` returns besides the rows."""

    rewards: torch.Tensor  # (N,) float32: the sum of the environment's turn rewards; NaN for rows without one
    turns: torch.Tensor  # (N,) long: assistant turns written
    tool_calls: torch.Tensor  # (N,) long
    tool_errors: torch.Tensor  # (N,) long
    failures: dict[int, str]  # {row: what its environment raised}: the episode ended there, its reward is NaN
    # (N,) long: the first row of each row's episode (itself but where an agent episode was split into several rows,
    # `unigrad.agents.trajectory`: those share the first row's advantage); None: one row per episode
    first_row: torch.Tensor | None = None
    splits: int = 0  # agent episodes: rows started because a request did not extend the episode's tokens


def encode_messages(tokenizer, messages: list[Message], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Chat messages through the tokenizer's chat template (with `tools` where given), as token ids."""
    kwargs = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True,
                                        **kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


@functools.lru_cache(maxsize=64)
def _takes_tool_role(tokenizer) -> bool:
    try:
        encode_messages(tokenizer, [*_BASE, {"role": "tool", "name": "t", "content": "r"}])
    except Exception:  # noqa: BLE001 - a template that raises on the role (jinja's TemplateError and others)
        return False
    return True


def renderable(tokenizer, messages: list[Message]) -> list[Message]:
    """`messages` as the tokenizer's chat template can render them: tool results become user messages where the
    template has no tool role (the tiny model's)."""
    if _takes_tool_role(tokenizer) or all(m.get("role") != "tool" for m in messages):
        return list(messages)
    return [{"role": "user", "content": str(m.get("content", ""))} if m.get("role") == "tool" else m
            for m in messages]


def observation_ids(tokenizer, messages: list[Message], eos_ids: list[int]) -> list[int]:
    """The token ids that follow an assistant turn's end-of-turn token when `messages` come next: the rest of the
    template's turn separator, the messages, and the header of the next assistant turn."""
    return list(_observation_ids(tokenizer, _freeze(renderable(tokenizer, messages)), tuple(eos_ids)))


def _freeze(messages: list[Message]) -> tuple:
    return tuple(tuple(sorted((k, str(v)) for k, v in m.items())) for m in messages)


@functools.lru_cache(maxsize=1 << 14)
def _observation_ids(tokenizer, frozen: tuple, eos_ids: tuple[int, ...]) -> tuple[int, ...]:
    messages = [dict(m) for m in frozen]
    base = encode_messages(tokenizer, list(_BASE), add_generation_prompt=False)
    full = encode_messages(tokenizer, [*_BASE, *messages])
    if full[:len(base)] != base:
        raise ValueError("the tokenizer's chat template does not render a conversation as the start of its "
                         "continuation, so an observation's tokens cannot be cut out of it")
    ends = [i for i, t in enumerate(base) if t in eos_ids]
    cut = ends[-1] + 1 if ends else len(base)  # just after the end-of-turn token the model writes itself
    return tuple(full[cut:])


def turn_seed(prompt_seed: int, sample: int, turn: int) -> int:
    """The random stream of turn `turn` (1, 2, ...; turn 0 is the engine's own per-prompt stream) of sample
    `sample` of a prompt whose stream seed is `prompt_seed`."""
    return (prompt_seed * 1_000_003 + (sample + 1) * 7_919 + turn) % 2**63


@dataclass(frozen=True)
class EpisodeBatch:
    """The episodes `run_episodes` plays: `n` per prompt, rows p*n .. p*n+n-1 belonging to prompt p."""

    prompts: list[list[int]]  # (P,) token ids
    environments: list[Environment | None]  # (P*n,): a fresh environment per row, already reset on its example, or
    #   None for a row of a single-turn task (one turn, no reward here: its verifier scores it)
    n: int
    max_turns: list[int]  # (P,): each prompt's turn budget


def run_episodes(engine: RolloutEngine, tokenizer, batch: EpisodeBatch, sampling: SamplingParams,
                 eos_ids: list[int], context_length: int | None = None) -> tuple[Rollout, Episodes]:
    """`batch.n` episodes per prompt of `batch`: turn 1 for every row at once, then each turn of the rows whose
    episode goes on, until none does or the largest turn budget is spent."""
    first = engine.generate(batch.prompts, batch.n, sampling).to("cpu")
    rows = first.num_sequences
    if len(batch.environments) != rows or len(batch.max_turns) != len(batch.prompts):
        raise ValueError(f"{len(batch.environments)} environments and {len(batch.max_turns)} turn budgets for "
                         f"{len(batch.prompts)} prompts x {batch.n} samples")
    seeds = resolve_prompt_seeds(sampling, len(batch.prompts))
    play = _Play(tokenizer, batch, sampling, eos_ids, context_length, first.truncated.clone())
    live, turn_rows = list(range(rows)), first
    for turn in range(max(batch.max_turns)):
        live = [r for k, r in enumerate(live) if play.take_turn(turn_rows, k, r)]
        if not live:
            break
        contexts = [batch.prompts[r // batch.n] + play.ids[r] for r in live]
        call = SamplingParams(**{**sampling.__dict__, "seed": None, "prompt_seeds": tuple(
            turn_seed(seeds[r // batch.n], r % batch.n, turn + 1) for r in live)})
        turn_rows = engine.generate(contexts, 1, call).to("cpu")
    return play.rollout(first), play.episodes()


@dataclass
class _Play:
    """What one `run_episodes` call was given and what its episodes have written so far, row by row."""

    tokenizer: object
    batch: EpisodeBatch
    sampling: SamplingParams
    eos_ids: list[int]
    context_length: int | None
    truncated: torch.Tensor  # (N,) bool: the row's last turn was cut, or no further turn fits the context

    def __post_init__(self) -> None:
        rows = len(self.truncated)
        self.ids: list[list[int]] = [[] for _ in range(rows)]  # the episode's completion: turns and observations
        self.observed: list[list[bool]] = [[] for _ in range(rows)]
        self.logps: list[list[float]] = [[] for _ in range(rows)]
        self.reward = torch.full((rows,), float("nan"))
        self.turns, self.calls, self.errors = (torch.zeros(rows, dtype=torch.long) for _ in range(3))
        self.failures: dict[int, str] = {}

    def take_turn(self, turn_rows: Rollout, k: int, r: int) -> bool:
        """Row `r` writes its sampled turn (row `k` of `turn_rows`) and its environment answers; True when the
        episode goes on to another turn."""
        sampled = turn_rows.completion_ids[k][turn_rows.completion_mask[k]].tolist()
        self.ids[r] += sampled
        self.observed[r] += [False] * len(sampled)
        self.logps[r] += turn_rows.infer_logprobs[k][turn_rows.completion_mask[k]].tolist()
        self.turns[r] += 1
        self.truncated[r] = bool(turn_rows.truncated[k])
        result = self._step_environment(r, sampled)
        return result is not None and self._observe(r, result)

    def _step_environment(self, r: int, sampled: list[int]):
        """The environment's `StepResult` for row `r`'s turn, its reward and tool counts added; None when the row
        has no environment or its environment raised (the episode ends unscorable)."""
        env = self.batch.environments[r]
        if env is None:
            return None
        try:
            result = env.step(self.tokenizer.decode(sampled, skip_special_tokens=True))
            turn_reward = float(result.reward or 0.0)
        except Exception as err:  # noqa: BLE001 - an environment's bug must not end the run: unscorable
            self.failures[r] = f"{type(env).__name__}.step raised {type(err).__name__}: {err}"
            self.reward[r] = float("nan")
            return None
        self.reward[r] = (0.0 if torch.isnan(self.reward[r]) else float(self.reward[r])) + turn_reward
        self.calls[r] += result.tool_calls
        self.errors[r] += result.tool_errors
        return result

    def _observe(self, r: int, result) -> bool:
        """Append the environment's answer to row `r` when its episode goes on: not done, its turn not cut, its
        budget not spent, and room in the context for the answer and another whole turn."""
        prompt = self.batch.prompts[r // self.batch.n]
        if result.done or self.truncated[r] or self.turns[r] >= self.batch.max_turns[r // self.batch.n]:
            return False
        obs = observation_ids(self.tokenizer, result.observation, self.eos_ids)
        if self.context_length is not None and \
                len(prompt) + len(self.ids[r]) + len(obs) + self.sampling.max_new_tokens > self.context_length:
            self.truncated[r] = True  # no room for another turn
            return False
        self.ids[r] += obs
        self.observed[r] += [True] * len(obs)
        self.logps[r] += [0.0] * len(obs)
        return True

    def rollout(self, first: Rollout) -> Rollout:
        """The rows the learner trains on: `first`'s prompts, then each episode's turns and observations."""
        width = max(1, max(len(x) for x in self.ids))
        completion_ids, context = pad_rows(self.ids, "right", self.tokenizer.pad_token_id, width=width)
        obs_mask = pad_rows(self.observed, "right", False, width=width, dtype=torch.bool)[0]
        infer = pad_rows(self.logps, "right", 0.0, width=width, dtype=torch.float32)[0]
        return Rollout(first.prompt_ids, first.prompt_mask, completion_ids, context & ~obs_mask, infer,
                       first.group_ids, self.truncated, observation_mask=obs_mask)

    def episodes(self) -> Episodes:
        return Episodes(self.reward, self.turns, self.calls, self.errors, self.failures)


def turn_index(completion_mask: torch.Tensor, observation_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) long: the assistant turn (0, 1, ...) each trained token belongs to, -1 on observations and padding.
    A turn is a run of trained tokens; each observation ends one."""
    starts = observation_mask & ~torch.nn.functional.pad(observation_mask, (1, 0))[:, :-1]  # first token of a run
    index = starts.long().cumsum(-1)
    return torch.where(completion_mask, index, torch.full_like(index, -1))


def episode_prompt_ids(task, tokenizer, example, tool_style: str) -> list[int]:
    """The prompt of a multi-turn task's episode: its environment's opening messages through the chat template,
    with the tools' schemas where the template takes them ("hf" style)."""
    messages = task.environment(tool_style).reset(example)
    tools = task.tool_schemas() if tool_style == "hf" else None
    return encode_messages(tokenizer, renderable(tokenizer, messages), tools=tools or None)


def episode_turns(task, max_turns: int | None) -> int:
    """A task's turn budget: its own `max_turns`, capped by `max_turns` where given (single-turn tasks: 1)."""
    if not is_multi_turn(task):
        return 1
    return task.max_turns if max_turns is None else min(task.max_turns, max_turns)
