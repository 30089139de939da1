"""HPT's switch and its components' coefficients, the task sampler's determinism and resumption, and loss-metric
merging."""

import math
from collections import Counter

import pytest
import torch

from unigrad.data.samplers import TaskSampler, systematic_draw
from unigrad.objective.hybrid import hpt_switch, prompt_success_rate
from unigrad.train.learning.metrics import merge_loss_metrics

NAN = float("nan")


def rewards_for(successes, n=8):
    return torch.tensor([1.0] * successes + [0.0] * (n - successes))


def test_gamma_zero_sends_only_all_fail_prompts_to_sft():
    rewards = torch.cat([rewards_for(0), rewards_for(1), rewards_for(8)])
    groups = torch.arange(3).repeat_interleave(8)
    assert hpt_switch(rewards, groups, 3, gamma=0.0).tolist() == [True, False, False]


def test_gamma_two_eighths_includes_exactly_two_successes():
    rewards = torch.cat([rewards_for(2), rewards_for(3)])
    groups = torch.arange(2).repeat_interleave(8)
    assert hpt_switch(rewards, groups, 2, gamma=2 / 8).tolist() == [True, False]


def test_unscorable_rollouts_are_left_out_and_all_unscorable_goes_to_sft():
    rewards = torch.tensor([NAN, 1.0, 0.0, 0.0, NAN, NAN])
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    p = prompt_success_rate(rewards, groups, 3)
    assert p[0].item() == pytest.approx(0.5) and p[1].item() == 0.0 and torch.isnan(p[2])
    assert hpt_switch(rewards, groups, 3, gamma=0.0).tolist() == [False, True, True]


def test_sampler_is_deterministic_and_resumes_exactly():
    a = TaskSampler([5, 3, 7], seed=11)
    b = TaskSampler([5, 3, 7], seed=11)
    assert a.sample(20) == b.sample(20)
    state = a.state_dict()
    expected = a.sample(30)
    c = TaskSampler([5, 3, 7], seed=999)
    c.load_state_dict(state)
    assert c.sample(30) == expected


def test_sampler_covers_each_pool_before_repeating():
    s = TaskSampler([4], seed=0)
    first = [i for _, i in s.sample(4)]
    assert sorted(first) == [0, 1, 2, 3]


def test_sampler_weights_and_errors():
    s = TaskSampler([10, 10], seed=0, weights=[1.0, 0.0])
    assert {t for t, _ in s.sample(50)} == {0}
    with pytest.raises(ValueError, match="non-negative"):
        TaskSampler([1, 1], weights=[1.0])
    with pytest.raises(ValueError, match="at least one training prompt"):
        TaskSampler([3, 0])


def test_merge_loss_metrics_sums_losses_and_weights_fractions_by_tokens():
    merged = merge_loss_metrics([
        {"rl/loss": 0.25, "rl/clip/region_fraction": 0.5, "rl/ratio/max": 1.1, "rl/tokens": 10.0},
        {"rl/loss": 0.5, "rl/clip/region_fraction": 0.0, "rl/ratio/max": 1.3, "rl/tokens": 30.0},
        {"sft/loss": 2.0, "sft/tokens": 5.0},
    ])
    assert merged["rl/loss"] == pytest.approx(0.75)
    assert merged["rl/clip/region_fraction"] == pytest.approx(0.125)
    assert merged["rl/ratio/max"] == pytest.approx(1.3)
    assert merged["rl/tokens"] == 40.0
    assert merged["loss"] == pytest.approx(2.75)


@pytest.mark.parametrize("probs", [[0.2, 0.2, 0.2, 0.2, 0.2], [0.55, 0.3, 0.15], [0.0, 0.7, 0.0, 0.3, 0.0]])
def test_systematic_draw_gives_floor_or_ceil_counts_and_is_unbiased(probs):
    k = 16
    grid = 4000  # u on a fine grid: the mean count over u must be k * p_t
    mean = [0.0] * len(probs)
    for j in range(grid):
        tasks = systematic_draw(probs, k, (j + 0.5) / grid)
        assert len(tasks) == k
        for t, p in enumerate(probs):
            n = tasks.count(t)
            assert math.floor(k * p + 1e-9) <= n <= math.ceil(k * p - 1e-9), (t, n)
            mean[t] += n / grid
    assert mean == pytest.approx([k * p for p in probs], abs=1e-2)


