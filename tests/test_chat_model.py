"""unigrad-chat: the embedded chat model with a byte-level BPE tokenizer and a chat template with tools. A micro recipe
builds in seconds through the real build, cache and loading path; one slow test uses the default model."""

import json
import warnings

import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from unigrad.models import chat_model
from unigrad.models.chat_data import chat_text_and_spans, encode_with_masks, task_chats, tool_transcript
from unigrad.models.chat_model import CHAT_NAME, ChatRecipe, ensure_chat
from unigrad.models.chat_tokenizer import IM_END, IM_END_ID, PAD_ID, train_chat_tokenizer
from unigrad.models.loading import load_model_and_tokenizer
from unigrad.models.model_cache import verify_cache
from unigrad.rollout.episodes import episode_prompt_ids, observation_ids
from unigrad.tasks import get_task
from unigrad.tools.calls import parse_tool_calls, tool_style

CALC = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12+14"}}}
CONVERSATION = [
    {"role": "user", "content": "use 12 13 14 to make 26"},
    {"role": "assistant", "content": "", "tool_calls": [CALC]},
    {"role": "tool", "name": "calculator", "content": "26"},
    {"role": "assistant", "content": "12+14"},
]


def _micro_recipe(**changes) -> ChatRecipe:
    """Builds in a few seconds: a 1-layer, 32-wide Qwen2, a few steps on arithmetic and countdown_calc."""
    base = ChatRecipe(tasks=(("arithmetic", 1.0), ("countdown_calc", 1.0)), vocab_size=400, hidden_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, max_position_embeddings=512,
                      train_examples_per_task=150, steps=4, batch_size=8, pack_length=512, micro_batch_size=4,
                      warmup_steps=1, eval_examples=0)
    return base.replace(**changes)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """(cache root, model directory) of the micro recipe, built once for the module."""
    root = tmp_path_factory.mktemp("chat_cache")
    return root, ensure_chat(_micro_recipe(), root, progress=False)


@pytest.fixture(scope="module")
def tokenizer(micro):
    return AutoTokenizer.from_pretrained(micro[1])


def _calc_tools():
    return get_task("countdown_calc").tool_schemas()


