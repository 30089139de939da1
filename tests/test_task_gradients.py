"""Per-task gradient accounting: the maths on known vectors, and the real step's g_k
against a from-scratch computation on a real (random, tiny) Llama."""

import math

import pytest
import torch
from step_helpers import flat_grad, length_rewards, observe, replayed_picks, step_context

from unigrad.config import OptimSection
from unigrad.diagnostics.task_gradients import TaskGradients, balanced_sum, task_gradient_stats
from unigrad.objective import batch_normalisers, compute_advantages, compute_policy_loss
from unigrad.rollout.logprobs import sequence_logprobs
from unigrad.train.learning.learner import Learner
from unigrad.train.step import decode_completions, train_step


def test_stats_on_vectors_with_a_known_answer():
    # task a: halves (1,0) and (1,0), 1 row each -> g_a = (2,0); task b: (0,1) and (0,2), 2 + 1 rows -> g_b = (0,3)
    halves = {"a": (torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])),
              "b": (torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0]))}
    m = task_gradient_stats(halves, {"a": (1, 1), "b": (2, 1)})
    # g = (2, 3), ||g||^2 = 13
    assert m["grad/a/sq_norm"] == pytest.approx(4.0) and m["grad/b/sq_norm"] == pytest.approx(9.0)
    assert m["grad/a/cross_sq_norm"] == pytest.approx(1.0 * 4 / 1)  # <A,B> * n^2 / (nA nB)
    assert m["grad/b/cross_sq_norm"] == pytest.approx(2.0 * 9 / 2)
    assert m["grad/a/cos"] == pytest.approx(4 / math.sqrt(4 * 13))
    assert m["grad/b/cos"] == pytest.approx(9 / math.sqrt(9 * 13))
    assert m["grad/a/share"] + m["grad/b/share"] == pytest.approx(1.0)
    assert m["grad/a/share"] == pytest.approx(4 / 13)
    assert m["grad/sq_norm_ratio"] == pytest.approx(9 / 4)


def test_cross_estimate_is_unbiased_for_the_noise_free_norm():
    # Rows are mean + noise; the cross estimate's average over draws approaches ||E g||^2 while
    # ||g||^2 stays biased upward by the noise.
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.3, -0.2, 0.1])
    cross, plain = [], []
    for _ in range(4000):
        rows = mean + torch.randn(8, 3, generator=gen)
        a, b = rows[:4].sum(0) / 8, rows[4:].sum(0) / 8
        m = task_gradient_stats({"t": (a, b)}, {"t": (4, 4)})
        cross.append(m["grad/t/cross_sq_norm"])
        plain.append(m["grad/t/sq_norm"])
    truth = float(mean @ mean)  # 0.14
    assert sum(cross) / len(cross) == pytest.approx(truth, abs=0.03)
    assert sum(plain) / len(plain) > truth + 0.25  # + trace(cov)/n = 3/8


def test_balanced_sum_rescales_each_task_to_a_common_norm():
    g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.zeros(2)}
    out = balanced_sum(g)  # mean of non-zero norms = 3
    assert torch.allclose(out, torch.tensor([3 * 0.6, 3 * 0.8 + 3.0]))
    assert torch.allclose(balanced_sum(g, target=1.0), torch.tensor([0.6, 1.8]))


