"""Token in, token out for agent episodes (unigrad.agents.trajectory): a request that extends the episode's text
keeps the sampled ids; one that does not starts a new row."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import PreTrainedTokenizerFast

from unigrad.agents.trajectory import Trajectory
from unigrad.models.tokenizer import build_char_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, with a chat template whose turns end in <|im_end|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    corpus = ["hello world, the answer is 42.", "what is the answer? hello there", "the world says hello"] * 50
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = TEMPLATE
    return fast


def render(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer()


def test_non_canonical_sample_is_kept_where_re_rendering_would_change_it(bpe):
    """The model sampled "hello" byte by byte; the agent sends it back as text and the template re-renders it with
    the merged token. The trajectory samples the next call from the ids the model wrote, not the re-rendering."""
    first = [{"role": "user", "content": "what is the answer?"}]
    traj = Trajectory(bpe)
    prompt = traj.prompt_for(render(bpe, first))
    assert prompt == render(bpe, first)
    sampled = [bpe.convert_tokens_to_ids(c) for c in "hello"] + [bpe.eos_token_id]  # one byte token each
    assert all(isinstance(t, int) and t != bpe.unk_token_id for t in sampled)
    traj.record(sampled, [-0.5] * len(sampled))
    history = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the answer?"}]
    rendered = render(bpe, history)
    context = traj.prompt_for(rendered)
    assert rendered != context  # re-tokenising changed the ids: the pitfall
    assert context[:len(prompt) + len(sampled)] == prompt + sampled  # ... which the trajectory avoids
    assert bpe.decode(context) == bpe.decode(rendered)  # the same text
    (row,) = traj.rows()
    assert row.sampled == sampled and traj.splits == 0
    assert row.observed[len(sampled):] == [True] * (len(context) - len(prompt) - len(sampled))
    assert row.logps == [-0.5] * len(sampled) + [0.0] * (len(row.ids) - len(sampled))


def test_edited_history_splits_the_trajectory(bpe):
    traj = Trajectory(bpe)
    first = [{"role": "user", "content": "what is the answer?"}]
    traj.prompt_for(render(bpe, first))
    answer = bpe.encode("42", add_special_tokens=False) + [bpe.eos_token_id]
    traj.record(answer, [-1.0] * len(answer))
    edited = [{"role": "user", "content": "what is the world?"}, {"role": "assistant", "content": "42"},
              {"role": "user", "content": "hello"}]
    context = traj.prompt_for(render(bpe, edited))
    assert context == render(bpe, edited) and traj.splits == 1
    the = bpe.encode("the", add_special_tokens=False)
    traj.record(the, [-2.0] * len(the))
    rows = traj.rows()
    assert len(rows) == 2 and rows[1].prompt == render(bpe, edited) and rows[1].ids == rows[1].sampled


def test_a_turn_cut_before_its_end_token_continues_with_the_end_token_observed():
    """A turn cut by max_tokens has no end-of-turn id; the template writes one when the agent sends the turn back,
    and that id is observation (the model did not write it)."""
    tok = build_char_tokenizer()
    traj = Trajectory(tok)
    first = [{"role": "user", "content": "3+4?"}]
    traj.prompt_for(render(tok, first))
    sampled = tok.encode("7 is", add_special_tokens=False)
    traj.record(sampled, [-0.1] * len(sampled))
    context = traj.prompt_for(render(tok, [*first, {"role": "assistant", "content": "7 is"},
                                           {"role": "user", "content": "go on"}]))
    (row,) = traj.rows()
    eos_at = len(sampled)
    assert row.ids[eos_at] == tok.eos_token_id and row.observed[eos_at]
    assert context == row.prompt + row.ids and traj.splits == 0


def test_a_row_without_a_sampled_token_is_not_trained(bpe):
    traj = Trajectory(bpe)
    traj.prompt_for(render(bpe, [{"role": "user", "content": "hello"}]))
    assert traj.rows() == []
    with pytest.raises(ValueError, match="log-probs"):
        traj.record([1, 2], [0.0])
