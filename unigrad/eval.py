"""Held-out evaluation: greedy pass@1 and sampled pass@k per task (a multi-turn task's by whole episodes: an
episode counts when its environment's reward reaches full marks).

pass@k uses the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374) with n = k samples
per prompt at temperature 1, i.e. the fraction of prompts with at least one correct sample.
A completion counts as correct when its reward is >= 1 (full marks).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unigrad.agents.program import DEFAULT_AGENT_TIMEOUT, is_agent_task, served_model_name
from unigrad.environments.base import is_multi_turn
from unigrad.rollout.base import SamplingParams, eos_id_list
from unigrad.rollout.episodes import EpisodeBatch, episode_prompt_ids, episode_turns, run_episodes
from unigrad.rollout.prompts import encode_prompt
from unigrad.tasks import get_task
from unigrad.tasks.base import Task
from unigrad.tasks.guard import verify_guarded
from unigrad.tools.calls import tool_style

if TYPE_CHECKING:
    from unigrad.models.chat_model import ChatRecipe
    from unigrad.models.tiny import TinyRecipe


def evaluate(
    model,
    tokenizer,
    tasks: list[Task],
    prompts_per_task: int = 200,
    *,
    pass_k: int = 0,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 256,
    per_prompt: bool = False,
    max_turns: int | None = None,
    split: str = "test",
    engine=None,
) -> dict[str, Any]:
    """{task: {"pass@1": x, "pass@k": y, "n": prompts}, "mean": {...}} on each task's `split` ("test", the held-out
    split numbers are reported on, or "validation", the one choices are tuned on). A multi-turn task's row also has
    "tool_calls" and "tool_errors": the mean per greedy episode.

    `per_prompt`: also {task: {"correct": [0 or 1 per prompt, greedy]}}, for paired comparisons (`paired_gain`).
    `max_turns`: a cap on multi-turn tasks' episodes (None: each task's own `max_turns`).
    `engine`: the `RolloutEngine` that samples, holding `model`'s weights (None: a `TransformersEngine` on `model`;
    `unigrad eval --engine vllm` passes a `VLLMEngine`)."""
    from unigrad.rollout.transformers_engine import TransformersEngine

    _check_settings(split, prompts_per_task, max_new_tokens, pass_k)
    if engine is None:
        engine = TransformersEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                    device=next(model.parameters()).device)  # where the model is
    was_training = model.training
    model.eval()
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    scorer = _Scorer(engine, tokenizer, batch_size, tool_style(tokenizer), context, max_turns, max_new_tokens, seed)
    results: dict[str, Any] = {task.name: _task_results(scorer, task, prompts_per_task, split, pass_k, per_prompt)
                               for task in tasks}
    keys = [k for k in next(iter(results.values())) if k.startswith("pass@")]
    results["mean"] = {k: sum(results[t.name][k] for t in tasks) / len(tasks) for k in keys}
    model.train(was_training)
    return results


def _check_settings(split: str, prompts_per_task: int, max_new_tokens: int, pass_k: int) -> None:
    if split not in ("validation", "test"):
        raise ValueError(f"evaluate: split must be 'validation' or 'test', got {split!r}")
    for name, value, low in (("prompts_per_task", prompts_per_task, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("pass_k", pass_k, 0)):
        if value < low:
            raise ValueError(f"evaluate: {name} must be at least {low}, got {value}")


@dataclass(frozen=True)
class _Scorer:
    """What samples and scores every task's held-out prompts in one `evaluate` call."""

    engine: Any  # a RolloutEngine holding the evaluated weights
    tokenizer: Any
    batch_size: int  # rows per engine call
    style: str  # tool-call style of the tokenizer's chat template
    context: int | None  # the model's context length, where it says
    max_turns: int | None  # cap on multi-turn tasks' episodes
    max_new_tokens: int
    seed: int


def _task_results(scorer: _Scorer, task: Task, wanted: int, split: str, pass_k: int, per_prompt: bool) -> dict:
    """One task's row of `evaluate`'s result: pass@1 (greedy), pass@k (sampled at temperature 1) where asked, the
    notes on its prompts and its completions scored as failed, by reason."""
    examples, prompts, notes = _held_out_prompts(scorer, task, wanted, split)
    if not examples:
        raise ValueError(f"task {task.name!r}: no {split} prompt fits the model's context of {scorer.context} tokens "
                         f"with max_new_tokens={scorer.max_new_tokens}")
    counts: Counter = Counter()  # "failed/<reason>": completions scored as failed (`unigrad.tasks.guard`)
    greedy = _correct(scorer, task, (examples, prompts), 1,
                      SamplingParams(temperature=0.0, max_new_tokens=scorer.max_new_tokens, seed=scorer.seed), counts)
    row: dict[str, Any] = {"pass@1": greedy.float().mean().item(), "n": float(len(examples)), **notes}
    if counts["episodes"]:  # a multi-turn task: its greedy episodes' tool calls, per episode
        row["tool_calls"] = counts["tool_calls"] / counts["episodes"]
        row["tool_errors"] = counts["tool_errors"] / counts["episodes"]
    if counts["model_calls"]:  # an agent task: the model calls its greedy episodes made, per episode
        row["model_calls"] = counts["model_calls"] / counts["episodes"]
    if per_prompt:
        row["correct"] = greedy.int().tolist()
    if pass_k > 0:
        sampled = _correct(scorer, task, (examples, prompts), pass_k,
                           SamplingParams(temperature=1.0, max_new_tokens=scorer.max_new_tokens, seed=scorer.seed + 1),
                           counts)
        row[f"pass@{pass_k}"] = pass_at_k(sampled, pass_k, pass_k)
    row.update({key: float(count) for key, count in counts.items() if key.startswith("failed/")})
    return row


