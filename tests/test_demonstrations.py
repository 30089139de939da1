"""Demonstrations in the step: objective=sft trains on them without sampling, LUFFY-style guidance
puts each one into its prompt's group. Each step's gradient is checked against a from-scratch computation."""

import pytest
import torch
from step_helpers import flat_grad, length_rewards, observe, replayed_picks, step_context

from unigrad.config import ConfigError, load_config
from unigrad.objective import batch_normalisers, compute_advantages, compute_policy_loss
from unigrad.rollout.base import Rollout
from unigrad.rollout.logprobs import sequence_logprobs
from unigrad.train.learning.batching import SequenceBatch, encode_completion, pad_pairs
from unigrad.train.producing.demonstrations import with_demonstrations
from unigrad.train.producing.routing import TrainingMode
from unigrad.train.step import decode_completions, train_step


def test_with_demonstrations_appends_one_row_per_group_and_pads_both_sides():
    # 2 prompts x 2 sampled rows; prompts 3 wide, completions 2 wide; demonstrations 3 long, prompts 4 wide
    ro = Rollout(prompt_ids=torch.tensor([[0, 5, 6]] * 2 + [[7, 8, 9]] * 2),
                 prompt_mask=torch.tensor([[False, True, True]] * 2 + [[True, True, True]] * 2),
                 completion_ids=torch.tensor([[1, 2], [3, 0], [4, 4], [5, 0]]),
                 completion_mask=torch.tensor([[True, True], [True, False], [True, True], [True, False]]),
                 infer_logprobs=torch.tensor([[-1.0, -2.0], [-3.0, 0.0], [-4.0, -4.0], [-5.0, 0.0]]),
                 group_ids=torch.tensor([0, 0, 1, 1]), truncated=torch.tensor([True, False, True, False]))
    demos = pad_pairs([[5, 6], [7, 8, 9]], [[11, 12, 13], [14]], pad_id=0)
    demos = SequenceBatch(torch.cat([torch.zeros(2, 1, dtype=torch.long), demos.prompt_ids], 1),
                          torch.cat([torch.zeros(2, 1, dtype=torch.bool), demos.prompt_mask], 1),
                          demos.completion_ids, demos.completion_mask)  # a 4-wide prompt block
    out, off = with_demonstrations(ro, demos, pad_id=0)
    assert off.tolist() == [False, False, True, False, False, True]
    assert out.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert out.prompt_ids.tolist() == [[0, 0, 5, 6], [0, 0, 5, 6], [0, 0, 5, 6], [0, 7, 8, 9], [0, 7, 8, 9],
                                       [0, 7, 8, 9]]
    assert out.prompt_mask.sum(-1).tolist() == [2, 2, 2, 3, 3, 3]
    assert out.completion_ids.tolist() == [[1, 2, 0], [3, 0, 0], [11, 12, 13], [4, 4, 0], [5, 0, 0], [14, 0, 0]]
    assert out.completion_mask.sum(-1).tolist() == [2, 1, 3, 2, 1, 1]
    assert out.infer_logprobs[2].tolist() == [0.0, 0.0, 0.0] and out.infer_logprobs[3].tolist() == [-4.0, -4.0, 0.0]
    assert out.truncated.tolist() == [True, False, False, True, False, False]


def demonstration_rows(ctx):
    """The step's prompts and their demonstrations, rebuilt independently of the step's own code."""
    picks = replayed_picks(ctx)
    examples = [ctx.pools[t][i] for t, i in picks]
    prompts = [ctx.pool_prompt_ids[t][i] for t, i in picks]
    completions = [encode_completion(ctx.tokenizer, ex.demonstration) for ex in examples]
    return examples, prompts, completions


def test_sft_objective_trains_on_demonstrations_without_sampling():
    ctx = step_context(objective="sft", mode=TrainingMode("all"))
    seen = observe(ctx)
    state = {k: v.clone() for k, v in ctx.learner.model.state_dict().items()}
    metrics, samples = train_step(ctx, 1)
    assert seen["generate_calls"] == [] and samples == []
    assert metrics["hpt/sft_fraction"] == 1.0 and "reward/mean" not in metrics

    # From scratch: the token-mean NLL of the six demonstrations, one padded batch.
    _, prompts, completions = demonstration_rows(ctx)
    batch = pad_pairs(prompts, completions, ctx.tokenizer.pad_token_id)
    model = ctx.learner.model
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    logp = sequence_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    nll = -(logp * batch.completion_mask).sum() / batch.completion_mask.sum()
    nll.backward()
    torch.testing.assert_close(seen["grad"], flat_grad(ctx.learner.params), atol=1e-6, rtol=1e-4)
    assert metrics["sft/loss"] == pytest.approx(nll.item(), rel=1e-5)