def test_stratified_sampler_deals_even_counts_and_independent_does_not():
    stratified = TaskSampler([100] * 4, seed=3)
    independent = TaskSampler([100] * 4, seed=3, draw="independent")
    uneven = 0
    for _ in range(20):
        assert sorted(Counter(t for t, _ in stratified.sample(16)).values()) == [4, 4, 4, 4]
        uneven += sorted(Counter(t for t, _ in independent.sample(16)).values()) != [4, 4, 4, 4]
    assert uneven > 10  # multinomial counts are rarely exactly even
    with pytest.raises(ValueError, match="unknown draw"):
        TaskSampler([1], draw="poisson")


def test_a_checkpoint_of_a_balanced_run_resumes_with_the_uniform_sampler_it_now_is():
    # Before gradients.combine, `balanced` and `pcgrad` were sampler names, saved in the sampler's checkpoint state.
    from unigrad.data.samplers import TaskSampler

    before = TaskSampler([5, 7], seed=3, names=["a", "b"])
    before.sample(4)
    state = {**before.state_dict(), "name": "balanced"}
    after = TaskSampler([5, 7], seed=0, names=["a", "b"])
    after.load_state_dict(state)
    assert after.sample(6) == before.sample(6)
    with pytest.raises(ValueError, match="'size' sampler"):
        after.load_state_dict({**state, "name": "size"})


def test_from_config_gives_each_component_its_own_coefficient():
    """HPT: hybrid.rl_coef weighs the RL component, hybrid.sft_coef the SFT one. LUFFY trains sampled and
    demonstration rows in one RL loss, unweighted (the hybrid coefficients are HPT's); objective=sft weighs its only
    component by hybrid.sft_coef."""
    from unigrad.config import load_config
    from unigrad.train.producing.routing import TrainingMode

    coefs = ["hybrid.rl_coef=0.3", "hybrid.sft_coef=0.7"]
    hpt = TrainingMode.from_config(load_config(None, ["objective=hpt", "hybrid.gamma=0.25", *coefs]))
    assert (hpt.demonstrations, hpt.hpt_gamma, hpt.rl_coef, hpt.sft_coef) == ("failed", 0.25, 0.3, 0.7)
    luffy = TrainingMode.from_config(load_config(None, ["objective=luffy"]))
    assert (luffy.demonstrations, luffy.rl_coef) == ("in_group", 1.0)
    sft = TrainingMode.from_config(load_config(None, ["objective=sft", "hybrid.sft_coef=0.7"]))
    assert (sft.demonstrations, sft.sft_coef) == ("all", 0.7)


@pytest.mark.parametrize("objective, keys, refused", [
    ("luffy", ["hybrid.rl_coef=0.3", "hybrid.sft_coef=0.7"], "hybrid.rl_coef, hybrid.sft_coef: objective='luffy'"),
    ("sft", ["hybrid.gamma=0.25"], "hybrid.gamma: objective='sft' ignores it"),
    ("grpo", ["hybrid.sft_coef=0.5"], "hybrid.sft_coef: objective='grpo' ignores it"),
    ("grpo", ["hybrid.rl_objective=grpo"], "hybrid.rl_objective: objective='grpo'"),
    ("hpt", ["hybrid.gamma=0.25", "hybrid.rl_coef=0.3", "hybrid.sft_coef=0.7", "hybrid.rl_objective=grpo"], None),
    ("sft", ["hybrid.sft_coef=0.7"], None),
    ("grpo", ["hybrid.gamma=0.0", "hybrid.rl_coef=1.0"], None)])  # the defaults, as a saved config writes them
def test_hybrid_keys_an_objective_would_ignore_are_refused(objective, keys, refused):
    """HPT's switch (gamma), its RL part and weights act with objective=hpt; sft_coef also weighs objective=sft's
    loss. Any other hybrid.* key would be ignored without a word."""
    from unigrad.config import ConfigError, load_config

    if refused is None:
        load_config(None, [f"objective={objective}", *keys])
        return
    with pytest.raises(ConfigError, match=refused.replace("(", r"\(")):
        load_config(None, [f"objective={objective}", *keys])


