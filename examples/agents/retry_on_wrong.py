"""A retrying agent: the model answers; when the answer is wrong, it hears so and answers once more.

Train it on the embedded tiny model (docs/agents.md has the measured run):

    unigrad train 'tasks=["agent:examples/agents/retry_on_wrong.py:solve@arithmetic"]' \
        prompts_per_step=8 rollout.max_new_tokens=8 max_steps=100 --output-dir runs/retry

The reward is the task's verifier on the last answer, so a right first answer earns full marks at once and a wrong
one gets a second chance. Only the `openai` package is used: the same function runs against any OpenAI-compatible
server.
"""

from __future__ import annotations

RETRY = "Wrong. Try again."


def ask(client, model: str, messages: list[dict]) -> str:
    """The model's reply to `messages` as text."""
    reply = client.chat.completions.create(model=model, messages=messages)
    return reply.choices[0].message.content or ""


def solve(client, example):
    """One answer, and one retry after a wrong answer; returns (reward of the last answer, info)."""
    messages = [{"role": "user", "content": example["prompt"]}]
    first = ask(client, example["model"], messages)
    if example["score"](first) >= 1.0:
        return 1.0, {"retried": False}
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": RETRY}]
    second = ask(client, example["model"], messages)
    return example["score"](second), {"retried": True}
