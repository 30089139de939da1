"""One completion cannot break the scoring of the others: the code task's result channel read as untrusted text (in
the real jail, and by a seeded fuzzer), and a verifier that raises on one completion, in the trainer's scoring and in
`unigrad eval`."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from step_helpers import replayed_picks, small_char_llama, step_context

from unigrad.eval import evaluate
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.tasks import get_task
from unigrad.tasks.code_result import MAX_DEPTH, MAX_LINE_CHARS, nesting_depth, read_results
from unigrad.tasks.code_task import MARKER, CodeTask
from unigrad.tasks.guard import verify_guarded
from unigrad.train.producing.produce import decode_completions, score
from unigrad.train.step import train_step

# Completions a model could write (one line, under the 300 characters a completion may have), each of which makes
# the parent's `json.loads` exceed Python's recursion limit unless the line is checked first; and what they count as.
DEEP = {
    "marker and 60000 brackets": ('print("@@unigrad-result@@"+"["*60000,flush=1)or __import__("os")._exit(0)',
                                  "oversized"),
    "marker and 9000 brackets": ('print("@@unigrad-result@@"+"["*9000,flush=1)or __import__("os")._exit(0)',
                                 "too_deep"),
    "the harness's own line nested": ('setattr(__import__("json"),"dumps",lambda *a:"["*9000)or 1', "too_deep"),
    "each returned value nested": ('setattr(__import__("json"),"dumps",lambda o,d=__import__("json").dumps:'
                                   'd(o)if type(o)is list else"["*2000)or 1', "too_deep"),
}


@pytest.fixture(scope="module")
def code_examples():
    return [e for e in get_task("code").examples("test", 40) if e.meta["kind"] == "num"][:3]


@pytest.mark.parametrize("case", list(DEEP))
def test_a_nested_result_line_in_the_real_jail_fails_only_its_own_completion(case, code_examples):
    evil, reason = DEEP[case]
    task = CodeTask()
    honest = [e.demonstration for e in code_examples]
    rewards = task.verify([honest[0], evil, honest[2]], code_examples)
    assert rewards == [1.0, 0.0, 1.0]  # the honest completions keep their full marks
    assert task.last_failures == {reason: 1}
    assert task.verify(honest, code_examples) == [1.0] * 3 and task.last_failures == {}


def test_the_depth_check_skips_brackets_inside_strings_and_never_recurses():
    assert nesting_depth('[["ok", "[[[[[[1]]]]]]"], ["error", "{{"]]') == 2  # brackets in strings do not count
    assert nesting_depth('{"a": [1, {"b": []}]}') == 4
    assert nesting_depth("[" * 200_000) == 200_000  # a loop, not recursion
    assert nesting_depth('["unterminated [[[') == 4  # an unterminated string's brackets count: never an underestimate
    assert read_results(MARKER + "[" * (MAX_LINE_CHARS + 1), MARKER, 1) == (None, "oversized")
    deep_but_short = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    assert read_results(MARKER + deep_but_short, MARKER, 1) == (None, "too_deep")


def _honest_line(example) -> str:
    return MARKER + json.dumps([["ok", json.dumps(t["expected"])] for t in example.meta["tests"]])


def _fuzz_stdout(rng: random.Random, example) -> str:
    """One made-up snippet output: random bytes, random nesting, huge lines, near-miss result lines."""
    kind = rng.randrange(7)
    if kind == 0:  # random bytes, as the sandbox would decode them
        return bytes(rng.randrange(256) for _ in range(rng.randrange(2000))).decode("utf-8", "replace")
    if kind == 1:  # random nesting of arrays and objects, balanced or not, with strings and escapes in between
        pieces = rng.choices(['[', ']', '{', '}', '"', '\\', ',', ':', '"ok"', '1', 'null', '"\\u12', ' '],
                             k=rng.randrange(1, 30_000))
        return MARKER + "".join(pieces)
    if kind == 2:  # a huge line
        return MARKER + rng.choice("[{\"0 ") * rng.randrange(MAX_LINE_CHARS - 10, 5 * MAX_LINE_CHARS)
    if kind == 3:  # a well-formed result line whose values are nested, wrong or of the wrong type
        depth = rng.randrange(0, 4 * MAX_DEPTH)
        value = rng.choice(["[" * depth + "]" * depth, "[" * depth, json.dumps("x" * depth), "1e999", "NaN", "{}"])
        items = [[rng.choice(["ok", "error", "okay", 1]), rng.choice([value, 3, None, [value]])]
                 for _ in range(rng.randrange(0, 8))]
        return MARKER + json.dumps(items)
    if kind == 4:  # lone surrogates, NUL and other unusual code points around a marker
        junk = "".join(chr(rng.choice([0, 0xD800, 0xDFFF, 0xFFFF, 0x10FFFF, 0x2028, ord("[")])) for _ in range(50))
        return junk + "\n" + MARKER + junk
    if kind == 5:  # a valid line after fake ones, or a fake one after a valid line (the last one counts)
        fake = MARKER + "[" * rng.randrange(1, 50_000)
        return "\n".join([fake, _honest_line(example)] if rng.random() < 0.5 else [_honest_line(example), fake])
    return _honest_line(example)


@pytest.mark.parametrize("partial_credit", [False, True])
def test_a_fuzzed_result_channel_never_raises_and_always_scores_in_range(partial_credit, code_examples):
    task, rng = CodeTask(partial_credit=partial_credit), random.Random(1234)
    example = code_examples[0]
    seen = set()
    for _ in range(300):
        stdout = _fuzz_stdout(rng, example)
        reward = task._score_output(stdout, example)
        assert isinstance(reward, float) and 0.0 <= reward <= 1.0
        results, reason = read_results(stdout, MARKER, len(example.meta["tests"]))
        seen.add(reason)
        last = [line for line in stdout.splitlines() if line.startswith(MARKER)][-1:]
        if last == [_honest_line(example)]:  # the honest line, last: full marks, read without a failure
            assert reward == 1.0 and reason is None
        elif reason is not None:
            assert reward == 0.0 or (partial_credit and results is not None)
    assert {"oversized", "too_deep", "malformed", None} <= seen  # the fuzzer reached every outcome


def test_the_trainer_scores_the_rest_of_the_batch_and_counts_the_failures(code_examples):
    task, honest = CodeTask(), [e.demonstration for e in code_examples]
    evil = DEEP["marker and 9000 brackets"][0]
    texts = [honest[0], evil, honest[1], evil, "nonsense"]
    examples = [code_examples[0], code_examples[1], code_examples[1], code_examples[2], code_examples[2]]
    failures: dict[str, float] = {}
    rewards, errors = score([task], texts, examples, torch.zeros(5, dtype=torch.long), 30.0, failures)
    assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0] and errors == {}
    assert failures == {"rewards/failed/code/too_deep": 2.0}


class RaisesOnSevens:
    """A user's verifier with a bug that only some completions reach: it raises on any completion holding a 7."""

    name = "sevens"

    def verify(self, completions, examples):
        if any("7" in c for c in completions):
            raise IndexError("list index out of range")
        return [float(c == e.answer) for c, e in zip(completions, examples, strict=True)]