def test_step_task_gradients_sum_to_g_and_match_a_from_scratch_computation():
    # Rewards on a random model are mostly 0; give the step something to learn from by using a
    # reward that depends on the completion, so every task has non-zero advantages.
    ctx = step_context(task_gradients=True)
    length_rewards(ctx)
    seen = observe(ctx)
    state = {k: v.clone() for k, v in ctx.learner.model.state_dict().items()}
    metrics, _ = train_step(ctx, 1)
    g = seen["grad"]
    per_task = ctx.task_gradients.last
    assert set(per_task) <= {"arithmetic", "countdown", "table_qa"} and len(per_task) >= 2
    assert torch.allclose(sum(per_task.values()), g, atol=1e-6, rtol=1e-5)

    # From scratch: the start weights, one full-batch forward, the loss of task k's rows only, with
    # the step's global normalisers.
    ro = seen["rollout"]
    model = ctx.learner.model
    model.load_state_dict(state)
    picks = replayed_picks(ctx)
    picks_task = torch.tensor([picks[g][0] for g in ro.group_ids.tolist()])
    texts = decode_completions(ctx.tokenizer, ro)
    rewards = torch.tensor([float(len(t) % 3 == 0) for t in texts])
    adv = compute_advantages(rewards, ro.group_ids, "grpo")
    norm = batch_normalisers(ro.completion_mask, ctx.objective)
    for name, gk in per_task.items():
        model.zero_grad(set_to_none=True)
        rows = picks_task == [t.name for t in ctx.tasks].index(name)
        logp = sequence_logprobs(model, ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows],
                                    ro.completion_mask[rows], temperature=1.0)
        out = compute_policy_loss(logp, ro.completion_mask[rows], adv[rows], ctx.objective,
                                  max_length=6, num_tokens=norm.num_tokens, num_sequences=norm.num_sequences)
        out.loss.backward()
        scratch = flat_grad(ctx.learner.params)
        assert torch.allclose(gk, scratch, atol=1e-6, rtol=1e-4), name
        assert metrics[f"grad/{name}/sq_norm"] == pytest.approx(float(scratch @ scratch), rel=1e-4)
    assert sum(metrics[f"grad/{k}/share"] for k in per_task) == pytest.approx(1.0, abs=1e-5)


def _one_step_then_rewind(objective: str, **fields):
    """One accounted step of `objective` with length rewards; then the model back at the step's starting weights,
    and the step's rollout, each row's task and its GRPO advantage, recomputed independently."""
    ctx = step_context(task_gradients=True, objective=objective, **fields)
    length_rewards(ctx)
    seen = observe(ctx)
    state = {k: v.clone() for k, v in ctx.learner.model.state_dict().items()}
    metrics, _ = train_step(ctx, 1)
    ro, model = seen["rollout"], ctx.learner.model
    model.load_state_dict(state)
    picks = replayed_picks(ctx)
    picks_task = torch.tensor([picks[g][0] for g in ro.group_ids.tolist()])
    rewards = torch.tensor([float(len(t) % 3 == 0) for t in decode_completions(ctx.tokenizer, ro)])
    return ctx, seen, metrics, ro, model, picks_task, compute_advantages(rewards, ro.group_ids, "grpo")


@pytest.mark.parametrize("objective", ["grpo", "cispo"])  # sequence-mean and token-mean aggregation
def test_own_normaliser_norms_match_each_task_loss_divided_by_its_own_counts(objective):
    """grad/<task>/sq_norm_own is the squared norm of task k's loss with task k's own normaliser (its sequences, or
    its tokens for token-mean), computed from scratch here."""
    from unigrad.objective import resolve_objective

    ctx, seen, metrics, ro, model, picks_task, adv = _one_step_then_rewind(objective)
    assert resolve_objective(objective).aggregation == ("token_mean" if objective == "cispo" else
                                                          "seq_mean_token_mean")
    own = {}
    for name in ctx.task_gradients.last:
        model.zero_grad(set_to_none=True)
        rows = picks_task == [t.name for t in ctx.tasks].index(name)
        norm = batch_normalisers(ro.completion_mask[rows], ctx.objective)  # this task's rows only
        logp = sequence_logprobs(model, ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows],
                                 ro.completion_mask[rows], temperature=1.0)
        compute_policy_loss(logp, ro.completion_mask[rows], adv[rows], ctx.objective, max_length=6,
                            num_tokens=norm.num_tokens, num_sequences=norm.num_sequences).loss.backward()
        scratch = flat_grad(ctx.learner.params)
        own[name] = float(scratch @ scratch)
        assert metrics[f"grad/{name}/sq_norm_own"] == pytest.approx(own[name], rel=1e-4), name
    assert metrics["grad/sq_norm_ratio_own"] == pytest.approx(max(own.values()) / min(own.values()), rel=1e-4)


