"""Agent programs playing episodes through the trainer's endpoint (unigrad.agents.runner), on the embedded tiny model
with the real `openai` client: rows hold exactly the ids the agents were sent, a request that edits history splits
the episode, and what an agent does wrong ends its episode unscorable without ending the batch."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from unigrad.agents.runner import AgentBatch, AgentSettings, run_agent_episodes
from unigrad.models.loading import load_model_and_tokenizer
from unigrad.rollout.base import SamplingParams
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.tasks import get_task

AGENTS = '''
import asyncio, json, time

SEEN = []  # (episode prompt, token ids the endpoint returned), appended by every call

def _ask(client, example, messages):
    reply = client.chat.completions.create(model=example["model"], messages=messages, max_tokens=12,
                                           extra_body={"return_token_ids": True})
    SEEN.append((example["prompt"], reply.choices[0].model_extra["token_ids"]))
    return reply.choices[0].message.content

def two_calls(client, example):
    messages = [{"role": "user", "content": example["prompt"]}]
    draft = _ask(client, example, messages)
    messages += [{"role": "assistant", "content": draft}, {"role": "user", "content": "Check it. Answer again."}]
    return example["score"](_ask(client, example, messages)), {"draft": draft}

def edits_history(client, example):
    first = _ask(client, example, [{"role": "user", "content": example["prompt"]}])
    again = [{"role": "user", "content": "Again: " + example["prompt"]}, {"role": "assistant", "content": first},
             {"role": "user", "content": "Sure?"}]
    return example["score"](_ask(client, example, again))

async def async_one_call(client, example):
    reply = await client.chat.completions.create(model=example["model"], max_tokens=12,
                                                 messages=[{"role": "user", "content": example["prompt"]}])
    return example["score"](reply.choices[0].message.content)

def raises(client, example):
    _ask(client, example, [{"role": "user", "content": example["prompt"]}])
    raise RuntimeError("agent bug")

def no_call(client, example):
    return 1.0

def hangs(client, example):
    _ask(client, example, [{"role": "user", "content": example["prompt"]}])
    time.sleep(30)
    return 1.0

def asks_two(client, example):
    client.chat.completions.create(model=example["model"], n=2, max_tokens=4,
                                   messages=[{"role": "user", "content": example["prompt"]}])
    return 1.0

def not_a_number(client, example):
    _ask(client, example, [{"role": "user", "content": example["prompt"]}])
    return "high"
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("agents") / "agents.py"
    path.write_text(textwrap.dedent(AGENTS))
    model, tokenizer = load_model_and_tokenizer("unigrad-tiny")
    model.eval()
    engine = TransformersEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return path, model, tokenizer, engine


def play(setup, function: str, prompts: int = 2, n: int = 2, timeout: float = 60.0, max_calls: int | None = None):
    path, model, tokenizer, engine = setup
    task = get_task(f"agent:{path}:{function}@arithmetic")
    examples = task.examples("train", prompts, seed=3)
    fallback = [tokenizer(e.prompt)["input_ids"] for e in examples]
    batch = AgentBatch([task] * prompts, examples, fallback, n, tuple(range(100, 100 + prompts)))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    settings = AgentSettings("unigrad-tiny", timeout, max_calls=max_calls)
    ro, episodes = run_agent_episodes(engine, tokenizer, batch, sampling, settings)
    return task, ro, episodes


def module_of(task):
    import sys
    return sys.modules[task.program.function.__module__]


def test_rows_hold_exactly_the_ids_the_agents_were_sent(setup):
    task, ro, episodes = play(setup, "two_calls")
    seen = module_of(task).SEEN
    assert len(seen) == 8 and ro.num_sequences == 4 and episodes.splits == 0
    assert episodes.turns.tolist() == [2, 2, 2, 2]
    for r in range(4):
        trained = ro.completion_ids[r][ro.completion_mask[r]].tolist()
        prompt = task.examples("train", 2, seed=3)[r // 2].prompt
        sent = [ids for p, ids in seen if p == prompt]
        assert len(sent) == 4  # this prompt's 2 episodes x 2 calls, in some order
        assert any(trained == a + b for a in sent for b in sent if a is not b), (trained, sent)
        assert ro.group_ids[r] == r // 2
        assert not (ro.completion_mask[r] & ro.observation_mask[r]).any() and ro.observation_mask[r].any()
    assert torch.isfinite(episodes.rewards).all() and episodes.failures == {}
    assert episodes.first_row.tolist() == [0, 1, 2, 3]


def test_engine_logprobs_are_recorded_and_match_the_learner(setup):
    _, model, tokenizer, _ = setup
    _, ro, _ = play(setup, "two_calls", prompts=1, n=1)
    ids = torch.cat([ro.prompt_ids[0][ro.prompt_mask[0]], ro.completion_ids[0]])
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    start = int(ro.prompt_mask[0].sum())
    logp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]][start - 1:]
    mask = ro.completion_mask[0]
    assert torch.allclose(logp[mask], ro.infer_logprobs[0][mask], atol=1e-4)
    assert (ro.infer_logprobs[0][~mask] == 0).all()


def test_an_agent_that_edits_its_history_splits_its_episode(setup):
    _, ro, episodes = play(setup, "edits_history", prompts=1, n=2)
    assert episodes.splits == 2 and ro.num_sequences == 4
    assert episodes.first_row.tolist() == [0, 0, 2, 2]
    assert episodes.rewards[0] == episodes.rewards[1] and episodes.rewards[2] == episodes.rewards[3]
    assert not ro.observation_mask[1].any()  # the second row is its own prompt and one sampled turn


def test_async_agents_and_seeded_calls_reproduce(setup):
    _, ro1, ep1 = play(setup, "async_one_call")
    _, ro2, ep2 = play(setup, "async_one_call")
    assert torch.equal(ro1.completion_ids, ro2.completion_ids) and ep1.turns.tolist() == [1, 1, 1, 1]
    assert not torch.equal(ro1.completion_ids[0], ro1.completion_ids[1]) or \
        not torch.equal(ro1.completion_ids[2], ro1.completion_ids[3])  # samples of a prompt differ


@pytest.mark.parametrize("agent, reason", [("raises", "raised RuntimeError: agent bug"),
                                           ("no_call", "made no model call"), ("asks_two", "BadRequestError"),
                                           ("not_a_number", "not a reward")])
def test_faulty_agents_end_their_episodes_unscorable(setup, agent, reason):
    _, ro, episodes = play(setup, agent, prompts=1, n=2)
    assert torch.isnan(episodes.rewards).all() and ro.num_sequences == 2
    assert len(episodes.failures) == 2 and all(reason in f for f in episodes.failures.values()), episodes.failures


@pytest.mark.parametrize("agent", ["async_one_call", "two_calls"])
def test_64_agents_at_once_share_few_engine_calls(setup, agent):
    engine = setup[3]
    calls = []
    generate = engine.generate
    engine.generate = lambda prompts, n, sampling: calls.append(len(prompts)) or generate(prompts, n, sampling)
    try:
        _, ro, episodes = play(setup, agent, prompts=8, n=8)
    finally:
        engine.generate = generate
    per_episode = 1 if agent == "async_one_call" else 2
    assert ro.num_sequences == 64 and episodes.turns.tolist() == [per_episode] * 64 and episodes.failures == {}
    assert sum(calls) == 64 * per_episode and len(calls) <= 8 * per_episode, calls  # batched, not one by one


def test_the_endpoint_kept_between_batches_refuses_calls_and_follows_the_engine(setup):
    import openai

    from unigrad.agents import training_service

    play(setup, "async_one_call", prompts=1, n=1)
    (kept,) = training_service._KEPT
    assert kept.engine is setup[3]
    client = openai.OpenAI(base_url=kept.url, api_key="anything", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no agent episode is running"):
        client.chat.completions.create(model="unigrad-tiny", messages=[{"role": "user", "content": "1+1"}])
    play(setup, "async_one_call", prompts=1, n=1)
    assert training_service._KEPT == [kept]  # the same engine: the same endpoint
    other = TransformersEngine(setup[1], setup[2].pad_token_id, setup[2].eos_token_id)
    task = get_task(f"agent:{setup[0]}:async_one_call@arithmetic")
    example = task.examples("train", 1)
    run_agent_episodes(other, setup[2], AgentBatch([task], example, [[1]], 1, (0,)),
                       SamplingParams(max_new_tokens=4), AgentSettings("unigrad-tiny", 60.0))
    assert training_service._KEPT[0].engine is other and training_service._KEPT[0].url != kept.url
    training_service.close_kept_endpoint()
    assert training_service._KEPT == []


def test_rollout_max_turns_caps_an_agents_model_calls(setup):
    _, ro, episodes = play(setup, "two_calls", prompts=1, n=1, max_calls=1)
    assert episodes.turns.tolist() == [1] and "made its 1 model calls" in episodes.failures[0]
    assert int(ro.completion_mask.sum()) > 0  # the call it made is recorded (its reward is NaN: no gradient)


def test_an_agent_past_its_timeout_is_cut_off(setup):
    _, _, episodes = play(setup, "hangs", prompts=1, n=1, timeout=3.0)
    assert math.isnan(episodes.rewards[0]) and "agent_timeout=3" in episodes.failures[0]


def test_calls_of_closed_or_unknown_episodes_and_past_the_budget_are_refused(setup):
    from unigrad.agents.recorder import EpisodeRecorder
    from unigrad.serve.hooks import PromptCall, RefusedCall

    tokenizer = setup[2]
    recorder = EpisodeRecorder(tokenizer)
    key = recorder.open_episode(0, seed=5, max_calls=1)
    call = PromptCall(key, "chat.completions", [], None, None, tokenizer("hi")["input_ids"])
    assert recorder.prompt_ids(call) == call.rendered_ids
    recorder.episodes[key].trajectory.record([5], [-1.0])
    with pytest.raises(RefusedCall, match="1 model calls"):
        recorder.prompt_ids(call)
    recorder.close(key)
    with pytest.raises(RefusedCall, match="episode is over"):
        recorder.prompt_ids(call)
    with pytest.raises(RefusedCall, match="no running episode"):
        recorder.prompt_ids(PromptCall("someone-else", "chat.completions", [], None, None, [1]))
