"""DAPO's dynamic sampling (arXiv 2503.14476 §3.2): keep drawing until the step's groups all carry a contrast.

A group whose scorable rewards are all equal (every completion right, or every one wrong) gets advantage 0 under
every group-normalised estimator: it adds nothing to the gradient but its tokens to the normalisers. A group that no
verifier could score is kept (its task's unscorable count then stops the run as it would without filtering). `refill`
drops such groups and draws as many new prompts as were dropped, for at most `rollout.max_resample` more rounds;
each new prompt samples from its own random stream of the step (numbered after the ones drawn before), so a run
is as reproducible as without it. If the rounds run out with some groups kept, the step trains on fewer prompts
(`dynamic_sampling/missing` says how many); if every group of every round was uniform, the run stops
(`AllGroupsUniform`), since a step can only be skipped by training on nothing.

DAPO's own implementation (in verl) over-samples a whole generation batch per round and stops with an error after a
cap on rounds; here each round draws only the shortfall. Filtering uses the verifiers' rewards, before any overlong
shaping (verl filters on the accuracy or the score, a setting).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unigrad.objective.shaping import uniform_groups
from unigrad.rollout.base import Rollout, merge_rollouts
from unigrad.train.producing.drawn import Drawn


class AllGroupsUniform(RuntimeError):
    """Every group drawn for a step had equal rewards: nothing to learn from."""


def refill(ctx, step: int, first: Drawn, picks: list[tuple[int, int]], draw: Callable[..., Drawn]):
    """(the step's kept draws merged, their picks, metrics) from the first draw `first` of `picks`: non-uniform
    groups kept in draw order, dropped ones replaced by new draws, made by `draw(ctx, step, picks, stream_offset=)`
    (unigrad.train.producing.produce.draw; one process)."""
    needed, kept, drawn, dropped, offset = len(picks), [], 0, 0, len(picks)
    current, current_picks, rounds, t_rollout, t_reward, errors = first, picks, 0, 0.0, 0.0, {}
    failures: dict[str, float] = {}
    while True:
        rounds += 1
        t_rollout, t_reward = t_rollout + current.time_rollout, t_reward + current.time_reward
        errors.update(current.errors)  # a dropped draw's verifier errors are still reported
        for key, count in current.failures.items():  # and its completions scored as failed
            failures[key] = failures.get(key, 0.0) + count
        uniform = uniform_groups(current.rewards, current.rollout.group_ids, len(current_picks))
        keep = torch.nonzero(~uniform).flatten()[:needed]
        drawn, dropped = drawn + len(current_picks), dropped + int(uniform.sum())
        if len(keep):
            kept.append(select_groups(current, keep))
        needed -= len(keep)
        if needed == 0 or rounds > ctx.max_resample:
            break
        current_picks = ctx.sampler.sample(needed)
        current = draw(ctx, step, current_picks, stream_offset=offset)
        offset += needed
    metrics = {"dynamic_sampling/drawn": float(drawn), "dynamic_sampling/dropped": float(dropped),
               "dynamic_sampling/rounds": float(rounds), "dynamic_sampling/missing": float(needed)}
    if not kept:
        raise AllGroupsUniform(
            f"dynamic sampling: all {drawn} groups drawn over {rounds} rounds had equal rewards (every completion "
            "right, or every one wrong), so the step has nothing to learn from. The tasks are too hard or too easy "
            "for the model at this temperature: raise rollout.max_resample or rollout.temperature, change the "
            "tasks, or set rollout.dynamic_sampling=false")
    merged = merge(kept, ctx.tokenizer.pad_token_id)
    merged.time_rollout, merged.time_reward = t_rollout, t_reward  # every draw's, the dropped ones' too
    merged.errors, merged.failures = errors, failures
    return merged, merged.picks, metrics


def select_groups(drawn: Drawn, groups: torch.Tensor) -> Drawn:
    """The `groups` (prompt indices of `drawn`, in order) and their rows, renumbered 0 .. len(groups) - 1."""
    ro = drawn.rollout
    rows = torch.nonzero(torch.isin(ro.group_ids, groups)).flatten()
    renumber = torch.full((len(drawn.picks),), -1, dtype=torch.long)
    renumber[groups] = torch.arange(len(groups))
    index = groups.tolist()
    return Drawn(
        [drawn.picks[g] for g in index], [drawn.examples[g] for g in index], [drawn.prompt_ids[g] for g in index],
        Rollout(ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows], ro.completion_mask[rows],
                ro.infer_logprobs[rows], renumber[ro.group_ids[rows]], ro.truncated[rows], ro.observation_mask[rows],
                routing=ro.routing[rows] if ro.routing is not None else None),
        drawn.off_policy[rows], [drawn.texts[r] for r in rows.tolist()], drawn.rewards[rows], dict(drawn.errors),
        drawn.time_rollout, drawn.time_reward)


def merge(parts: list[Drawn], pad_id: int) -> Drawn:
    """Several draws as one: prompts in order, rows padded to the widest prompt and completion."""
    if len(parts) == 1:
        return parts[0]
    ro = merge_rollouts([d.rollout for d in parts], pad_id)
    errors: dict[str, str] = {}
    for d in parts:
        errors.update(d.errors)
    return Drawn(
        sum((d.picks for d in parts), []), sum((d.examples for d in parts), []),
        sum((d.prompt_ids for d in parts), []), ro, torch.cat([d.off_policy for d in parts]),
        sum((d.texts for d in parts), []), torch.cat([d.rewards for d in parts]), errors,
        sum(d.time_rollout for d in parts), sum(d.time_reward for d in parts))
