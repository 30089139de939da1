"""`learn` on hand-built batches: the update it makes against gradients derived independently.

The independent gradient runs the model on each row's [prompt; completion] alone (no padding, no shared prompt pass),
tempers the logits by hand and writes the objective's loss out for the on-policy case. `learn` runs with plain SGD
and no clipping, so its update is -lr times its gradient, which is compared with the independent one."""

from __future__ import annotations

import pytest
import torch
from model_helpers import use_plain_sgd
from step_helpers import small_char_llama

from unigrad.config import OptimSection
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.objective import batch_normalisers, resolve_objective
from unigrad.objective.aggregation import count_normalisers
from unigrad.objective.corrections import CorrectionSettings, behaviour_weights
from unigrad.train.batch import Batch, LossComponent
from unigrad.train.learning.batching import pad_pairs
from unigrad.train.learning.learn import LearnSettings, learn
from unigrad.train.learning.learner import Learner
from unigrad.train.lifecycle.distributed import SINGLE

PROMPTS = [[3, 7, 9], [3, 7, 9], [5, 4], [5, 4]]  # two prompts, two rows each (a prompt's rows share its pass)
COMPLETIONS = [[11, 12, 13, 2], [14, 2], [15, 16, 2], [2]]
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])
LR = 0.05


def setup(objective: str, temperature: float, max_length: int = 10, **overrides):
    tok = build_char_tokenizer(model_max_length=256)
    model = small_char_llama(tok, seed=3)
    learner = Learner(model, OptimSection(lr=LR, max_grad_norm=1e9, weight_decay=0.0, schedule="constant"),
                      keep_reference=resolve_objective(objective, **overrides).beta > 0)
    use_plain_sgd(learner, LR)  # update = -LR * gradient
    sequences = pad_pairs(PROMPTS, COMPLETIONS, tok.pad_token_id)
    obj = resolve_objective(objective, **overrides)
    comp = LossComponent("rl", sequences, ADVANTAGES, torch.tensor([0, 0, 1, 1]), obj, 1.0,
                         batch_normalisers(sequences.completion_mask, obj),
                         infer_logprobs=torch.zeros(sequences.completion_ids.shape))
    batch = Batch([comp], torch.tensor([0, 0]), torch.zeros(2, dtype=torch.long), max_length, temperature, 0)
    return model, learner, batch


def row_logprobs(model, temperature: float) -> list[torch.Tensor]:
    """Each row alone: log pi(y_t | prompt, y_<t) under the tempered softmax, with grad."""
    out = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        ids = torch.tensor([prompt + completion])
        logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature  # the positions that predict y
        out.append(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
    return out


def independent_update(model, loss_fn) -> list[torch.Tensor]:
    model.zero_grad()
    loss_fn().backward()
    update = [-LR * p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)  # learn starts from no gradient
    return update


def learned_update(model, learner, batch, settings=None) -> tuple[list[torch.Tensor], dict]:
    before = [p.detach().clone() for p in model.parameters()]
    metrics = learn(batch, learner, settings or LearnSettings(micro_batch_size=64), SINGLE)
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)], metrics


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    scale = max(w.abs().max().item() for w in want)
    assert scale > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6 * max(scale, 1.0), rtol=1e-4)


@pytest.mark.parametrize("micro_batch_size", [1, 64])
def test_grpo_update_is_the_hand_derived_gradient_under_the_sampling_temperature(micro_batch_size):
    # On-policy GRPO with seq_mean_token_mean: loss = -(1/N) sum_i A_i/|y_i| sum_t log pi_T(y_it), pi_T the tempered
    # policy (the ratio is 1 but its gradient is grad log pi_T).
    model, learner, batch = setup("grpo", temperature=0.7)

    def loss():
        rows = row_logprobs(model, 0.7)
        return -sum(a * lp.mean() for a, lp in zip(ADVANTAGES, rows, strict=True)) / len(rows)

    want = independent_update(model, loss)
    got, metrics = learned_update(model, learner, batch, LearnSettings(micro_batch_size=micro_batch_size))
    assert_close(got, want)
    assert metrics["rl/ratio/mean"] == pytest.approx(1.0)


