"""The LLM-as-judge reward (unigrad.tasks.judge) against a real `unigrad serve` endpoint in this process: the judge is
a small char Llama taught a fixed reply per first character of the request (its chat template shows the model only
that character), so what the judge answers is known and every way of reading a reply can be exercised."""

from __future__ import annotations

import math

import pytest
from step_helpers import small_char_llama, teach_texts

from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.serve import serving
from unigrad.tasks import get_task
from unigrad.tasks.judge import JudgeSettings, check_template, llm_judge, read_verdict

# The model sees the first character of the last message only: "Y" -> "yes", ...
TEMPLATE = "{{ bos_token }}<|user|>{{ messages[-1]['content'][:1] }}<|assistant|>"
REPLIES = {"Y": "yes", "N": "No.", "H": "score 1/2", "Q": "0.25", "Z": "maybe", "B": "7"}


class Recorder:
    """A serve hook that records every prompt call (messages as sent, the API key)."""

    def __init__(self):
        self.calls = []

    def prompt_ids(self, call):
        self.calls.append(call)
        return list(call.rendered_ids)

    def completed(self, call):
        pass


def taught_judge(tok, steps: int = 80):
    texts = [f"<bos><|user|>{first}<|assistant|>{reply}<eos>" for first, reply in REPLIES.items()]
    return teach_texts(small_char_llama(tok, seed=4), tok, texts, steps)


@pytest.fixture(scope="module")
def judge_server():
    """(base URL, recorder) of a server on the taught judge, named "judge"."""
    tok = build_char_tokenizer(model_max_length=256)
    tok.chat_template = TEMPLATE
    engine = TransformersEngine(taught_judge(tok), tok.pad_token_id, tok.eos_token_id)
    recorder = Recorder()
    with serving(engine, tok, "judge", hook=recorder) as url:
        yield url, recorder


def test_replies_are_read_as_verdicts_numbers_or_nan_with_the_reason(judge_server):
    url, _ = judge_server
    judge = llm_judge(url, "judge", template="{completion} graded against {answer}")
    completions = ["Yes it is 4", "No", "Half", "Quarter", "Zebra", "Big"]
    rewards = judge(["q"] * 6, completions, answer=["4"] * 6)
    assert rewards[:4] == [1.0, 0.0, 0.5, 0.25]
    assert math.isnan(rewards[4]) and math.isnan(rewards[5])
    assert judge.last_reasons[:4] == [None] * 4
    assert "no yes/no or number" in judge.last_reasons[4] and "'maybe'" in judge.last_reasons[4]
    assert "not in [0, 1]" in judge.last_reasons[5]


def test_the_request_carries_the_filled_template_and_the_key_from_its_variable(judge_server, monkeypatch):
    url, recorder = judge_server
    monkeypatch.setenv("MY_JUDGE_KEY", "secret-1")
    judge = llm_judge(url, "judge", template="Y: {prompt} | {completion} | {answer}", api_key_env="MY_JUDGE_KEY")
    recorder.calls.clear()
    assert judge(["What is 2+2?"], ["4"], answer=["4"]) == [1.0]
    (call,) = recorder.calls
    assert call.messages == [{"role": "user", "content": "Y: What is 2+2? | 4 | 4"}] and call.api_key == "secret-1"
    assert judge.request("p", "c", None) == {"model": "judge", "messages": [{"role": "user", "content": "Y: p | c | "}],
                                             "temperature": 0.0, "max_tokens": 16, "n": 1}


def test_max_tokens_reaches_the_judge_and_a_cut_reply_is_unscorable(judge_server):
    url, _ = judge_server
    judge = llm_judge(url, "judge", template="{completion}", max_tokens=2)  # "score 1/2" cut to "sc"
    assert math.isnan(judge(["q"], ["H"])[0]) and "'sc'" in judge.last_reasons[0]


def test_timeouts_and_failed_requests_are_nan_with_the_reason(judge_server):
    url, _ = judge_server
    slow = llm_judge(url, "judge", template="{completion}", timeout=1e-4, max_retries=0)
    assert math.isnan(slow(["q"], ["Y"])[0]) and "longer than 0.0001 s" in slow.last_reasons[0]
    wrong_model = llm_judge(url, "no-such-model", template="{completion}", max_retries=0)
    assert math.isnan(wrong_model(["q"], ["Y"])[0]) and "BadRequestError" in wrong_model.last_reasons[0]


def test_a_config_names_it_through_the_environment(judge_server, monkeypatch, tmp_path):
    url, recorder = judge_server
    template = tmp_path / "judge.txt"
    template.write_text("{completion}")
    for name, value in {"UNIGRAD_JUDGE_URL": url, "UNIGRAD_JUDGE_MODEL": "judge",
                        "UNIGRAD_JUDGE_TEMPLATE": f"@{template}"}.items():
        monkeypatch.setenv(name, value)
    task = get_task("arithmetic", reward="unigrad.tasks.judge:from_env")
    examples = task.examples("train", 3, seed=0)
    assert task.verify(["Yes", "Nope", "Zzz"], examples)[:2] == [1.0, 0.0]
    monkeypatch.delenv("UNIGRAD_JUDGE_MODEL")
    with pytest.raises(ValueError, match="UNIGRAD_JUDGE_MODEL"):
        from unigrad.tasks.judge import from_env
        from_env(["q"], ["Y"])


def test_reading_and_settings_refuse_what_they_cannot_use():
    assert read_verdict("YES!") == (1.0, None) and read_verdict("no, it is wrong")[0] == 0.0
    assert read_verdict("Score: 0.7 out of 1") == (0.7, None) and read_verdict("3/4") == (0.75, None)
    assert math.isnan(read_verdict("")[0]) and math.isnan(read_verdict("1/0")[0])
    with pytest.raises(ValueError, match="unknown field.*'question'"):
        check_template("{question} {completion}")
    with pytest.raises(ValueError, match="literal braces"):
        check_template("a { b")
    with pytest.raises(ValueError, match="timeout"):
        JudgeSettings("http://x/v1", "m", timeout=0)
