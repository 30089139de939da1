"""`unigrad train` and `unigrad eval` on an agent task (agent:FILE:FUNCTION@TASK), and the advantages of an episode
split into several rows."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from step_helpers import step_context

from unigrad.cli import main
from unigrad.config import ConfigError
from unigrad.data.samplers import TaskSampler
from unigrad.objective import compute_advantages
from unigrad.tasks import get_task
from unigrad.train.lifecycle.feasibility import check_agents
from unigrad.train.producing.produce import produce

AGENT = '''
def draft_then_revise(client, example):
    messages = [{"role": "user", "content": example["prompt"]}]
    draft = client.chat.completions.create(model=example["model"], messages=messages).choices[0].message.content
    messages += [{"role": "assistant", "content": draft}, {"role": "user", "content": "Sure? Answer again."}]
    final = client.chat.completions.create(model=example["model"], messages=messages).choices[0].message.content
    return example["score"](final)

def restarts(client, example):
    first = client.chat.completions.create(model=example["model"], max_tokens=4,
                                           messages=[{"role": "user", "content": example["prompt"]}])
    again = [{"role": "user", "content": example["prompt"] + " "}, {"role": "assistant",
             "content": first.choices[0].message.content}, {"role": "user", "content": "Again."}]
    final = client.chat.completions.create(model=example["model"], messages=again).choices[0].message.content
    return float(len(final) % 3 == 0)
'''


@pytest.fixture(scope="module")
def agent_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("agent") / "my_agent.py"
    path.write_text(textwrap.dedent(AGENT))
    return path


@pytest.mark.slow
def test_train_and_eval_an_agent_task(agent_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", f"tasks=[agent:{agent_file}:draft_then_revise@arithmetic]", "max_steps=2", "prompts_per_step=2",
            "rollout.num_generations=2", "rollout.max_new_tokens=8", "train_pool_size=20", "eval.prompts_per_task=4",
            "micro_batch_size=4", "threads=1", "seed=1", "save_every=1", "--output-dir", str(out)]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["episode/turns"] == 2.0 and m["agents/splits"] == 0.0 and m["agents/rows_per_episode"] == 1.0
        assert m["episode/observation_tokens"] > 0 and "loss" in m
    assert main(["train", "--output-dir", str(out), "--resume", "--override", "max_steps=3"]) == 0  # as after a crash
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["episode/turns"] == 2.0
    capsys.readouterr()
    assert main(["eval", str(out), "--prompts", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["draft_then_revise@arithmetic"]
    assert row["model_calls"] == 2.0 and row["n"] == 4.0 and 0.0 <= row["pass@1"] <= 1.0


def test_a_split_episode_shares_its_first_rows_advantage(agent_file):
    task = get_task(f"agent:{agent_file}:restarts@arithmetic")
    ctx = step_context(prompts_per_step=2, num_generations=3)
    ctx.tasks, ctx.pools = [task], [task.examples("train", 8, seed=0)]
    ctx.pool_prompt_ids = [[ctx.tokenizer(e.prompt)["input_ids"] for e in ctx.pools[0]]]
    ctx.sampler = TaskSampler([8], seed=0, names=[task.name])
    _, p = produce(ctx, 1, 0)
    first = p.episodes.first_row
    assert p.episodes.splits == 6 and len(first) == 12 and p.rollout.num_sequences == 12
    assert torch.equal(p.all_advantages, p.all_advantages[first])  # every row has its episode's advantage
    heads = first == torch.arange(12)
    expected = compute_advantages(p.all_rewards[heads], p.rollout.group_ids[heads])  # one row per episode
    assert torch.allclose(p.all_advantages[heads], expected)


def test_agent_tasks_refuse_other_tasks_processes_and_async_rollouts(agent_file):
    from unigrad.config import validate_config

    agent = get_task(f"agent:{agent_file}:restarts@arithmetic")
    cfg = validate_config({"tasks": ["arithmetic"]})
    with pytest.raises(ConfigError, match="beside other agent tasks"):
        check_agents(cfg, [agent, get_task("arithmetic")])
    with pytest.raises(ConfigError, match="one process"):
        check_agents(cfg, [agent], processes=2)
    with pytest.raises(ConfigError, match="max_staleness"):
        check_agents(validate_config({"tasks": ["arithmetic"], "rollout": {"max_staleness": 1}}), [agent])
    check_agents(cfg, [agent])