@pytest.mark.parametrize("objective", ["grpo", "cispo"])  # sequence-mean and token-mean aggregation
def test_per_sample_gradient_norms_from_scratch(objective):
    """grad/<task>/sample_sq_norm is the mean over the measured rows of ||A_i grad (1/|y_i|) sum_t log p_t||^2: one
    row's loss over its own normaliser (for one row, its sequence or its tokens give the same 1/|y_i|), at the step's
    starting weights, where every ratio is 1. Computed here without the objective code. The update is unchanged."""
    from unigrad.train.learning.learn import sample_rows

    wanted = 2
    ctx, seen, metrics, ro, model, picks_task, adv = _one_step_then_rewind(objective, sample_gradients=wanted)
    means = {}
    for k, task in enumerate(ctx.tasks):
        rows = sample_rows(torch.nonzero((picks_task == k) & (adv != 0)).flatten(), wanted)
        if not len(rows):
            assert f"grad/{task.name}/sample_sq_norm" not in metrics
            continue
        norms = []
        for i in rows.tolist():
            model.zero_grad(set_to_none=True)
            logp = sequence_logprobs(model, ro.prompt_ids[i:i + 1], ro.prompt_mask[i:i + 1],
                                     ro.completion_ids[i:i + 1], ro.completion_mask[i:i + 1], temperature=1.0)
            mask = ro.completion_mask[i:i + 1].float()
            (-adv[i] * (logp * mask).sum() / mask.sum()).backward()
            g = flat_grad(ctx.learner.params)
            norms.append(float(g @ g))
        means[task.name] = sum(norms) / len(norms)
        assert metrics[f"grad/{task.name}/sample_sq_norm"] == pytest.approx(means[task.name], rel=1e-4), task.name
    assert len(means) >= 2
    assert metrics["grad/sample_sq_norm_ratio"] == pytest.approx(max(means.values()) / min(means.values()), rel=1e-4)
    plain = step_context(task_gradients=True, objective=objective)  # the measurement leaves the update alone
    length_rewards(plain)
    seen_plain = observe(plain)
    train_step(plain, 1)
    assert torch.equal(seen_plain["grad"], seen["grad"])


def test_sample_rows_spread_over_the_candidates():
    from unigrad.train.learning.learn import sample_rows

    assert sample_rows(torch.arange(10, 20), 3).tolist() == [10, 14, 19]  # positions 0, 4.5 -> 4 (half to even), 9
    assert sample_rows(torch.arange(4), 9).tolist() == [0, 1, 2, 3]
    assert sample_rows(torch.arange(5), 1).tolist() == [0]


def test_accounting_does_not_change_the_update():
    grads = []
    for on in (False, True):
        ctx = step_context(task_gradients=on)
        length_rewards(ctx)
        seen = observe(ctx)
        train_step(ctx, 1)
        grads.append(seen["grad"])
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_collect_twice_into_the_same_half_accumulates():
    p = torch.nn.Parameter(torch.zeros(2))
    acc = TaskGradients([p])
    p.grad = torch.tensor([1.0, 0.0])
    acc.collect("a", 0, 1)
    assert p.grad is None
    p.grad = torch.tensor([0.0, 2.0])
    acc.collect("a", 0, 1)
    p.grad = torch.tensor([1.0, 1.0])
    acc.collect("a", 1, 2)
    m = acc.finish()
    assert torch.allclose(p.grad, torch.tensor([2.0, 3.0]))
    assert m["grad/a/cross_sq_norm"] == pytest.approx(3.0 * 16 / 4)


def test_a_nonfinite_gradient_skips_the_step_and_leaves_everything_untouched():
    ctx = step_context(task_gradients=False)
    learner = ctx.learner
    before = [p.detach().clone() for p in learner.params]
    learner.params[0].grad = torch.full_like(learner.params[0], float("nan"))
    norm, status = learner.clip_and_step()
    assert status == "nonfinite" and math.isnan(norm)
    assert all(torch.equal(a, p) for a, p in zip(before, learner.params, strict=True))
    assert learner.optimizer.state_dict()["state"] == {} and all(p.grad is None for p in learner.params)
    learner.params[0].grad = torch.full_like(learner.params[0], 100.0)
    assert learner.clip_and_step(grad_norm_cap=80.0)[1] == "grad_cap"
    assert all(torch.equal(a, p) for a, p in zip(before, learner.params, strict=True))
    learner.params[0].grad = torch.full_like(learner.params[0], 1e-3)
    assert learner.clip_and_step(grad_norm_cap=80.0)[1] == "ok"
    assert not torch.equal(before[0], learner.params[0])


