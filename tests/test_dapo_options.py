"""DAPO's two trainer options (arXiv 2503.14476): overlong reward shaping and dynamic sampling."""

from __future__ import annotations

import pytest
import torch
from step_helpers import step_context
from test_faults import cli, tiny_run

from unigrad.config import load_config
from unigrad.objective import compute_advantages
from unigrad.objective.shaping import overlong_penalty, uniform_groups
from unigrad.train.producing.dynamic_sampling import AllGroupsUniform
from unigrad.train.producing.produce import produce
from unigrad.train.producing.routing import TrainingMode


def test_overlong_penalty_follows_the_papers_formula_at_its_boundaries():
    # L_max = 20, L_cache = 5: no penalty up to 15 tokens, then (15 - |y|) / 5, reaching -1 at 20; -1 beyond.
    lengths = torch.tensor([0, 14, 15, 16, 18, 19, 20, 21])
    want = [0.0, 0.0, 0.0, -0.2, -0.6, -0.8, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 5).tolist() == pytest.approx(want)
    assert overlong_penalty(lengths, 20, 5, factor=0.5).tolist() == pytest.approx([0.5 * w for w in want])
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 8  # off
    with pytest.raises(ValueError, match="between 0 and the budget"):
        overlong_penalty(lengths, 20, 21)


def test_uniform_groups_are_those_without_a_contrast_among_scorable_rewards():
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, nan, 1.0, nan, 0.5, nan, nan])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    # groups 3 and 4 have one scorable reward (nothing to compare); group 5 none: kept, to be counted as unscorable
    assert uniform_groups(rewards, groups, 6).tolist() == [True, False, True, True, True, False]


def test_the_dapo_preset_turns_both_options_on_and_other_presets_leave_them_off():
    dapo = load_config(None, ["objective=dapo", "rollout.max_new_tokens=40"])
    assert dapo.rollout.dynamic_sampling is True and dapo.rollout.overlong_buffer == 8
    grpo = load_config(None, ["objective=grpo"])
    assert grpo.rollout.dynamic_sampling is False and grpo.rollout.overlong_buffer == 0
    assert load_config(None, ["objective=dapo", "rollout.dynamic_sampling=false"]).rollout.dynamic_sampling is False
    with pytest.raises(Exception, match="HPT sends exactly those all-wrong groups"):
        load_config(None, ["objective=hpt", "rollout.dynamic_sampling=true"])


def half_uniform_rewards(ctx) -> None:
    """Prompts whose answer's character codes add up to an even number: every completion scores 1 (a uniform group); the
    others score by the parity of the completion's character codes, which spreads (most of) their groups."""
    for task in ctx.tasks:
        task.verify = lambda texts, examples: [1.0 if sum(map(ord, e.answer)) % 2 == 0 else float(sum(map(ord, t)) % 2)
                                               for t, e in zip(texts, examples, strict=True)]


def test_dynamic_sampling_replaces_uniform_groups_and_keeps_the_batch_size():
    ctx = step_context(dynamic_sampling=True, max_resample=8)
    half_uniform_rewards(ctx)
    batch, produced = produce(ctx, step=1, policy_version=0)
    m = produced.sampling_metrics
    assert len(produced.examples) == ctx.prompts_per_step == batch.total_prompts
    assert m["dynamic_sampling/missing"] == 0 and m["dynamic_sampling/dropped"] > 0
    assert m["dynamic_sampling/drawn"] == ctx.prompts_per_step + m["dynamic_sampling/dropped"]
    assert not uniform_groups(produced.rewards, produced.rollout.group_ids, ctx.prompts_per_step).any()
    assert produced.rollout.num_sequences == ctx.prompts_per_step * ctx.num_generations
    assert sum(len(c) for c in batch.components) == produced.rollout.num_sequences
    # The rows stay aligned with their texts and rewards after the merge: rescoring gives the same rewards.
    again = [ctx.tasks[0].verify([t], [produced.examples[g]])[0]
             for t, g in zip(produced.texts, produced.rollout.group_ids.tolist(), strict=True)]
    assert again == produced.rewards.tolist()


def test_without_dynamic_sampling_the_uniform_groups_stay():
    ctx = step_context()
    half_uniform_rewards(ctx)
    _, produced = produce(ctx, step=1, policy_version=0)
    assert uniform_groups(produced.rewards, produced.rollout.group_ids, ctx.prompts_per_step).any()
    assert produced.sampling_metrics == {}


def test_dynamic_sampling_stops_with_a_clear_message_when_every_group_stays_uniform():
    ctx = step_context(dynamic_sampling=True, max_resample=2)
    for task in ctx.tasks:
        task.verify = lambda texts, examples: [0.0] * len(texts)
    with pytest.raises(AllGroupsUniform, match=r"all 18 groups drawn over 3 rounds had equal rewards"):
        produce(ctx, step=1, policy_version=0)


