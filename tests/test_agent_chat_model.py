"""Agent episodes on unigrad-chat (byte-level BPE, a chat template with turn markers): the rows hold the ids the
model sampled, where re-tokenising the same text gives other ids, and a conversation that goes on does not split."""

from __future__ import annotations

import textwrap

import pytest
import torch

from unigrad.agents.runner import AgentBatch, AgentSettings, run_agent_episodes
from unigrad.models.loading import load_model_and_tokenizer
from unigrad.rollout.base import SamplingParams
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.tasks import get_task

AGENT = '''
SEEN = []

def two_calls(client, example):
    messages = [{"role": "user", "content": example["prompt"]}]
    for feedback in ("Check it.", None):
        reply = client.chat.completions.create(model=example["model"], messages=messages,
                                               extra_body={"return_token_ids": True})
        SEEN.append(reply.choices[0].model_extra["token_ids"])
        text = reply.choices[0].message.content
        if feedback:
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": feedback}]
    return example["score"](text)
'''


@pytest.mark.slow
def test_bpe_rows_keep_the_sampled_ids_where_re_tokenising_differs(tmp_path):
    path = tmp_path / "agent.py"
    path.write_text(textwrap.dedent(AGENT))
    model, tokenizer = load_model_and_tokenizer("unigrad-chat")
    model.eval()
    engine = TransformersEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    task = get_task(f"agent:{path}:two_calls@arithmetic")
    examples = task.examples("train", 16, seed=0)
    batch = AgentBatch([task] * 16, examples, [tokenizer(e.prompt)["input_ids"] for e in examples], 4,
                       tuple(range(16)))
    ro, episodes = run_agent_episodes(engine, tokenizer, batch, SamplingParams(temperature=1.0, max_new_tokens=24),
                                      AgentSettings("unigrad-chat", 120.0))
    import sys

    seen = sys.modules[task.program.function.__module__].SEEN
    assert len(seen) == 128 and episodes.failures == {}
    assert episodes.splits == 0 and ro.num_sequences == 64  # every second request extended its episode
    trained = {tuple(ro.completion_ids[r][ro.completion_mask[r]].tolist()) for r in range(64)}
    assert all(any(t[:len(s)] == tuple(s) or t[-len(s):] == tuple(s) for t in trained) for s in seen)
    # the pitfall the rows avoid: the sampled turns that re-tokenise to other ids
    retokenised = [tokenizer.encode(tokenizer.decode(s), add_special_tokens=False) != s for s in seen]
    print(f"{sum(retokenised)} of {len(seen)} sampled turns re-tokenise to other ids")
    assert any(retokenised)
    assert torch.isfinite(episodes.rewards).all()