def test_balanced_updates_reach_the_optimizer():
    ctx = step_context(task_gradients=True)
    ctx.task_gradients = TaskGradients(ctx.learner.params, balance=True)
    length_rewards(ctx)
    seen = observe(ctx)
    metrics, _ = train_step(ctx, 1)
    per_task = ctx.task_gradients.last
    live = [g for g in per_task.values() if float(g.norm()) > 0]
    assert len(live) >= 2
    assert torch.allclose(seen["grad"], balanced_sum(per_task), atol=1e-6, rtol=1e-5)
    c = sum(float(g.norm()) for g in live) / len(live)
    assert not torch.allclose(seen["grad"], sum(per_task.values()))  # rescaling changed the update
    assert float(seen["grad"].norm()) <= len(live) * c + 1e-5


def test_pcgrad_projects_only_conflicting_pairs_by_hand():
    from unigrad.diagnostics.task_gradients import projected_sum

    g = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0, 1.0]), "c": torch.tensor([0.0, 2.0])}
    # a.b = -1 < 0: a -> a - (-1/2) b = (0.5, 0.5); a.c = 0: no projection.
    # b.a = -1 < 0: b -> b - (-1/1) a = (0, 1); b.c = 2 > 0 (original b), and (0,1).c > 0: untouched.
    # c conflicts with nobody: (0, 2).  Sum: (0.5, 3.5).
    assert torch.allclose(projected_sum(g), torch.tensor([0.5, 3.5]))
    aligned = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0, 0.5])}
    assert torch.allclose(projected_sum(aligned), torch.tensor([3.0, 1.5]))  # no conflict: the plain sum
    with pytest.raises(ValueError):
        TaskGradients([], balance=True, project=True)


