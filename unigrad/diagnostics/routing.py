"""Routing agreement between the rollout engine's MoE routers and the learner's, before any replay.

For every real token and MoE layer, the engine recorded the set of k experts it chose (`Rollout.routing`); the
learner's routers, at the weights that score the batch, choose their own set for the same token in its own
teacher-forced pass. Over the (token, layer) pairs the engine recorded:

- `routing/agreement`   fraction whose two sets are equal (order ignored)
- `routing/overlap`     mean |engine set & learner set| / k
- `routing/agreement_completion`   `routing/agreement` over the completion tokens only (those that are scored)

Rollout routing replay (R3, arXiv 2510.11370) makes the learner use the engine's sets; these metrics say how often
it had to override the learner's own choice. They are measured on every step whose batch carries a routing record
(MoE models on the transformers engine), whether or not replay is on, by one no-grad pass over the sampled rows.
"""

from __future__ import annotations

import torch

from unigrad.models.moe_routing import NOT_RECORDED


def routing_agreement(engine: torch.Tensor, learner: torch.Tensor, valid: torch.Tensor) -> tuple[float, float, int]:
    """(equal-set fraction, mean overlap fraction, pairs counted) over the (token, layer) pairs where `valid`
    (N, L) is True and the engine recorded a choice; `engine`, `learner` (N, L, layers, k) expert indices."""
    engine, learner = engine.long().to(learner.device), learner.long()
    recorded = valid.bool()[:, :, None] & (engine != NOT_RECORDED).all(-1)  # (N, L, layers)
    pairs = int(recorded.sum())
    if pairs == 0:
        return float("nan"), float("nan"), 0
    shared = (engine.unsqueeze(-1) == learner.unsqueeze(-2)).any(-1).sum(-1)  # (N, L, layers) experts in both
    k = engine.shape[-1]
    equal = (shared == k)[recorded].double().mean().item()
    overlap = (shared[recorded].double() / k).mean().item()
    return equal, overlap, pairs


@torch.no_grad()
def learner_routing_agreement(batch, learner, micro_batch_size: int, dist) -> dict[str, float]:
    """The routing/ metrics of the batch's sampled rows that carry a routing record, at the learner's current
    weights (a `unigrad.train.batch.Batch` and `Learner`), summed over processes; {} without a record."""
    from unigrad.rollout.logprobs import ScoringOptions, TokenSequences, score_sequences

    sums = torch.zeros(5, dtype=torch.float64)  # equal, overlap, pairs, completion equal, completion pairs
    for comp in batch.components:
        seqs = comp.sequences
        if not comp.sampled or seqs.routing is None or learner.sharded or not len(seqs):
            continue
        learner.model.eval()
        for start in range(0, len(seqs), micro_batch_size):
            mb = seqs.rows(torch.arange(start, min(start + micro_batch_size, len(seqs)))).trimmed().to(learner.device)
            own = score_sequences(learner.model, TokenSequences(
                mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask, mb.observation_mask),
                ScoringOptions(temperature=batch.temperature, record_routing=True)).routing
            context = torch.cat([mb.prompt_mask, mb.context_mask], dim=1)
            equal, overlap, pairs = routing_agreement(mb.routing, own, context)
            if pairs:
                sums[:3] += torch.tensor([equal * pairs, overlap * pairs, pairs], dtype=torch.float64)
            completion = torch.zeros_like(context)
            completion[:, mb.prompt_ids.shape[1]:] = mb.completion_mask
            equal, _, pairs = routing_agreement(mb.routing, own, completion)
            if pairs:
                sums[3:] += torch.tensor([equal * pairs, pairs], dtype=torch.float64)
    if dist.active:
        sums = dist.sum_(sums)
    if sums[2] == 0:
        return {}
    out = {"routing/agreement": float(sums[0] / sums[2]), "routing/overlap": float(sums[1] / sums[2])}
    if sums[4] > 0:
        out["routing/agreement_completion"] = float(sums[3] / sums[4])
    return out