def test_luffy_guidance_puts_the_demonstration_in_each_group():
    ctx = step_context(objective="luffy", mode=TrainingMode("in_group"))
    length_rewards(ctx)
    seen = observe(ctx)
    state = {k: v.clone() for k, v in ctx.learner.model.state_dict().items()}
    metrics, _ = train_step(ctx, 1)
    assert seen["generate_calls"] == [(6, 3)]  # G - 1 = 3 sampled per prompt; the demonstration is the 4th

    # From scratch: each prompt's 3 sampled rows and its demonstration, scored by the verifier, GRPO advantages
    # over the 4, the luffy loss with the demonstration's tokens off-policy, normalised over all tokens.
    ro = seen["rollout"]
    _, prompts, completions = demonstration_rows(ctx)
    sampled_texts = decode_completions(ctx.tokenizer, ro)
    rows_prompt, rows_completion, texts, off = [], [], [], []
    for p in range(6):
        for r in range(3):
            ids, mask = ro.completion_ids[3 * p + r], ro.completion_mask[3 * p + r]
            rows_prompt.append(prompts[p])
            rows_completion.append(ids[mask].tolist())
            texts.append(sampled_texts[3 * p + r])
            off.append(False)
        rows_prompt.append(prompts[p])
        rows_completion.append(completions[p])
        texts.append(ctx.tokenizer.decode(completions[p], skip_special_tokens=True))
        off.append(True)
    batch = pad_pairs(rows_prompt, rows_completion, ctx.tokenizer.pad_token_id)
    rewards = torch.tensor([float(len(t) % 3 == 0) for t in texts])
    groups = torch.arange(6).repeat_interleave(4)
    adv = compute_advantages(rewards, groups, "grpo")
    off_mask = torch.tensor(off)[:, None] & batch.completion_mask
    norm = batch_normalisers(batch.completion_mask, ctx.objective)
    model = ctx.learner.model
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    logp = sequence_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    out = compute_policy_loss(logp, batch.completion_mask, adv, ctx.objective, max_length=6,
                              num_tokens=norm.num_tokens, num_sequences=norm.num_sequences, off_policy_mask=off_mask)
    out.loss.backward()
    torch.testing.assert_close(seen["grad"], flat_grad(ctx.learner.params), atol=1e-6, rtol=1e-4)
    off_fraction = off_mask.sum().item() / batch.completion_mask.sum().item()
    assert metrics["rl/off_policy_fraction"] == pytest.approx(off_fraction)
    assert metrics["guidance/advantage"] == pytest.approx(adv[torch.tensor(off)].mean().item(), abs=1e-6)
    sampled = ~torch.tensor(off)
    assert metrics["reward/mean"] == pytest.approx(rewards[sampled].mean().item())  # the model's rows only


def test_demonstration_modes_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="num_generations >= 2"):
        load_config(None, ["objective=luffy", "rollout.num_generations=1"])
    with pytest.raises(ConfigError, match="on-policy objective"):
        load_config(None, ["objective=hpt", "hybrid.rl_objective=luffy"])
    assert load_config(None, ["objective=luffy"]).uses_guidance
    assert not load_config(None, ["objective=grpo"]).uses_guidance
    assert not load_config(None, ["objective=hpt"]).uses_guidance


def test_a_demonstration_is_encoded_once_however_often_it_is_drawn():
    """A long demonstration drawn at every step is tokenised the first time only; the ids are the tokenizer's."""
    from unigrad.models.tokenizer import build_char_tokenizer

    tok, calls = build_char_tokenizer(model_max_length=256), []

    class Counting(type(tok)):
        def __call__(self, *args, **kwargs):
            calls.append(args[0])
            return super().__call__(*args, **kwargs)

    counting = build_char_tokenizer(model_max_length=256)
    counting.__class__ = Counting
    text = "12 + 30 = 42 " * 200
    first = encode_completion(counting, text)
    assert encode_completion(counting, text) == first and calls == [text]
    assert first == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
