"""An environment written for the `verifiers` library (0.4, `verifiers.v1`), built here from its own classes (a
Taskset of arithmetic tasks, a Task with two weighted `@vf.reward` functions, the single-agent env over its `null`
chat harness), played through unigrad's agent endpoint on the embedded tiny model: every episode's model calls are
recorded as rows, and each episode's reward is the rubric's, recomputed here from the recorded completion.

verifiers 0.4 runs its harness's chat program as a uv script: `uv` must be on PATH (the first run fetches the
script's dependencies into uv's cache)."""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import pytest
import torch

if os.environ.get("UNIGRAD_REQUIRE_VERIFIERS") == "1":  # .ci/run-verifiers: these tests must run, not skip
    import verifiers.v1 as vf
    assert shutil.which("uv") is not None, "UNIGRAD_REQUIRE_VERIFIERS=1 but `uv` is not on PATH"
else:
    vf = pytest.importorskip("verifiers.v1", reason="the verifiers package is not installed (pip install "
                                                     "'unigrad[verifiers]'; .ci/run-verifiers runs these)")
    if shutil.which("uv") is None:
        pytest.skip("verifiers' harness programs run as uv scripts and `uv` is not on PATH", allow_module_level=True)

from unigrad.agents.runner import AgentBatch, AgentSettings, run_agent_episodes  # noqa: E402
from unigrad.agents.verifiers_env import held_out, parse_verifiers_spec  # noqa: E402
from unigrad.cli import main  # noqa: E402
from unigrad.models.loading import load_model_and_tokenizer  # noqa: E402
from unigrad.rollout.base import SamplingParams  # noqa: E402
from unigrad.rollout.transformers_engine import TransformersEngine  # noqa: E402
from unigrad.tasks import get_task  # noqa: E402

TASKSET = '''
import verifiers.v1 as vf
from unigrad.tasks import get_task


class ArithData(vf.TaskData):
    answer: str


class ArithTask(vf.Task[ArithData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def correct(self, task, trace) -> float:
        return float(trace.last_reply.strip() == task.answer)

    @vf.reward(weight=0.5)
    async def short(self, task, trace) -> float:
        return float(len(trace.last_reply.strip()) <= 3)


class ArithConfig(vf.TasksetConfig):
    n: int = 12


class ArithTaskset(vf.Taskset[ArithTask, ArithConfig]):
    def load(self):
        for k, e in enumerate(get_task("arithmetic").examples("train", self.config.n, seed=0)):
            yield ArithTask(ArithData(prompt=e.prompt, answer=e.answer, id=f"q{k}"), self.config.task)


__all__ = ["ArithTaskset"]
'''

ENV = '''
import verifiers.v1 as vf
from verifiers.v1.harnesses.null.harness import NullHarnessConfig


def load_environment(n=12):
    agent = vf.AgentConfig(harness=NullHarnessConfig(id="null"), runtime=vf.SubprocessConfig())
    taskset = {"id": "unigrad_vf_arith", "n": n}
    return vf.load_environment(vf.resolve_env_config({"taskset": taskset, "agent": agent.model_dump()}))


def not_an_env():
    return [1, 2]
'''


@pytest.fixture(scope="module")
def env_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vf_env")
    (folder / "unigrad_vf_arith.py").write_text(textwrap.dedent(TASKSET))
    (folder / "my_env.py").write_text(textwrap.dedent(ENV))
    return folder / "my_env.py"


def expected_reward(reply: str, answer: str) -> float:
    """The rubric above, recomputed: 1 for the right answer, plus 0.5 for a reply of at most 3 characters."""
    return float(reply.strip() == answer) + 0.5 * float(len(reply.strip()) <= 3)


def test_the_spec_and_its_splits(env_file):
    assert parse_verifiers_spec(f"verifiers:{env_file}:load_environment,n=5") == \
        (f"{env_file}:load_environment", {"n": 5})
    task = get_task(f"verifiers:{env_file}:load_environment,n=40,test_fraction=0.25")
    keys = [t.key for t in task.verifiers_env.taskset]
    train, test = task._module_examples("train"), task._module_examples("test")
    assert len(train) + len(test) == 40 and 4 <= len(test) <= 16
    assert all(held_out(row["vf_key"], 0.25) for row in test) and not any(held_out(r["vf_key"], 0.25) for r in train)
    assert sorted(r["vf_key"] for r in train + test) == sorted(keys)
    with pytest.raises(ValueError, match="no 'validation' split"):
        task.examples("validation", 2)
    with pytest.raises(ValueError, match="not a verifiers.v1.Env"):
        get_task(f"verifiers:{env_file}:not_an_env")


def test_episodes_are_recorded_and_rewarded_by_the_rubric(env_file):
    model, tokenizer = load_model_and_tokenizer("unigrad-tiny")
    model.eval()
    engine = TransformersEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    task = get_task(f"verifiers:{env_file}:load_environment")
    examples = task.examples("train", 3, seed=1)
    fallback = [tokenizer(e.prompt)["input_ids"] for e in examples]
    batch = AgentBatch([task] * 3, examples, fallback, 2, (7, 8, 9))
    ro, episodes = run_agent_episodes(engine, tokenizer, batch, SamplingParams(temperature=1.0, max_new_tokens=6),
                                      AgentSettings("unigrad-tiny", 120.0))
    assert episodes.failures == {}, episodes.failures
    assert ro.num_sequences == 6 and episodes.turns.tolist() == [1] * 6 and episodes.splits == 0
    answers = {t.key: t.data.answer for t in task.verifiers_env.taskset}
    for r in range(6):
        ids = ro.completion_ids[r][ro.completion_mask[r]].tolist()
        assert ids and ro.prompt_mask[r].sum() > 0
        reply = tokenizer.decode(ids, skip_special_tokens=True)
        answer = answers[examples[r // 2].meta["vf_key"]]
        assert episodes.rewards[r].item() == pytest.approx(expected_reward(reply, answer)), (reply, answer)
    assert torch.equal(ro.group_ids, torch.tensor([0, 0, 1, 1, 2, 2]))


@pytest.mark.slow
def test_unigrad_train_on_a_verifiers_environment(env_file, tmp_path):
    out = tmp_path / "run"
    args = ["train", f"tasks=[verifiers:{env_file}:load_environment]", "max_steps=2", "prompts_per_step=2",
            "rollout.num_generations=2", "rollout.max_new_tokens=6", "train_pool_size=8", "eval.prompts_per_task=2",
            "micro_batch_size=4", "threads=1", "seed=1", "--output-dir", str(out)]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["episode/turns"] == 1.0 and "loss" in m for m in metrics)
