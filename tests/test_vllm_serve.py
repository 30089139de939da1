"""The endpoint over the vLLM engine: `unigrad serve --engine vllm`'s engine answering the real `openai` client, and an
agent task trained with `rollout.engine=vllm` (the agents' calls sampled by vLLM from the endpoint's batcher
thread). Where vLLM cannot run: skipped with the reason, or failed when UNIGRAD_REQUIRE_VLLM=1 (`.ci/run-vllm`)."""

import json
import textwrap

import openai
import test_vllm_cli
import torch
from test_agent_training import AGENT  # draft_then_revise: two calls, the second extending the first
from test_end_to_end import cli
from test_vllm_cli import require_vllm

from unigrad.models.loading import load_model_and_tokenizer
from unigrad.serve.engines import open_engine
from unigrad.serve.inprocess import serve_service
from unigrad.serve.service import ServeService

model64 = test_vllm_cli.model64  # the fixture: a small char Llama whose head size vLLM's CPU attention runs



def recomputed_logprobs(model, prompt: list[int], sampled: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + sampled])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(sampled)[:, None])[:, 0].tolist()


def test_the_endpoint_samples_with_vllm_and_returns_its_exact_ids_and_logprobs(model64, monkeypatch):
    require_vllm()
    for key in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):  # the engine sets these for
        monkeypatch.delenv(key, raising=False)  # its process group; the CLI runs after it must not inherit them
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    opened = open_engine(str(model64), "vllm")
    assert opened.name == "vllm"
    service = ServeService(opened.engine, opened.tokenizer, "m64", context_length=opened.context_length)
    messages = [{"role": "user", "content": "What is 12+7?"}]
    with serve_service(service) as url:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        replies = [client.chat.completions.create(model="m64", messages=messages, max_tokens=12, temperature=0.7,
                                                  seed=seed, logprobs=True, extra_body={"return_token_ids": True})
                   for seed in (1, 1, 2)]
        text = client.completions.create(model="m64", prompt="12+7=", max_tokens=6, seed=3).choices[0].text
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content  # a seed repeats
    assert isinstance(text, str)
    model, _ = load_model_and_tokenizer(str(model64))
    for reply in replies:
        prompt, sampled = reply.model_extra["prompt_token_ids"], reply.choices[0].model_extra["token_ids"]
        assert prompt == opened.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)
        served = [entry.logprob for entry in reply.choices[0].logprobs.content]
        # vLLM's float32 log-probs under the temperature are the model's, recomputed here in one forward pass
        torch.testing.assert_close(torch.tensor(served), torch.tensor(
            recomputed_logprobs(model, prompt, sampled, 0.7)[:len(served)]), atol=1e-4, rtol=0)


def test_an_agent_task_trains_with_the_vllm_engine(model64, tmp_path):
    require_vllm()
    agent = tmp_path / "my_agent.py"
    agent.write_text(textwrap.dedent(AGENT))
    out = tmp_path / "run"
    res = cli("train", f"model.name={model64}", f"tasks=[agent:{agent}:draft_then_revise@arithmetic]",
              "rollout.engine=vllm", "max_steps=2", "prompts_per_step=2", "rollout.num_generations=4",
              "rollout.max_new_tokens=8", "train_pool_size=20", "micro_batch_size=8", "threads=1", "save_every=2",
              "eval.before_after=false", "optim.lr=1e-2", "--output-dir", out, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        # two calls per episode, every episode scored: the engine's context is the model's, not the longest first
        # prompt plus one completion (then every second call was too long for vLLM and the episode unscorable)
        assert m["episode/turns"] == 2.0 and m["rewards/nan_count"] == 0.0, m
        assert m["mismatch/abs_logp_diff_max"] < 1e-4, m  # the learner scores what vLLM sampled, float32 both