def test_learner_optimizer_step_equals_plain_adamw():
    """The learner's (fused where available) AdamW makes the same update as torch's default AdamW."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    start = a.weight.detach().clone()
    optim = OptimSection(lr=1e-2, weight_decay=0.1, max_grad_norm=100.0, schedule="constant")
    learner = Learner(a, optim)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(optim.beta1, optim.beta2), weight_decay=0.1)
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        a(x).pow(2).sum().backward()
        b(x).pow(2).sum().backward()
        learner.clip_and_step()
        plain.step()
        plain.zero_grad()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert (a.weight - start).abs().min() > 1e-3  # every weight moved


def test_steps_without_halves_give_the_same_task_gradients_and_no_cross_term():
    """cross_every=2: step 2 groups rows by task only; its g_k equal those of a run that splits every step."""
    runs = {}
    for every in (1, 2):
        ctx = step_context(task_gradients=True)
        ctx.task_gradients = TaskGradients(ctx.learner.params, cross_every=every)
        length_rewards(ctx)
        out = [train_step(ctx, step)[0] for step in (1, 2)]
        runs[every] = (out, dict(ctx.task_gradients.last))
    (split, g_split), (grouped, g_grouped) = runs[1], runs[2]
    assert g_split.keys() == g_grouped.keys()
    for name in g_split:
        torch.testing.assert_close(g_grouped[name], g_split[name], atol=1e-6, rtol=1e-4)
        assert grouped[1][f"grad/{name}/sq_norm"] == pytest.approx(split[1][f"grad/{name}/sq_norm"], rel=1e-4)
        assert math.isnan(grouped[1][f"grad/{name}/cross_sq_norm"])
    assert any(math.isfinite(split[1][f"grad/{name}/cross_sq_norm"]) for name in g_split)
    assert any(math.isfinite(grouped[0][f"grad/{name}/cross_sq_norm"]) for name in g_split)  # step 1 splits
    assert [TaskGradients([], cross_every=4).splits_halves(s) for s in range(1, 7)] == [1, 0, 0, 0, 1, 0]
    assert not TaskGradients([], cross_every=0).splits_halves(1)


def test_sample_gradients_config_needs_task_gradients():
    from unigrad.config import validate_config

    with pytest.raises(ValueError, match="diagnostics.sample_gradients > 0 needs diagnostics.task_gradients"):
        validate_config({"diagnostics": {"sample_gradients": 2, "task_gradients": False}})
    assert validate_config({"diagnostics": {"sample_gradients": 2}}).diagnostics.sample_gradients == 2


# Three tasks, fixed order a, b, c; |a|^2 = 2, |b|^2 = 2, |c|^2 = 5; a.b = -1, a.c = -1, b.c = -2 (all conflict).
PC_A, PC_B, PC_C = [1.0, 1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, -1.0, -2.0]
# PCGrad (arXiv 2001.06782), each g_k' projected against the other tasks' original gradients in order, the dot
# product taken with the already-projected g_k':
#   a: a.b = -1 -> a' = a + (1/2) b = (0.5, 1, 0.5);     a'.c = -2   -> a'' = a' + (2/5) c   = (0.5, 0.6, -0.3)
#   b: b.a = -1 -> b' = b + (1/2) a = (-0.5, 0.5, 1);    b'.c = -2.5 -> b'' = b' + (1/2) c   = (-0.5, 0, 0)
#   c: c.a = -1 -> c' = c + (1/2) a = (0.5, -0.5, -2);   c'.b = -2.5 -> c'' = c' + (5/4) b   = (-0.75, -0.5, -0.75)
# Their sum is (-0.75, 0.1, -1.05). (With the original g_k in the second dot product instead: a'.c -> a.c = -1,
# b'.c -> -2, c'.b -> -2, giving (0.5, 0.8, 0.1), (-0.5, 0.1, 0.2), (-0.5, -0.5, -1) and the sum (-0.5, 0.4, -0.7).)
PC_PROJECTED = [[0.5, 0.6, -0.3], [-0.5, 0.0, 0.0], [-0.75, -0.5, -0.75]]
PC_SUM = [-0.75, 0.1, -1.05]


def test_pcgrad_projects_each_task_gradient_as_already_projected_by_hand():
    from unigrad.diagnostics.task_gradients import gram, projected_coefficients, projected_sum

    vectors = [torch.tensor(v, dtype=torch.float64) for v in (PC_A, PC_B, PC_C)]
    coefficients = projected_coefficients(gram(vectors))  # row k: g_k' as a combination of the original g_l
    torch.testing.assert_close(coefficients @ torch.stack(vectors), torch.tensor(PC_PROJECTED, dtype=torch.float64))
    got = projected_sum(dict(zip("abc", vectors, strict=True)))
    torch.testing.assert_close(got, torch.tensor(PC_SUM, dtype=torch.float64))


def test_pcgrad_finish_writes_the_sum_of_the_projected_gradients_into_grad():
    """Two parameters (2 + 1 entries); task a's gradient arrives in two halves, b's and c's in one. `finish()` puts
    the sum of the hand-projected gradients into `.grad`, not the plain sum (0, 0, -1) nor any other combination."""
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    acc = TaskGradients([p, q], project=True)
    for task, half, vector in (("a", 0, [1.0, 0.0, 0.0]), ("a", 1, [0.0, 1.0, 0.0]), ("b", 0, PC_B), ("c", 0, PC_C)):
        p.grad, q.grad = torch.tensor(vector[:2]), torch.tensor(vector[2:])
        acc.collect(task, half, 1)
    metrics = acc.finish()
    torch.testing.assert_close(torch.cat([p.grad, q.grad]), torch.tensor(PC_SUM))
    assert metrics["grad/a/sq_norm"] == pytest.approx(2.0)  # the metrics stay those of the unprojected g_k
    torch.testing.assert_close(acc.last["a"], torch.tensor(PC_A))