def tempered_row_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(y_t | prompt, y_<t) of one row run alone (temperature 1), with grad."""
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_hpt_weighs_its_rl_and_sft_losses_by_their_own_coefficients():
    """Two prompts of two sampled rows: prompt 0's rewards (0, 0) have mean 0 <= gamma = 0, so it goes to SFT on its
    demonstration; prompt 1's (1, 0) stay with RL, Dr. GRPO advantages (0.5, -0.5). With rl_coef = 0.3 and
    sft_coef = 0.7 (from the config) the update of one plain SGD step is -lr (0.3 grad L_rl + 0.7 grad L_sft), with
        L_rl  = -(1 / (N L_max)) sum_i A_i sum_t log pi(y_it)   over prompt 1's N = 2 rows, L_max = 10 (Dr. GRPO,
                                                                on-policy: the ratio is 1, its gradient grad log pi)
        L_sft = -(1 / |d|) sum_t log pi(d_t)                    d: prompt 0's demonstration, its tokens and EOS."""
    from model_helpers import use_plain_sgd
    from step_helpers import small_char_llama

    from unigrad.config import OptimSection, load_config
    from unigrad.models.tokenizer import build_char_tokenizer
    from unigrad.rollout.base import Rollout
    from unigrad.tasks.base import Example
    from unigrad.train.batch import Batch
    from unigrad.train.learning.batching import pad_pairs
    from unigrad.train.learning.learn import LearnSettings, learn
    from unigrad.train.learning.learner import Learner
    from unigrad.train.lifecycle.distributed import SINGLE
    from unigrad.train.producing.routing import ScoredRows, TrainingMode, route

    cfg = load_config(None, ["objective=hpt", "hybrid.rl_coef=0.3", "hybrid.sft_coef=0.7"])
    tok = build_char_tokenizer(model_max_length=256)
    model, lr = small_char_llama(tok, seed=3), 0.05
    learner = Learner(model, OptimSection(lr=lr, max_grad_norm=1e9, weight_decay=0.0, schedule="constant"))
    use_plain_sgd(learner, lr)  # update = -lr * gradient
    prompts, completions = [[3, 7, 9], [3, 7, 9], [5, 4], [5, 4]], [[11, 12, 13, 2], [14, 2], [15, 16, 2], [17, 2]]
    rows = pad_pairs(prompts, completions, tok.pad_token_id)
    ro = Rollout(rows.prompt_ids, rows.prompt_mask, rows.completion_ids, rows.completion_mask,
                 torch.zeros(rows.completion_ids.shape), torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.bool))
    examples = [Example("q0", "12", "12", "t"), Example("q1", "7", "7", "t")]
    advantages = torch.tensor([0.0, 0.0, 0.5, -0.5])
    scored = ScoredRows(examples, [[3, 7, 9], [5, 4]], ro, torch.zeros(4, dtype=torch.bool),
                        torch.tensor([0.0, 0.0, 1.0, 0.0]), advantages)
    routed = route(TrainingMode.from_config(cfg), cfg.resolved_objective(), scored, tok)
    assert routed.sft_prompt.tolist() == [True, False] and [c.name for c in routed.components] == ["rl", "sft"]
    batch = Batch(routed.components, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 10, 1.0, 0)

    demo = tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    start = [p.detach().clone() for p in model.parameters()]
    l_rl = -sum(a * tempered_row_logprobs(model, prompts[i], completions[i]).sum()
                for i, a in ((2, 0.5), (3, -0.5))) / (2 * 10)
    l_sft = -tempered_row_logprobs(model, [3, 7, 9], demo).mean()
    (0.3 * l_rl + 0.7 * l_sft).backward()
    want = [-lr * p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    metrics = learn(batch, learner, LearnSettings(micro_batch_size=64), SINGLE)
    for p, s, w in zip(model.parameters(), start, want, strict=True):
        torch.testing.assert_close(p.detach() - s, w, atol=1e-7, rtol=1e-4)
    rl_value = -(0.5 * 3 - 0.5 * 2) / 20  # the ratio is 1: -(1 / (N L_max)) sum_i A_i |y_i|
    assert metrics["rl/loss"] == pytest.approx(rl_value, abs=1e-6)
    assert metrics["sft/loss"] == pytest.approx(l_sft.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(0.3 * rl_value + 0.7 * l_sft.item(), rel=1e-5)