def test_dr_grpo_divides_by_the_generation_budget_not_a_micro_batch_width():
    # Dr. GRPO: loss = -(1/(N * L_max)) sum_i A_i sum_t log pi(y_it), L_max = the batch's max_length (10), never the
    # width of one micro-batch (here 1 to 4 tokens).
    model, learner, batch = setup("dr_grpo", temperature=1.0, max_length=10)

    def loss():
        rows = row_logprobs(model, 1.0)
        return -sum(a * lp.sum() for a, lp in zip(ADVANTAGES, rows, strict=True)) / (len(rows) * 10)

    want = independent_update(model, loss)
    got, _ = learned_update(model, learner, batch, LearnSettings(micro_batch_size=1))
    assert_close(got, want)


def test_the_reference_scores_under_the_same_temperature_so_kl_starts_at_zero():
    model, learner, batch = setup("grpo", temperature=0.6, beta=0.1)
    _, metrics = learned_update(model, learner, batch)
    assert metrics["rl/kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rl/loss/kl"] == pytest.approx(0.0, abs=1e-7)


def test_a_second_iteration_measures_its_ratio_against_the_first_iterations_log_probs():
    # num_iterations=2: the first update moves the policy, so the second iteration's ratio pi/pi_old is not 1 (it
    # would be, if the old log-probs were not kept and the second pass ran on-policy).
    model, learner, batch = setup("grpo", temperature=1.0)
    use_plain_sgd(learner, 5.0)
    _, metrics = learned_update(model, learner, batch, LearnSettings(micro_batch_size=2, num_iterations=2))
    assert metrics["rl/ratio/max"] > 1.01 or metrics["rl/ratio/min"] < 0.99


def test_learn_runs_an_sft_component_through_the_same_path():
    # SFT: loss = -(1/N_tokens) sum log pi(y) over every token (token_mean); advantages are 1.
    model, learner, batch = setup("grpo", temperature=1.0)
    sft = resolve_objective("sft")
    rl = batch.components[0]
    batch.components = [LossComponent("sft", rl.sequences, torch.ones(4), rl.row_prompt, sft, 0.5,
                                      batch_normalisers(rl.sequences.completion_mask, sft), sampled=False)]
    tokens = sum(len(c) for c in COMPLETIONS)

    def loss():
        return -0.5 * sum(lp.sum() for lp in row_logprobs(model, 1.0)) / tokens

    want = independent_update(model, loss)
    got, metrics = learned_update(model, learner, batch)
    assert_close(got, want)
    assert "mismatch/kl_k3" not in metrics and metrics["loss"] == pytest.approx(0.5 * metrics["sft/loss"])


# ------------------------------------------------------------------------------ normalisers and IcePop's band
def test_empty_sequences_count_in_the_number_of_sequences():
    # TRL and verl divide seq_mean_* losses by every sequence of the batch, an empty completion included.
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    assert count_normalisers(mask).num_sequences == 3.0
    assert count_normalisers(mask).num_tokens == 3.0


def test_batch_normalisers_leave_out_the_tokens_icepop_zeroes_when_asked():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = torch.zeros(2, 3)
    infer = torch.log(torch.tensor([[1.0, 4.0, 0.1], [1.0, 1.0, 1.0]]))  # rho = 1, 0.25 (zeroed), 10 (zeroed)
    counted = batch_normalisers(mask, "grpo", old_logprobs=old, infer_logprobs=infer, correction="icepop",
                                masked_tokens_in_denominator=False)
    assert counted.num_tokens == 3.0 and counted.num_sequences == 2.0
    assert batch_normalisers(mask, "grpo", correction="icepop").num_tokens == 5.0


def test_icepop_keeps_a_ratio_exactly_on_either_bound_of_its_band():
    # alpha <= rho <= beta is kept: rho = 0.5 and rho = 2.0 exactly (powers of two: exact in float), zeroed just
    # outside.
    rho = torch.tensor([[0.5, 2.0, 0.49, 2.01, 1.0]])
    mask = torch.ones_like(rho, dtype=torch.bool)
    w = behaviour_weights("icepop", torch.log(rho), torch.zeros_like(rho), mask,
                          CorrectionSettings(icepop_low=0.5, icepop_high=2.0))
    assert w.weight[0].tolist() == pytest.approx([0.5, 2.0, 0.0, 0.0, 1.0])
    assert w.zeroed.tolist() == [[False, False, True, True, False]]
