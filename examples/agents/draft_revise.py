"""A two-call agent: the model drafts an answer, is asked to check it, and its revision is what counts.

Train it on the embedded tiny model:

    unigrad train 'tasks=["agent:examples/agents/draft_revise.py:solve@arithmetic"]'

Each episode makes two model calls in one conversation: the arithmetic prompt, the model's draft, then FEEDBACK as
the user's next message and the model's revision. The reward is the arithmetic verifier on the revision; the info
says whether the draft was already right (so a run can tell revisions that fix a draft from ones that break it).
Only the `openai` package is used: the same function runs against any OpenAI-compatible server.
"""

from __future__ import annotations

FEEDBACK = "Check your work and give the final answer."


def ask(client, example, messages) -> str:
    """The model's reply to `messages` (the conversation so far) as text."""
    reply = client.chat.completions.create(model=example["model"], messages=messages)
    return reply.choices[0].message.content or ""


def solve(client, example):
    """Draft, feedback, revision; returns (score of the revision, info)."""
    messages = [{"role": "user", "content": example["prompt"]}]
    draft = ask(client, example, messages)
    messages += [{"role": "assistant", "content": draft}, {"role": "user", "content": FEEDBACK}]
    revision = ask(client, example, messages)
    draft_right = example["score"](draft) == 1.0
    return example["score"](revision), {"draft_right": draft_right, "draft": draft, "revision": revision}