def pass_at_k(correct: torch.Tensor, n: int, k: int) -> float:
    """Mean over prompts of the unbiased pass@k estimator 1 - C(n - c, k) / C(n, k) (Chen et al. 2021, arXiv
    2107.03374), c a prompt's correct samples out of its n. `correct`: (prompts * n,) bool in `_correct`'s layout,
    sample j of prompt i at i * n + j. With n = k it is the fraction of prompts with at least one correct sample."""
    if not 1 <= k <= n or correct.numel() % n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n and n = {n} samples per prompt (got {correct.numel()} in all)")
    counts = correct.view(-1, n).sum(dim=1).tolist()  # (prompts,) correct samples of each prompt
    return sum(1.0 - math.comb(n - c, k) / math.comb(n, k) for c in counts) / len(counts)


def _held_out_prompts(scorer: _Scorer, task: Task, wanted: int, split: str = "test"):
    """(examples, prompt ids, notes) of a task's held-out `split`, encoded by `scorer`'s tokenizer in its tool style
    and drawn with its seed: each distinct prompt (multi-turn: episode) once
    (asking for more than the split holds evaluates what it holds: `distinct_prompts` says how many), and prompts that
    cannot fit the model's context with max_new_tokens left out and counted (`too_long`), never truncated; its warnings
    point at the caller of `evaluate` (through `_task_results`)."""
    tokenizer, context, max_new_tokens = scorer.tokenizer, scorer.context, scorer.max_new_tokens
    examples, seen = [], set()
    for ex in task.examples(split, wanted, seed=scorer.seed):
        # an episode of a multi-turn task is its prompt and what is hidden behind it (guess: one range, many secrets)
        key = (ex.prompt, ex.answer) if is_multi_turn(task) else ex.prompt
        if key not in seen:
            seen.add(key)
            examples.append(ex)
    notes: dict[str, float] = {}
    if len(examples) < wanted:
        notes["distinct_prompts"] = float(len(examples))
        warnings.warn(f"task {task.name!r}: its {split} split holds {len(examples)} distinct prompts; evaluating those "
                      f"(asked for {wanted})", stacklevel=4)
    prompts = [episode_prompt_ids(task, tokenizer, ex, scorer.style) if is_multi_turn(task) else
               encode_prompt(tokenizer, ex.prompt) for ex in examples]
    if context is not None:
        fits = [len(p) + max_new_tokens <= context for p in prompts]
        if not all(fits):
            notes["too_long"] = float(fits.count(False))
            warnings.warn(f"task {task.name!r}: {fits.count(False)} {split} prompts do not fit the model's context "
                          f"({context} tokens with max_new_tokens={max_new_tokens}); left out", stacklevel=4)
            examples = [ex for ex, ok in zip(examples, fits, strict=True) if ok]
            prompts = [p for p, ok in zip(prompts, fits, strict=True) if ok]
    return examples, prompts, notes


