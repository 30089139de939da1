"""The compute estimate: by hand for the formula, and from a real step's rollout for the token counts."""

import pytest
from step_helpers import length_rewards, observe, step_context

from unigrad.diagnostics.compute import step_flops
from unigrad.train.step import train_step


def test_step_flops_by_hand():
    # N = 10 params, 7 rollout tokens, 5 trained tokens
    assert step_flops(10, 7, 5) == {"flops/rollout": 140.0, "flops/learner": 300.0}  # 2*10*7; 6*10*5
    # two epochs, four mini-batches: 6*10*5*2 = 600, plus the proximal pass over 3/4 of the tokens: 2*10*3.75 = 75
    assert step_flops(10, 7, 5, epochs=2, mini_batches=4)["flops/learner"] == pytest.approx(675.0)
    # a reference model (beta > 0) adds one forward pass over every trained token: 2*10*5 = 100
    assert step_flops(10, 0, 5, reference=True) == {"flops/rollout": 0.0, "flops/learner": 400.0}
    with pytest.raises(ValueError, match="epochs and mini_batches at least 1"):
        step_flops(10, 7, 5, epochs=0)


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_a_step_counts_its_rollout_and_trained_tokens(mini_batches):
    ctx = step_context(mini_batches=mini_batches)
    length_rewards(ctx)
    seen = observe(ctx)
    metrics, _ = train_step(ctx, 1)
    ro = seen["rollout"]
    n = sum(p.numel() for p in ctx.learner.model.parameters())
    tokens = float(ro.prompt_mask.sum() + ro.completion_mask.sum())  # every row sampled and trained (GRPO)
    assert tokens > 0
    assert metrics["flops/rollout"] == pytest.approx(2 * n * tokens)
    proximal = tokens * (mini_batches - 1) / mini_batches
    assert metrics["flops/learner"] == pytest.approx(6 * n * tokens + 2 * n * proximal)
