"""A whole training step does not depend on how its rows are cut into micro-batches.

The same step (same model, rollouts and rewards) with micro_batch_size 1, 8 and 64 must leave the same parameters,
to float tolerance, for each way demonstrations can enter a step. Normalisers are global to the step and L_max is
the generation budget, so a micro-batch's own size or width must never show in the update."""

from __future__ import annotations

import pytest
import torch
from model_helpers import use_plain_sgd
from step_helpers import length_rewards, step_context

from unigrad.objective import resolve_objective
from unigrad.train.producing.routing import TrainingMode
from unigrad.train.step import train_step

CASES = {
    "grpo": ("grpo", TrainingMode()),
    "dr_grpo": ("dr_grpo", TrainingMode()),
    "hpt": (resolve_objective("dr_grpo", stabiliser="none"), TrainingMode("failed", hpt_gamma=0.5, sft_coef=0.7)),
    "luffy": ("luffy", TrainingMode("in_group")),
    "sft": ("sft", TrainingMode("all")),
}


def params_after_one_step(objective, mode: TrainingMode, micro_batch_size: int) -> tuple[list[torch.Tensor], dict]:
    ctx = step_context(objective=objective, mode=mode, micro_batch_size=micro_batch_size)
    ctx.objective = resolve_objective(objective)
    use_plain_sgd(ctx.learner, 0.5)  # its update is proportional to the gradient (Adam's first step is not)
    length_rewards(ctx)  # rewards that differ within groups: non-zero advantages, and HPT sends some prompts to SFT
    metrics, _ = train_step(ctx, 1)
    return [p.detach().clone() for p in ctx.learner.params], metrics


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batch_size_leaves_the_same_parameters_after_a_step(case):
    objective, mode = CASES[case]
    reference, metrics = params_after_one_step(objective, mode, 64)
    if case == "hpt":
        assert 0 < metrics["hpt/sft_fraction"] < 1  # both components are in the step
    for size in (1, 8):
        params, _ = params_after_one_step(objective, mode, size)
        for p, q in zip(params, reference, strict=True):
            torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
