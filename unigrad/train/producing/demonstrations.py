"""Demonstrations in the training step: SFT batches, and LUFFY-style guidance rows inside a group.

Three ways a step uses a prompt's demonstration (its reference solution):
- HPT sends a prompt the model fails to SFT on its demonstration (`demonstration_batch`);
- `objective=sft` trains every prompt that way and generates nothing (`no_rollout`);
- LUFFY (Mixed-Policy GRPO, arXiv 2504.14945 §3) puts the demonstration into the prompt's group as one
  of its G rows (`with_demonstrations`): it is scored by the verifier like a rollout, so it takes part in
  the group's mean and std, and its tokens enter the loss through the objective's off-policy route
  (-A * p/(p + 0.1), no clip). The paper's runs use 7 on-policy rollouts and 1 off-policy trace per prompt
  (8 in all), which is G - 1 sampled + 1 demonstration here, so the group size and the rollout budget stay
  those of the config.
"""

from __future__ import annotations

import torch

from unigrad.rollout.base import Rollout, widen_routing
from unigrad.rollout.padding import widen
from unigrad.tasks.base import Example
from unigrad.train.learning.batching import SequenceBatch, encode_completion, pad_pairs


def check_demonstrations(examples: list[Example], why: str) -> None:
    """Raise a clear error if some example has no demonstration (`why` names the method needing them)."""
    missing = sorted({ex.task for ex in examples if not ex.demonstration})
    if missing:
        raise ValueError(f"{why} needs demonstrations; task(s) {missing} have none "
                         "(give a 'demonstration' column, or use an RL objective)")


def check_training_demonstrations(tasks, why: str, pool_size: int, seed: int) -> None:
    """Raise ValueError, when the tasks load, if a training prompt has no demonstration: a file task's rows are
    named (`FileTask.rows_without_demonstration`); other tasks' training pools are drawn as the run draws them."""
    for k, task in enumerate(tasks):
        rows = getattr(getattr(task, "base", task), "rows_without_demonstration", None)
        if rows is None:
            examples = task.examples("train", pool_size, seed=seed + k)
            missing = sum(not ex.demonstration for ex in examples)
            if missing:
                raise ValueError(f"{why} needs a demonstration for every training prompt; task {task.name!r}: "
                                 f"{missing} of {len(examples)} have none (use an RL objective for it)")
        elif rows:
            listed = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
            raise ValueError(f"{why} needs a demonstration for every training row; task {task.name!r}: row(s) "
                             f"{listed} have none: fill their 'demonstration' column, drop them, or use an RL "
                             "objective")


def demonstration_batch(tokenizer, prompt_ids: list[list[int]], examples: list[Example]) -> SequenceBatch:
    """The examples' demonstrations as completions of their (already templated) prompts."""
    completions = [encode_completion(tokenizer, ex.demonstration) for ex in examples]
    return pad_pairs(prompt_ids, completions, tokenizer.pad_token_id)


def no_rollout() -> Rollout:
    """A rollout with no rows: the step of `objective=sft`, which trains on demonstrations only."""
    ids = torch.zeros((0, 1), dtype=torch.long)
    return Rollout(prompt_ids=ids, prompt_mask=ids.bool(), completion_ids=ids, completion_mask=ids.bool(),
                   infer_logprobs=ids.float(), group_ids=torch.zeros(0, dtype=torch.long),
                   truncated=torch.zeros(0, dtype=torch.bool))


def _with_unrouted_rows(ro: Rollout, num_prompts: int, p_len: int, t_len: int, interleave):
    """The sampled rows' routing record widened to (p_len + t_len), the demonstrations' rows all -1 (none
    recorded: the learner routes them itself); None without a record."""
    if ro.routing is None:
        return None
    sampled = widen_routing(ro.routing, ro.prompt_ids.shape[1], p_len, t_len)
    return interleave(sampled, sampled.new_full((num_prompts, *sampled.shape[1:]), -1))


def with_demonstrations(ro: Rollout, demos: SequenceBatch, pad_id: int) -> tuple[Rollout, torch.Tensor]:
    """Each prompt's group of n sampled rows followed by its demonstration: (rollout with n + 1 rows per prompt,
    (N,) bool marking the demonstration rows). Rows of prompt p stay contiguous (p*(n+1) .. p*(n+1)+n), as the
    `Rollout` layout requires. The demonstration rows have no engine log-probs (0) and are never truncated."""
    num_prompts = len(demos)
    n = ro.num_sequences // max(num_prompts, 1)
    if n * num_prompts != ro.num_sequences:
        raise ValueError(f"{ro.num_sequences} rows for {num_prompts} prompts")
    p_len = max(ro.prompt_ids.shape[1], demos.prompt_ids.shape[1])
    t_len = max(ro.completion_ids.shape[1], demos.completion_ids.shape[1])

    def interleave(sampled: torch.Tensor, demo: torch.Tensor) -> torch.Tensor:
        """(P*n, ...) and (P, ...) -> (P*(n+1), ...) with each prompt's demonstration after its n rows."""
        return torch.cat([sampled.reshape(num_prompts, n, *sampled.shape[1:]), demo[:, None]], dim=1).flatten(0, 1)

    out = Rollout(
        prompt_ids=interleave(widen(ro.prompt_ids, p_len, "left", pad_id),
                              widen(demos.prompt_ids, p_len, "left", pad_id)),
        prompt_mask=interleave(widen(ro.prompt_mask, p_len, "left", False),
                               widen(demos.prompt_mask, p_len, "left", False)),
        completion_ids=interleave(widen(ro.completion_ids, t_len, "right", pad_id),
                                  widen(demos.completion_ids, t_len, "right", pad_id)),
        completion_mask=interleave(widen(ro.completion_mask, t_len, "right", False),
                                   widen(demos.completion_mask, t_len, "right", False)),
        infer_logprobs=interleave(widen(ro.infer_logprobs, t_len, "right", 0.0), torch.zeros(num_prompts, t_len)),
        group_ids=torch.arange(num_prompts).repeat_interleave(n + 1),
        truncated=interleave(ro.truncated, torch.zeros(num_prompts, dtype=torch.bool)),
        observation_mask=interleave(widen(ro.observation_mask, t_len, "right", False),
                                    torch.zeros(num_prompts, t_len, dtype=torch.bool)),
        routing=_with_unrouted_rows(ro, num_prompts, p_len, t_len, interleave),
    )
    off_policy = interleave(torch.zeros(num_prompts * n, dtype=torch.bool), torch.ones(num_prompts, dtype=torch.bool))
    return out, off_policy