def _correct(scorer: _Scorer, task: Task, held_out: tuple[list, list[list[int]]], n: int, sampling: SamplingParams,
             counts: Counter) -> torch.Tensor:
    """Bool (len(examples) * n,): completion (or episode) j of prompt i of `held_out` (examples, their prompt ids)
    at row i * n + j scored full marks. A completion its verifier cannot score counts as wrong, never ends the
    evaluation (`unigrad.tasks.guard`); the reasons of those scored as failed are counted in `counts` (as
    "failed/<reason>"), and so are a multi-turn task's "episodes", their "tool_calls" and "tool_errors"."""
    examples, prompts = held_out
    engine, tokenizer = scorer.engine, scorer.tokenizer
    out = []
    per_call = max(1, scorer.batch_size // n)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        exs = [examples[start + p] for p in range(len(chunk)) for _ in range(n)]
        if is_agent_task(task):  # whole episodes played by the task's agent program through an endpoint
            played = [examples[start + p] for p in range(len(chunk))]
            rewards = _agent_rewards(scorer, task, (played, chunk), n, sampling, counts)
        elif is_multi_turn(task):  # whole episodes: an episode's reward is its environment's
            environments = [task.environment(scorer.style) for _ in exs]
            for env, ex in zip(environments, exs, strict=True):
                env.reset(ex)
            batch = EpisodeBatch(chunk, environments, n, [episode_turns(task, scorer.max_turns)] * len(chunk))
            _, episodes = run_episodes(engine, tokenizer, batch, sampling, eos_id_list(tokenizer.eos_token_id),
                                       scorer.context)
            rewards = episodes.rewards.tolist()
            counts.update({"episodes": len(rewards), "tool_calls": int(episodes.tool_calls.sum()),
                           "tool_errors": int(episodes.tool_errors.sum())})
        else:
            ro = engine.generate(chunk, n, sampling)
            texts = [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                     for ids, m in zip(ro.completion_ids, ro.completion_mask, strict=True)]
            verified = verify_guarded(task, texts, exs)
            rewards = verified.values
            counts.update({f"failed/{reason}": count for reason, count in verified.failures.items()})
        out.extend(r is not None and r == r and r >= 1.0 for r in rewards)
    return torch.tensor(out, dtype=torch.bool)


def _agent_rewards(scorer: _Scorer, task, held_out: tuple[list, list[list[int]]], n: int, sampling: SamplingParams,
                   counts: Counter) -> list[float]:
    """The rewards of `n` episodes per example of `held_out` (examples, their prompt ids) of an agent task
    (`unigrad.agents`), episode j of example i at i * n + j; its model calls and tool calls are counted in `counts`."""
    from unigrad.agents.runner import AgentBatch, AgentSettings, run_agent_episodes

    examples, prompts = held_out
    seeds = tuple(scorer.seed * 1_000_003 + i for i in range(len(examples)))
    batch = AgentBatch([task] * len(examples), examples, prompts, n, seeds)
    settings = AgentSettings(served_model_name(scorer.tokenizer.name_or_path), DEFAULT_AGENT_TIMEOUT, scorer.context,
                             scorer.max_turns)
    _, episodes = run_agent_episodes(scorer.engine, scorer.tokenizer, batch, sampling, settings)
    first = episodes.first_row == torch.arange(len(episodes.first_row))  # one row per episode
    counts.update({"episodes": int(first.sum()), "tool_calls": int(episodes.tool_calls[first].sum()),
                   "tool_errors": 0, "model_calls": int(episodes.turns[first].sum())})
    return episodes.rewards[first].tolist()


def tiny_heldout_accuracy(model, tokenizer, recipe: TinyRecipe) -> dict[str, float]:
    """The held-out evaluation every tiny-model build ends with (the package root registers it:
    `unigrad.models.build_evaluations`): greedy pass@1 on `recipe.eval_examples` test prompts of each of the recipe's
    tasks."""
    # Demonstrations are at most ~40 characters; 48 new tokens leave room for the EOS.
    results = evaluate(model, tokenizer, [get_task(t) for t in recipe.task_names], recipe.eval_examples,
                       max_new_tokens=48, seed=recipe.eval_seed)
    return {t: results[t]["pass@1"] for t in recipe.task_names}



def chat_heldout_report(model, tokenizer, recipe: ChatRecipe) -> dict[str, Any]:
    """The held-out evaluation every unigrad-chat build ends with (the package root registers it:
    `unigrad.models.build_evaluations`): greedy pass@1 on `recipe.eval_examples` test prompts of each of the recipe's
    tasks ("heldout_greedy_accuracy"), and for its multi-turn tasks the tool calls and failed calls per greedy
    episode ("heldout_tool_calls")."""
    # A calculator call is about 25 tokens; 48 leave room for the end of the turn.
    results = evaluate(model, tokenizer, [get_task(t) for t in recipe.task_names], recipe.eval_examples,
                       max_new_tokens=48, seed=recipe.eval_seed)
    tools = {t: {k: results[t][k] for k in ("tool_calls", "tool_errors")} for t in recipe.task_names
             if "tool_calls" in results[t]}
    return {"heldout_greedy_accuracy": {t: results[t]["pass@1"] for t in recipe.task_names},
            "heldout_tool_calls": tools}

def paired_gain(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, float]:
    """(gain, standard error) of the mean greedy pass@1 over tasks, from two `evaluate(..., per_prompt=True)` results
    on the same prompts.

    Per task the gain is the mean of d_i = after_i - before_i over its n prompts, with standard error
    sd(d) / sqrt(n) (sd with n - 1); the mean over the T tasks has standard error sqrt(sum_t se_t^2) / T. It is the
    uncertainty from which held-out prompts were drawn (a fresh draw of n prompts), not from training noise: a
    second training run has its own spread on top (docs/results.md)."""
    tasks = [t for t in before if t != "mean"]
    if not tasks or set(tasks) != {t for t in after if t != "mean"}:
        raise ValueError(f"paired_gain needs the same tasks on both sides, got {tasks} and "
                         f"{[t for t in after if t != 'mean']}")
    gains, variances = [], []
    for t in tasks:
        b, a = before[t].get("correct"), after[t].get("correct")
        if b is None or a is None or len(a) != len(b) or len(b) < 2:
            raise ValueError(f"task {t!r}: paired_gain needs per-prompt results of the same prompts on both sides "
                             "(evaluate(..., per_prompt=True))")
        d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
        gains.append(d.mean().item())
        variances.append(d.var(unbiased=True).item() / len(d))
    return sum(gains) / len(tasks), sum(variances) ** 0.5 / len(tasks)