def test_a_verifier_that_raises_on_one_completion_loses_only_that_reward(code_examples):
    examples = get_task("arithmetic").examples("test", 4)
    texts = [examples[0].answer, "7", examples[2].answer, "wrong"]
    verified = verify_guarded(RaisesOnSevens(), texts, examples)
    assert verified.values[0] == 1.0 and math.isnan(verified.values[1]) and verified.values[2:] == [1.0, 0.0]
    assert verified.failures == {"verifier_raised": 1} and "IndexError" in verified.error
    failures: dict[str, float] = {}
    rewards, errors = score([RaisesOnSevens()], texts, examples, torch.zeros(4, dtype=torch.long), 30.0, failures)
    assert rewards[[0, 2, 3]].tolist() == [1.0, 1.0, 0.0] and math.isnan(rewards[1])
    assert failures == {"rewards/failed/sevens/verifier_raised": 1.0} and "IndexError" in errors["sevens"]


def test_a_training_step_logs_the_failures_by_task_and_reason():
    ctx = step_context()
    raising = ctx.tasks[0]
    real_verify = raising.verify

    def raises_on_short(completions, examples):  # a verifier bug that some of the model's completions reach
        if any(len(c) < 4 for c in completions):
            raise RuntimeError("index out of range")
        return real_verify(completions, examples)

    raising.verify = raises_on_short
    seen = {}
    generate = ctx.engine.generate

    def record(prompts, n, sampling):
        seen["rollout"] = generate(prompts, n, sampling)
        return seen["rollout"]

    ctx.engine.generate = record
    metrics = train_step(ctx, 1)[0]
    ro = seen["rollout"]
    texts = decode_completions(ctx.tokenizer, ro)
    row_task = torch.tensor([t for t, _ in replayed_picks(ctx)])[ro.group_ids.cpu()].tolist()
    expected = sum(len(t) < 4 for t, k in zip(texts, row_task, strict=True) if k == 0)
    key = f"rewards/failed/{raising.name}/verifier_raised"
    assert expected > 0 and metrics[key] == expected == metrics[f"rewards/nan_count/{raising.name}"]