def test_a_verifier_that_never_scores_is_not_filtered_away(small_model, tmp_path):
    """Dynamic sampling keeps groups no verifier could score, so the run stops on them as it would without it."""
    reward = tmp_path / "reward.py"
    reward.write_text("def broken(prompts, completions, **kw):\n    raise RuntimeError('grader offline')\n")
    res = cli("train", *tiny_run(small_model), "objective=dapo", "max_steps=6", f"reward={reward}:broken",
              "--output-dir", tmp_path / "run", cwd=tmp_path)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "was unscorable for 3 steps in a row" in res.stderr and "grader offline" in res.stderr


def test_fewer_prompts_than_mini_batches_after_dynamic_sampling_trains_what_is_there():
    ctx = step_context(dynamic_sampling=True, max_resample=0, mini_batches=6)
    half_uniform_rewards(ctx)
    from unigrad.train.step import train_step

    metrics, _ = train_step(ctx, 1)
    kept = ctx.prompts_per_step - metrics["dynamic_sampling/missing"]
    assert 0 < kept < 6 and metrics.get("optimizer_steps", 1.0) == kept


def test_overlong_shaping_reaches_the_advantages_but_not_the_reported_reward():
    ctx = step_context(overlong_buffer=3)  # budget 6 tokens: 4 -> -1/3, 5 -> -2/3, 6 -> -1
    for task in ctx.tasks:
        task.verify = lambda texts, examples: [1.0] * len(texts)
    _, produced = produce(ctx, step=1, policy_version=0)
    lengths = produced.rollout.completion_mask.sum(-1).float()
    penalty = (-(lengths - 3) / 3).clamp(max=0)
    assert (penalty < 0).any() and penalty.unique().numel() > 1  # a random model mostly runs to the budget
    assert produced.rewards.tolist() == [1.0] * len(lengths)  # the verifier's reward, as reported
    want = compute_advantages(1.0 + penalty, produced.rollout.group_ids, "grpo")
    torch.testing.assert_close(produced.all_advantages, want)
    assert produced.sampling_metrics["rewards/overlong_penalty"] == pytest.approx(penalty.mean().item(), abs=1e-6)


def test_a_run_whose_groups_all_stay_uniform_stops_through_the_cli(small_model, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text("def zero(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    res = cli("train", *tiny_run(small_model), "objective=dapo", "rollout.max_resample=1", f"reward={reward}:zero",
              "--output-dir", tmp_path / "run", cwd=tmp_path)
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "had equal rewards" in res.stderr and "rollout.dynamic_sampling=false" in res.stderr


def test_overlong_shaping_leaves_the_demonstration_rows_alone():
    """LUFFY-style guidance: the demonstration in each group is not the model's sample; its length says nothing
    about the budget, so DAPO's length penalty touches the sampled rows only."""
    ctx = step_context(objective="luffy", mode=TrainingMode("in_group"), overlong_buffer=3)  # budget 6 tokens
    for task in ctx.tasks:
        task.verify = lambda texts, examples: [1.0] * len(texts)
    _, produced = produce(ctx, step=1, policy_version=0)
    off = produced.off_policy
    lengths = produced.rollout.completion_mask.sum(-1).float()
    assert off.sum() == ctx.prompts_per_step and (lengths[off] > 3).sum() >= 2  # demonstrations shaping would hit
    penalty = (-(lengths - 3) / 3).clamp(min=-1.0, max=0.0) * ~off
    assert (penalty[~off] < 0).any()
    want = compute_advantages(1.0 + penalty, produced.rollout.group_ids, "grpo")
    torch.testing.assert_close(produced.all_advantages, want)
    assert produced.sampling_metrics["rewards/overlong_penalty"] == pytest.approx(penalty[~off].mean().item(),
                                                                                  abs=1e-6)


def test_each_resample_round_samples_from_new_prompt_streams():
    """Two rounds all uniform, then every group has a contrast: the three rounds' 6 prompts sample from streams
    0-5, 6-11 and 12-17 of the step (seed = step seed * 1_000_003 + stream), none reused."""
    ctx = step_context(dynamic_sampling=True, max_resample=3)
    calls, generate = [], ctx.engine.generate

    def record(prompts, n, sampling):
        calls.append(list(sampling.prompt_seeds))
        return generate(prompts, n, sampling)

    ctx.engine.generate = record
    for task in ctx.tasks:  # rows of a group are consecutive: alternating rewards give each group a contrast
        task.verify = lambda texts, examples: [0.0 if len(calls) < 3 else float(i % 2) for i in range(len(texts))]
    _, produced = produce(ctx, step=4, policy_version=0)
    assert produced.sampling_metrics["dynamic_sampling/rounds"] == 3.0
    assert produced.sampling_metrics["dynamic_sampling/missing"] == 0.0
    step_seed = ctx.seed * 1_000_003 + 4
    streams = [(step_seed * 1_000_003 + k) % 2**63 for k in range(18)]
    assert calls == [streams[0:6], streams[6:12], streams[12:18]]
