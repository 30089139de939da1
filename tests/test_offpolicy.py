"""Off-policy updates: mini-batches, the proximal policy, and what changes between objectives once ratios move.

The toy batch of test_learn (two prompts of two rows each, plain SGD, no clipping of the grad norm): with
`mini_batches=2` the first optimizer step trains one prompt's rows at the proximal weights (ratio 1), the second
trains the other prompt's rows after that update, its ratio measured against log-probs taken before any update."""

from __future__ import annotations

import pytest
import torch
from model_helpers import use_plain_sgd as sgd
from test_learn import ADVANTAGES, COMPLETIONS, LR, assert_close, learned_update, row_logprobs, setup

from unigrad.train.learning.learn import LearnSettings, learn
from unigrad.train.learning.plan import mini_batch_prompts
from unigrad.train.lifecycle.distributed import SINGLE

ROWS = {0: [0, 1], 1: [2, 3]}  # the toy's prompts and their rows
EPS = 0.2  # grpo's clip range


def clipped_surrogate(logp: torch.Tensor, proximal: torch.Tensor, advantage: float) -> torch.Tensor:
    """PPO's per-token objective, written out: min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - proximal)."""
    ratio = torch.exp(logp - proximal)
    return torch.minimum(ratio * advantage, ratio.clamp(1 - EPS, 1 + EPS) * advantage)


def test_two_mini_batches_match_two_hand_derived_updates():
    """Update 1: prompt p's rows at theta_0, ratio 1, divided by its own 2 sequences. Update 2: prompt q's rows at
    theta_1, ratio pi_theta1 / pi_theta0 (the proximal log-probs are from before update 1), divided by its 2."""
    model, learner, batch = setup("grpo", temperature=1.0)
    sgd(learner, LR)
    seed = 5
    first, second = (int(p) for p in mini_batch_prompts(2, 2, seed))
    theta0 = [p.detach().clone() for p in model.parameters()]
    proximal = [lp.detach() for lp in row_logprobs(model, 1.0)]

    def step_loss(prompt):
        rows = row_logprobs(model, 1.0)
        return -sum(clipped_surrogate(rows[i], proximal[i], float(ADVANTAGES[i])).mean() for i in ROWS[prompt]) / 2

    model.zero_grad()
    step_loss(first).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    theta1_ratios = torch.cat([torch.exp(row_logprobs(model, 1.0)[i] - proximal[i]) for i in ROWS[second]]).detach()
    model.zero_grad()
    step_loss(second).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    want = [p.detach() - t for p, t in zip(model.parameters(), theta0, strict=True)]
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta0, strict=True):
            p.copy_(t)
    model.zero_grad(set_to_none=True)

    got, metrics = learned_update(model, learner, batch, LearnSettings(micro_batch_size=64, mini_batches=2,
                                                                        shuffle_seed=seed))
    assert_close(got, want)
    assert metrics["optimizer_steps"] == 2.0
    # Ratios: 1 on the first step's tokens, pi_theta1 / pi_theta0 on the second's (what its loss used).
    assert abs(theta1_ratios - 1).max() > 1e-3
    assert metrics["rl/ratio/max"] == pytest.approx(max(1.0, float(theta1_ratios.max())), rel=1e-5)
    assert metrics["rl/ratio/min"] == pytest.approx(min(1.0, float(theta1_ratios.min())), rel=1e-5)


def test_the_second_mini_batch_ratio_is_against_log_probs_from_before_any_update():
    """The proximal log-probs of the second mini-batch's rows come from a pass before the first update: scoring
    them on-policy instead (a fresh detached copy at theta_1) would give ratio 1 there, and every ratio would be 1."""
    model, learner, batch = setup("grpo", temperature=1.0)
    sgd(learner, 5.0)
    _, metrics = learned_update(model, learner, batch, LearnSettings(micro_batch_size=64, mini_batches=2))
    assert metrics["rl/ratio/max"] > 1.01 or metrics["rl/ratio/min"] < 0.99


@pytest.mark.parametrize("mini_batches, epochs, extra_passes", [(1, 1, 0), (1, 2, 0), (2, 1, 1), (2, 2, 1)])
def test_the_proximal_pass_runs_only_where_a_row_is_first_trained_after_an_update(mini_batches, epochs,
                                                                                   extra_passes):
    """One mini-batch: the first optimizer step's own passes give the proximal log-probs (no extra forward). Two:
    the second mini-batch's rows (one prompt here, one micro-batch) are scored once, before the first update."""
    model, learner, batch = setup("grpo", temperature=1.0)
    calls = []
    forward = learner.logprobs

    def counting(mb, temperature):
        calls.append(torch.is_grad_enabled())
        return forward(mb, temperature)

    learner.logprobs = counting
    learned_update(model, learner, batch, LearnSettings(micro_batch_size=64, mini_batches=mini_batches,
                                                        num_iterations=epochs))
    training_passes = epochs * mini_batches  # one micro-batch per mini-batch here
    assert calls.count(True) == training_passes and calls.count(False) == extra_passes


