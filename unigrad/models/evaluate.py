"""Greedy decoding and held-out accuracy of a model on tasks (used to measure the tiny model's competence)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def greedy_complete(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of user ``prompts`` (chat template applied, generation prompt added).

    Prompts are batched by length (left padding) and decoding stops at the tokenizer's eos token. The returned
    strings hold the completion only, without special tokens, in the order of ``prompts``.
    """
    if not prompts:
        return []
    encoded = [
        _as_ids(
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        )
        for p in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
            for row, i in enumerate(idx):
                new = generated[row, width:].tolist()
                if eos_id is not None and eos_id in new:
                    new = new[: new.index(eos_id)]
                out[i] = tokenizer.decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    n: int = 200,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Greedy accuracy (mean verifier reward) per task on ``n`` examples of its held-out "test" split.

    ``max_new_tokens`` defaults, per task, to the longest demonstration among those examples plus a margin.
    """
    from unigrad.tasks import get_task

    results: dict[str, float] = {}
    for name in tasks:
        task = get_task(name)
        examples = task.examples("test", n, seed)
        budget = max_new_tokens
        if budget is None:
            longest = max((len(e.demonstration or e.answer) for e in examples), default=16)
            budget = int(longest * 1.25) + 8
        completions = greedy_complete(model, tokenizer, [e.prompt for e in examples], budget, batch_size)
        rewards = task.verify(completions, examples)
        results[name] = float(sum(rewards) / max(len(rewards), 1))
    return results


def _as_ids(encoded) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list in transformers 4 and a BatchEncoding in 5."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)
