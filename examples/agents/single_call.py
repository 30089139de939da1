"""The smallest agent: one chat call with the task's prompt; the task's verifier scores the answer.

    unigrad train 'tasks=["agent:examples/agents/single_call.py:solve@arithmetic"]' \
        prompts_per_step=16 rollout.max_new_tokens=8 max_steps=150 --output-dir runs/single_call

It trains what the built-in single-turn task trains, through the endpoint, which is what makes it a useful first
check of an agent setup (docs/agents.md has its measured run). Only the `openai` package is used.
"""

from __future__ import annotations


def solve(client, example):
    """One answer to the example's prompt; returns its score."""
    reply = client.chat.completions.create(model=example["model"],
                                           messages=[{"role": "user", "content": example["prompt"]}])
    return example["score"](reply.choices[0].message.content or "")