def objective_update(objective: str, mini_batches: int) -> list[torch.Tensor]:
    model, learner, batch = setup(objective, temperature=1.0)
    sgd(learner, 2.0)
    got, _ = learned_update(model, learner, batch, LearnSettings(micro_batch_size=64, mini_batches=mini_batches))
    return got


def test_grpo_gspo_and_sapo_share_the_on_policy_update_and_part_with_mini_batches():
    """One update per batch: the ratio is 1 and GRPO, GSPO and SAPO (same aggregation here) give one gradient. With
    two mini-batches the second step's ratios move and the token clip, the sequence clip and the soft gate differ."""
    def flat(update):
        return torch.cat([u.flatten() for u in update])

    on_policy = {o: flat(objective_update(o, 1)) for o in ("grpo", "gspo", "sapo")}
    torch.testing.assert_close(on_policy["gspo"], on_policy["grpo"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(on_policy["sapo"], on_policy["grpo"], rtol=1e-4, atol=1e-7)
    off_policy = {o: flat(objective_update(o, 2)) for o in ("grpo", "gspo", "sapo")}
    for a, b in (("grpo", "gspo"), ("grpo", "sapo"), ("gspo", "sapo")):
        gap = (off_policy[a] - off_policy[b]).norm() / off_policy[a].norm()
        assert gap > 1e-3, (a, b, float(gap))


def test_mini_batches_deal_whole_prompts_and_reshuffle_from_the_seed():
    pieces = mini_batch_prompts(10, 4, seed=1)
    assert sorted(torch.cat(pieces).tolist()) == list(range(10))
    assert sorted(len(p) for p in pieces) == [2, 2, 3, 3]
    again = mini_batch_prompts(10, 4, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(pieces, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(pieces, mini_batch_prompts(10, 4, seed=2), strict=True))
    assert [p.tolist() for p in mini_batch_prompts(5, 1, seed=3)] == [[0, 1, 2, 3, 4]]  # one: in order
    with pytest.raises(ValueError, match="at least one prompt"):
        mini_batch_prompts(3, 4, seed=0)


def test_with_four_mini_batches_a_training_step_of_grpo_gspo_and_sapo_differs():
    """The same rollouts (same seeds) trained by one step of 6 prompts in 4 mini-batches: the three objectives make
    different updates (with one mini-batch they make the same one, up to rounding)."""
    from step_helpers import length_rewards, step_context

    from unigrad.train.step import train_step

    def update(objective: str, mini_batches: int) -> torch.Tensor:
        ctx = step_context(objective=objective, mini_batches=mini_batches)
        length_rewards(ctx)
        for group in ctx.learner.optimizer.param_groups:  # large steps: the later mini-batches' ratios move far
            group["lr"] = 0.02
        before = torch.cat([p.detach().flatten().clone() for p in ctx.learner.params])
        metrics, _ = train_step(ctx, 1)
        assert metrics.get("optimizer_steps", 1.0) == mini_batches
        return torch.cat([p.detach().flatten() for p in ctx.learner.params]) - before

    one = {o: update(o, 1) for o in ("grpo", "gspo", "sapo")}
    # Adam's first step is about lr * sign(g): a rounding-level gradient difference can move a tiny-gradient element
    # by ~1e-3 of lr (seen: 2e-5 at lr 0.02, depending on the thread count). 5e-3 * lr still catches any real
    # difference, which moves elements by a sizeable share of lr.
    torch.testing.assert_close(one["gspo"], one["grpo"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(one["sapo"], one["grpo"], rtol=1e-3, atol=1e-4)
    four = {o: update(o, 4) for o in ("grpo", "gspo", "sapo")}
    for a, b in (("grpo", "gspo"), ("grpo", "sapo"), ("gspo", "sapo")):
        assert (four[a] - four[b]).norm() > 1e-2 * four[a].norm(), (a, b)


@pytest.mark.parametrize("mini_batches, epochs", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_trained_tokens_are_the_batchs_tokens_however_many_epochs(mini_batches, epochs):
    """rl/tokens counts the batch's completion tokens once (4 + 2 + 3 + 1 in the toy), not once per epoch."""
    model, learner, batch = setup("grpo", temperature=1.0)
    _, metrics = learned_update(model, learner, batch, LearnSettings(micro_batch_size=1, mini_batches=mini_batches,
                                                                     num_iterations=epochs))
    assert metrics.get("optimizer_steps", 1.0) == mini_batches * epochs
    assert metrics["rl/tokens"] == pytest.approx(sum(len(c) for c in COMPLETIONS)) == 10


def record_losses(monkeypatch) -> list:
    """Every `policy_loss` call `learn` makes, in order: (advantages, old log-probs or None), detached copies."""
    import unigrad.train.learning.learn as learn_module

    calls = []
    real = learn_module.policy_loss

    def recording(inputs, obj):
        old = inputs.old_logprobs
        calls.append((inputs.advantages.detach().clone(), None if old is None else old.detach().clone()))
        return real(inputs, obj)

    monkeypatch.setattr(learn_module, "policy_loss", recording)
    return calls


@pytest.mark.parametrize("mini_batches, epochs", [(2, 2), (1, 3)])
def test_the_proximal_log_probs_stay_those_of_the_first_weights_at_the_sampling_temperature(mini_batches, epochs,
                                                                                           monkeypatch):
    """Every optimizer step after the first, in every epoch, measures its ratio against the log-probs of the weights
    before the batch's first update, under the sampling temperature (0.7): computed here row by row, by hand, before
    `learn` runs. Large SGD steps make later weights' log-probs far from those."""
    temperature = 0.7
    model, learner, batch = setup("grpo", temperature=temperature)
    sgd(learner, 5.0)
    want = [lp.detach() for lp in row_logprobs(model, temperature)]
    calls = record_losses(monkeypatch)
    _, metrics = learned_update(model, learner, batch, LearnSettings(micro_batch_size=64, mini_batches=mini_batches,
                                                                     num_iterations=epochs))
    assert len(calls) == epochs * mini_batches  # one micro-batch per mini-batch
    checked = 0
    for advantages, old in calls:
        if old is None:  # the first optimizer step's own pass is the proximal one
            continue
        for b, a in enumerate(advantages.tolist()):
            row = ADVANTAGES.tolist().index(a)
            torch.testing.assert_close(old[b, :len(want[row])], want[row], atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked == (epochs * mini_batches - 1) * 4 // mini_batches  # every pass but the first
    after = [lp.detach() for lp in row_logprobs(model, temperature)]
    assert max(float((a - w).abs().max()) for a, w in zip(after, want, strict=True)) > 1e-2  # the weights moved


def toy_prompts_batch(num_prompts: int):
    """`num_prompts` prompts of two rows each for `learn`, each row with its own advantage (which identifies it)."""
    from unigrad.objective import batch_normalisers, resolve_objective
    from unigrad.train.batch import Batch, LossComponent
    from unigrad.train.learning.batching import pad_pairs

    model, learner, _ = setup("grpo", temperature=1.0)
    prompts = [[3 + p, 7, 9] for p in range(num_prompts) for _ in range(2)]
    completions = [[11 + r % 5, 12, 2] for r in range(2 * num_prompts)]
    advantages = torch.tensor([(r + 1) * (-1.0) ** r / 10 for r in range(2 * num_prompts)])
    sequences = pad_pairs(prompts, completions, 0)
    obj = resolve_objective("grpo")
    comp = LossComponent("rl", sequences, advantages, torch.arange(num_prompts).repeat_interleave(2), obj, 1.0,
                         batch_normalisers(sequences.completion_mask, obj),
                         infer_logprobs=torch.zeros(sequences.completion_ids.shape))
    batch = Batch([comp], torch.zeros(num_prompts, dtype=torch.long), torch.zeros(num_prompts, dtype=torch.long), 10,
                  1.0, 0)
    return model, learner, batch, advantages


def dealt_prompts(seed: int, monkeypatch, epochs: int = 3) -> list[list[frozenset[int]]]:
    """The prompts each optimizer step of `learn` trains (6 prompts in 3 mini-batches), per epoch."""
    model, learner, batch, advantages = toy_prompts_batch(6)
    calls = record_losses(monkeypatch)
    learn(batch, learner, LearnSettings(micro_batch_size=64, mini_batches=3, num_iterations=epochs,
                                        shuffle_seed=seed), SINGLE)
    assert len(calls) == 3 * epochs  # one micro-batch per mini-batch
    rows = [[advantages.tolist().index(a) for a in adv.tolist()] for adv, _ in calls]
    steps = [frozenset(i // 2 for i in r) for r in rows]  # row i answers prompt i // 2
    assert all(len(r) == 2 * len(p) for r, p in zip(rows, steps, strict=True))  # a prompt's rows stay together
    return [steps[3 * e:3 * e + 3] for e in range(epochs)]


def test_each_epoch_deals_the_prompts_into_mini_batches_anew_and_the_seed_fixes_the_deals(monkeypatch):
    deals = dealt_prompts(7, monkeypatch)
    for epoch in deals:
        assert sorted(p for piece in epoch for p in piece) == list(range(6)) and all(len(p) == 2 for p in epoch)
    assert deals[0] != deals[1] and deals[1] != deals[2] and deals[0] != deals[2]
    assert dealt_prompts(7, monkeypatch) == deals  # the same seed: the same deals
    assert dealt_prompts(8, monkeypatch) != deals