def _model_that_writes(text: str, prompts: list[str]):
    """`small_char_llama` taught, in Adam steps, to answer `prompts` with `text` (greedy decoding)."""
    tok = build_char_tokenizer(model_max_length=256)
    model = small_char_llama(tok, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) + text + tok.eos_token,
                 add_special_tokens=False)["input_ids"] for p in prompts]
    for _ in range(200):
        for ids in batch:
            ids = torch.tensor([ids])
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), tok


def test_unigrad_eval_keeps_going_past_a_completion_that_breaks_its_verifier():
    evil = DEEP["the harness's own line nested"][0]
    task = CodeTask()
    model, tok = _model_that_writes(evil, [e.prompt for e in task.examples("test", 4)])  # the prompts eval draws
    res = evaluate(model, tok, [task], 4, max_new_tokens=len(evil) + 2)
    row = res["code"]
    assert row["n"] == 4.0 and row["pass@1"] == 0.0
    assert row["failed/too_deep"] == 4  # every completion scored as failed and counted, the evaluation finished


class RaisesOnSomePrompts:
    """Arithmetic's prompts, and a verifier with a bug that half of them reach: it raises on the completions of
    `broken` prompts and gives every other completion full marks, whatever it says."""

    name = "half_broken"

    def __init__(self, broken: set[str]):
        self.base, self.broken = get_task("arithmetic"), broken

    def examples(self, split, n, seed=0):
        return self.base.examples(split, n, seed)

    def verify(self, completions, examples):
        if any(e.prompt in self.broken for e in examples):
            raise KeyError("no such column")
        return [1.0] * len(completions)


def test_unigrad_eval_counts_what_a_verifier_raised_on_and_scores_the_rest(small_model):
    from unigrad.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(small_model))
    prompts = [e.prompt for e in get_task("arithmetic").examples("test", 4)]
    task = RaisesOnSomePrompts({prompts[1], prompts[3]})
    row = evaluate(model, tok, [task], 4, max_new_tokens=4, pass_k=2)["half_broken"]
    assert row["pass@1"] == 0.5 and row["pass@2"] == 0.5  # prompts 0 and 2 scored, 1 and 3 unscorable (wrong)
    assert row["failed/verifier_raised"] == 2 + 2 * 2  # greedy: one completion per broken prompt; sampled: two


def test_a_built_in_verifier_scores_each_completion_on_its_own():
    from unigrad.tasks.base import Example
    from unigrad.tasks.guard import score_each

    examples = [Example(f"q{i}", answer, None, "t") for i, answer in enumerate(["3", "4", "5", "6"])]

    def exact_int(completion, example):  # raises ValueError on a completion that is not an integer
        return int(completion) == int(example.answer)

    scores, failures = score_each("t", exact_int, ["3", "four", "5", None], examples)
    assert scores == [1.0, 0.0, 1.0, 0.0] and failures == {"scoring_raised": 1}  # None: not a string, not a failure
    arithmetic = get_task("arithmetic")
    examples = arithmetic.examples("test", 3)
    assert arithmetic.verify([examples[0].answer, None, "garbage"], examples) == [1.0, 0.0, 0.0]
    assert arithmetic.last_failures == {}