def test_micro_build_loads_by_name_as_a_qwen2_with_its_tokenizer(micro):
    root, path = micro
    mtime = (path / "manifest.json").stat().st_mtime_ns
    model, tok = load_model_and_tokenizer(CHAT_NAME, tiny_recipe=_micro_recipe(), cache_dir=root)
    assert (path / "manifest.json").stat().st_mtime_ns == mtime  # loaded from the cache, not rebuilt
    assert verify_cache(path) is None and path.name.startswith("unigrad-chat-")
    assert isinstance(model, Qwen2ForCausalLM) and model.config.vocab_size == len(tok)
    assert model.config.num_key_value_heads == 1 and model.config.tie_word_embeddings
    assert tok.eos_token == IM_END and tok.eos_token_id == IM_END_ID and tok.pad_token_id == PAD_ID
    assert model.generation_config.eos_token_id == IM_END_ID
    assert tool_style(tok) == "hf"
    recipe = json.loads((path / "recipe.json").read_text())
    assert ChatRecipe.from_dict(recipe) == _micro_recipe()
    report = json.loads((path / "report.json").read_text())
    assert report["name"] == CHAT_NAME and report["parameters"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(TypeError, match="ChatRecipe"):
        load_model_and_tokenizer("unigrad-tiny", tiny_recipe=_micro_recipe(), cache_dir=root)


def test_the_tokenizer_is_trained_deterministically_and_has_multi_token_words():
    task = get_task("countdown_calc")
    texts = [chat_text_and_spans(c)[0] for c in task_chats(task, task.examples("train", 100, 0), 0)]
    a, b = (train_chat_tokenizer(texts, 400) for _ in range(2))
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    words = [chat_text_and_spans(c)[0] for c in task_chats(get_task("word_problems"),
                                                           get_task("word_problems").examples("train", 100, 0), 0)]
    assert train_chat_tokenizer(texts + words, 400).backend_tokenizer.to_str() != a.backend_tokenizer.to_str()
    assert 300 < len(a) <= 400
    # whole words and JSON punctuation are single tokens; digits stay one token each
    assert a.tokenize("calculator") == ["calculator"] and a.tokenize(" {\"") == ["Ġ{\""]
    assert a.tokenize("1234") == ["1", "2", "3", "4"]
    assert a.convert_ids_to_tokens([0, 1, 2, 3]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]


def test_template_renders_tools_and_calls_that_the_hf_style_parses_back(tokenizer):
    calls_as_string = [{**m, "tool_calls": [{"type": "function", "function": {
        "name": "calculator", "arguments": json.dumps({"expression": "12+14"})}}]} if m.get("tool_calls") else m
        for m in CONVERSATION]
    text = tokenizer.apply_chat_template(CONVERSATION, tools=_calc_tools(), tokenize=False)
    assert text == tokenizer.apply_chat_template(calls_as_string, tools=_calc_tools(), tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>\n{\"type\": \"function\"")
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12+14"}}\n' \
           '</tool_call><|im_end|>\n' in text
    assert "<|im_start|>user\n<tool_response>\n26\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n12+14<|im_end|>\n")
    # the assistant's tool-call turn, as tokens decoded the way episodes decode a sampled turn
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    turn_text = text.split("<|im_start|>assistant\n")[1]
    turn = tokenizer(turn_text.split("\n<|im_start|>")[0], add_special_tokens=False)["input_ids"]
    assert any(ids[i:i + len(turn)] == turn for i in range(len(ids)))  # the turn's tokens, as they sit in the chat
    decoded = tokenizer.decode(turn, skip_special_tokens=True)
    (call,) = parse_tool_calls(decoded, "hf")
    assert call.name == "calculator" and call.arguments == {"expression": "12+14"} and call.error is None
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_observation_ids_and_episode_prompts_work_with_the_template(tokenizer):
    obs = observation_ids(tokenizer, [{"role": "tool", "name": "calculator", "content": "26"}], [IM_END_ID])
    assert tokenizer.decode(obs) == "\n<|im_start|>user\n<tool_response>\n26\n</tool_response><|im_end|>\n" \
                                    "<|im_start|>assistant\n"
    two = observation_ids(tokenizer, [{"role": "tool", "name": "calculator", "content": "1"},
                                      {"role": "tool", "name": "calculator", "content": "2"}], [IM_END_ID])
    assert tokenizer.decode(two).count("<|im_start|>user") == 1  # consecutive results share one turn
    task = get_task("countdown_calc")
    (example,) = task.examples("test", 1, 0)
    prompt = tokenizer.decode(episode_prompt_ids(task, tokenizer, example, "hf"))
    assert '"name": "calculator"' in prompt and prompt.endswith(f"{example.prompt}<|im_end|>\n<|im_start|>assistant\n")
    # every prefix of a chat renders as the start of the whole chat, token for token
    full = tokenizer.apply_chat_template(CONVERSATION, tools=_calc_tools(), tokenize=True, return_dict=False)
    for k in range(1, len(CONVERSATION)):
        head = tokenizer.apply_chat_template(CONVERSATION[:k], tools=_calc_tools(), tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
        assert full[:len(head)] == head or CONVERSATION[k]["role"] != "assistant"


def test_the_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    import random

    tools = get_task("countdown_calc").tool_table
    (example,) = get_task("countdown_calc").examples("train", 1, 0)
    messages = tool_transcript(tools, example, random.Random(3))
    text, spans = chat_text_and_spans((messages, _calc_tools()))
    ((ids, mask),) = encode_with_masks(tokenizer, [(text, spans)])
    assert tokenizer.decode(ids) == text
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    turns = [text[s:e] for s, e in spans]
    assert trained == "".join(turns) and all(t.endswith(IM_END) for t in turns)
    assert turns[-1] in (f"{example.demonstration}{IM_END}", f"{example.demonstration} = {example.answer}{IM_END}")
    assert turns[0].startswith("<tool_call>\n") and len(turns) >= 2
    # the tool results (the calculator's real answers) are context, not trained
    assert "<tool_response>" not in trained and example.answer in text


def test_transcripts_vary_and_their_calls_are_right():
    import random

    task = get_task("countdown_calc")
    rng = random.Random(0)
    shapes = set()
    for example in task.examples("train", 60, 0):
        messages = tool_transcript(task.tool_table, example, rng)
        calls = [c for m in messages for c in m.get("tool_calls", [])]
        results = [m["content"] for m in messages if m["role"] == "tool"]
        assert len(results) == len(calls) and results[-1] == example.answer  # the last call checks the solution
        assert task.verify([messages[-1]["content"]], [example]) == [1.0]
        shapes.add(tuple(len(m.get("tool_calls", [])) for m in messages if m["role"] == "assistant"))
    assert shapes == {(1, 0), (1, 1, 0), (2, 0)}
    with pytest.raises(ValueError, match="no pretraining chats for the multi-turn task 'guess'"):
        task_chats(get_task("guess"), get_task("guess").examples("train", 2, 0), 0)


def test_a_damaged_chat_cache_is_rebuilt_identically(tmp_path):
    recipe = _micro_recipe(steps=2, train_examples_per_task=40)
    path = ensure_chat(recipe, tmp_path, progress=False)
    good = (path / "model.safetensors").read_bytes()
    (path / "tokenizer.json").write_text("{}")
    assert verify_cache(path) is not None
    with pytest.warns(RuntimeWarning, match="unigrad-chat cache .* is damaged"):
        assert ensure_chat(recipe, tmp_path, progress=False) == path
    assert verify_cache(path) is None and (path / "model.safetensors").read_bytes() == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_chat(recipe, tmp_path, progress=False)
    assert chat_model.chat_cache_dir(recipe.replace(seed=1), tmp_path) != path


def test_a_build_load_model_and_tokenizer_starts_records_its_heldout_report(tmp_path):
    """A unigrad-chat build no caller hands an evaluation ends with the one the package root registers
    (unigrad.eval.chat_heldout_report): report.json holds accuracy per task and the calculator task's tool calls."""
    recipe = _micro_recipe(steps=2, train_examples_per_task=40, eval_examples=2)
    load_model_and_tokenizer(CHAT_NAME, tiny_recipe=recipe, cache_dir=tmp_path)
    report = json.loads((chat_model.chat_cache_dir(recipe, tmp_path) / "report.json").read_text())
    assert set(report["heldout_greedy_accuracy"]) == {"arithmetic", "countdown_calc"}
    assert set(report["heldout_tool_calls"]) == {"countdown_calc"}


@pytest.mark.slow
def test_the_default_model_calls_its_calculator_and_bpe_retokenisation_differs():
    """The default unigrad-chat (built once per cache, ~3-4 min on 2 cores): its countdown_calc episodes call the
    calculator and read the result; a sampled turn's ids are not always what re-encoding its text gives."""
    from unigrad.eval import evaluate
    from unigrad.rollout.base import SamplingParams
    from unigrad.rollout.prompts import encode_prompt
    from unigrad.rollout.transformers_engine import TransformersEngine

    model, tok = load_model_and_tokenizer(CHAT_NAME)
    res = evaluate(model, tok, [get_task("countdown_calc"), get_task("arithmetic")], 40, max_new_tokens=48)
    assert res["countdown_calc"]["tool_calls"] >= 0.9  # nearly every episode calls the calculator
    assert res["countdown_calc"]["tool_errors"] <= 0.1 and res["countdown_calc"]["pass@1"] >= 0.3
    engine = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id)
    prompts = [encode_prompt(tok, ex.prompt) for ex in get_task("word_problems").examples("test", 16, 0)]
    ro = engine.generate(prompts, 4, SamplingParams(temperature=1.5, max_new_tokens=24, seed=0))
    differ = 0
    for ids, mask in zip(ro.completion_ids, ro.completion_mask, strict=True):
        sampled = [i for i in ids[mask].tolist() if i != tok.eos_token_id]
        differ += tok(tok.decode(sampled), add_special_tokens=False)["input_ids"] != sampled
    assert differ > 0
    assert torch.is_tensor(ro.completion_ids)


def test_packed_chats_train_only_their_masked_tokens():
    """pretrain.micro_batches with (ids, loss mask) examples: labels are the ids where the mask is set, -100 elsewhere;
    an (ids, prompt length) example still trains everything after its prompt."""
    from unigrad.models import pretrain

    recipe = _micro_recipe(pack_length=16, micro_batch_size=4)
    chat = ([5, 6, 7, 8, 9, 10], [False, True, True, False, False, True])
    demo = ([11, 12, 13, 14], 2)
    ((input_ids, _, position_ids, labels),) = pretrain.micro_batches([chat, demo], recipe)
    assert input_ids.shape[0] == 1 and position_ids[0, :10].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert labels[0, :10].tolist() == [-100, 6, 7, -100, -100, 10, -100, -100, 13, 14]
    with pytest.raises(ValueError, match="loss mask"):
        list(pretrain.micro_batches([([1, 2], [True])], recipe))
