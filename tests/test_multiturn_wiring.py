"""Multi-turn tasks as a user meets them: the task registry and `unigrad tasks`, the `tools` key, chat templates with a
tool role, evaluation by whole episodes, and the settings multi-turn runs refuse."""

import pytest
import torch
from step_helpers import turn_ending_llama

from unigrad.cli import main
from unigrad.config import ConfigError, load_config
from unigrad.environments.base import is_multi_turn
from unigrad.environments.tool_use import ToolUseTask
from unigrad.eval import evaluate
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.rollout.episodes import episode_prompt_ids, observation_ids
from unigrad.tasks import get_tasks, list_tasks, load_tasks, task_listing

# A ChatML-like template over the char tokenizer: turns end with <eos> then a newline, tools go into a system
# message, tool results have their own role. Its separator after <eos> is what a cut after the model's own
# end-of-turn token must keep.
CHATML = (
    "{% if tools %}<bos>system\ntools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}<eos>\n{% endif %}"
    "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


def test_every_builtin_task_is_listed_with_its_turns_and_tools(capsys):
    rows = {r["name"]: r for r in task_listing()}
    assert list(rows) == list_tasks()
    assert rows["arithmetic"]["turns"] == "single-turn" and rows["arithmetic"]["tools"] == "-"
    assert rows["countdown_calc"] == {**rows["countdown_calc"], "turns": "multi-turn", "tools": "calculator"}
    assert {"guess", "code_retry"} <= {n for n, r in rows.items() if r["turns"] == "multi-turn"}
    assert all(r["description"] for r in rows.values())
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in list_tasks():  # one line each, its name first
        assert sum(line.split()[:1] == [name] for line in lines) == 1


def test_tools_turn_single_turn_tasks_into_tool_use_episodes(tmp_path):
    tool = tmp_path / "lookup.py"
    tool.write_text('def lookup(key: str) -> str:\n    """Look a key up.\n\n    Args:\n        key: the key\n    """\n'
                    '    return key.upper()\n')
    tasks = load_tasks(["arithmetic", "guess"], tools=["calculator", f"{tool}:lookup"])
    assert isinstance(tasks[0], ToolUseTask) and tasks[0].name == "arithmetic+tools"
    assert tasks[0].tools == ("calculator", "lookup") and is_multi_turn(tasks[0])
    assert type(tasks[1]).__name__ == "GuessTask"  # multi-turn tasks keep their own tools
    with pytest.raises(ValueError, match="multi-turn"):
        get_tasks("guess", reward="x.py:f")


def test_observation_tokens_keep_the_templates_separator_after_the_models_end_of_turn():
    tok = build_char_tokenizer()
    tok.chat_template = CHATML
    ids = observation_ids(tok, [{"role": "tool", "name": "calculator", "content": "30"}], [tok.eos_token_id])
    # the model wrote "...<eos>"; the template's "\n" after it, the tool turn and the next assistant header follow
    assert tok.decode(ids) == "\n<bos>tool\n30<eos>\n<bos>assistant\n"


def test_hf_style_prompts_carry_the_tool_schemas():
    tok = build_char_tokenizer()
    tok.chat_template = CHATML
    task = get_tasks("countdown_calc")[0]
    example = task.examples("train", 1)[0]
    hf = tok.decode(episode_prompt_ids(task, tok, example, "hf"))
    assert hf.startswith("<bos>system\ntools: calculator<eos>\n") and example.prompt in hf
    plain = build_char_tokenizer()
    text = plain.decode(episode_prompt_ids(task, plain, example, "plain"))
    assert "@calculator(" in text and text.endswith("<|assistant|>")


def test_eval_scores_multi_turn_tasks_by_whole_episodes():
    tok = build_char_tokenizer(model_max_length=256)
    model = turn_ending_llama(tok)
    task = get_tasks("guess")[0]
    res = evaluate(model, tok, [task], 6, pass_k=2, max_new_tokens=6, per_prompt=True)
    row = res[task.name]
    assert row["n"] > 0 and 0.0 <= row["pass@1"] <= row["pass@2"] <= 1.0
    assert row["pass@1"] == sum(row["correct"]) / row["n"]
    once = evaluate(model, tok, [task], 6, max_new_tokens=6, per_prompt=True, max_turns=1)
    assert sum(once[task.name]["correct"]) <= sum(row["correct"])  # one guess never wins more than four


@pytest.mark.parametrize("setting", ["rollout.dynamic_sampling=true", "objective=sft",
                                     "objective=hpt"])
def test_multi_turn_runs_refuse_what_they_do_not_run_with_yet(setting, small_model, tmp_path):
    from unigrad.train.lifecycle.run import train

    cfg = load_config(None, [f"model.name={small_model}", "tasks=[guess]", "max_steps=1", setting])
    with pytest.raises(ConfigError, match="multi-turn"):
        train(cfg, tmp_path / "run")


def test_a_short_multi_turn_run_logs_its_episodes(turn_ending_model, tmp_path):
    from unigrad.train.lifecycle.run import train

    cfg = load_config(None, [f"model.name={turn_ending_model}", "tasks=[guess,arithmetic]", "max_steps=2",
                             "prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=6",
                             "eval.before_after=false", "train_pool_size=40", "threads=1"])
    train(cfg, tmp_path / "run", console=False)
    import json

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("episode/turns", "episode/tool_calls", "episode/tool_errors", "episode/length",
                "episode/turns/guess"):
        assert key in metrics[0], key
    assert metrics[0]["episode/turns/arithmetic"] == 1.0
    assert any(m["episode/turns/guess"] > 1 for m in metrics)
    for m in metrics:  # the per-turn mismatch is logged at every step whose episodes took several turns
        # (whether step 1's sampled episodes do depends on the sampler's random stream)
        assert ("mismatch/turn2/kl_k3" in m) == (m["episode/turns"] > 1), m["step"]
        assert ("mismatch/turn1/kl_k3" in m) == (m["episode/turns"] > 1), m["step"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert any("<|user|>" in s["completion"] for s in samples if s["task"] == "guess") or \
        all(m["episode/turns/guess"] == 1 for m in metrics)
    assert torch.isfinite(torch.tensor(metrics[-1]["loss"]))


def test_a_user_environment_from_a_file_plays_by_the_protocol():
    """The worked example of docs/environments.md, loaded as a user types it."""
    from pathlib import Path

    spec = f"env:{Path(__file__).parents[1] / 'examples' / 'environments' / 'hinted_arithmetic.py'}:HintedArithmetic"
    task = get_tasks(spec)[0]
    assert task.name == "hinted_arithmetic" and is_multi_turn(task)
    example = task.examples("test", 1)[0]
    answer = int(example.answer)
    env = task.environment()
    assert env.reset(example) == [{"role": "user", "content": example.prompt}]
    first = env.step(str(answer - 1))
    assert first.observation == [{"role": "user", "content": "no, more"}] and not first.done and not first.reward
    second = env.step(f"{answer}")
    assert second.done and second.reward == 0.5
    with pytest.raises(ValueError, match="lacks"):
        get_tasks(f"env:{Path(__file__).parents[1] / 'examples' / 'environments' / 'hinted_arithmetic.py'}:"
                  "HintedEpisode")
    with pytest.raises(FileNotFoundError, match="no such file"):
        get_tasks("env:/nonexistent/env.py:Task")
