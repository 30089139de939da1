"""Invariances: micro-batching with accumulation, NaN in padding, dtypes."""

import pytest
import torch

from unigrad.objective import AGGREGATIONS, PRESETS, batch_normalisers, compute_policy_loss


def make_batch(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = torch.rand(B, T, generator=g) * -3 - 0.05
    old = logp + torch.randn(B, T, generator=g) * 0.2
    infer = old + torch.randn(B, T, generator=g) * 0.6
    ref = logp + torch.randn(B, T, generator=g) * 0.3
    lengths = torch.tensor([7, 3, 1, 5, 0, 6])[:B]  # includes an empty completion
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g)
    entropy = torch.rand(B, T, generator=g) * 2
    off = torch.tensor([False, True, False, False, False, True])[:B]
    return dict(logp=logp, old=old, infer=infer, ref=ref, mask=mask, adv=adv, entropy=entropy, off=off)


def loss_and_grad(batch, rows, objective, normalisers, **kw):
    logp = batch["logp"][rows].clone().requires_grad_()
    entropy = batch["entropy"][rows].clone().requires_grad_()
    out = compute_policy_loss(
        logp, batch["mask"][rows], batch["adv"][rows], objective,
        old_logprobs=batch["old"][rows], infer_logprobs=batch["infer"][rows], ref_logprobs=batch["ref"][rows],
        max_length=7, num_tokens=normalisers.num_tokens, num_sequences=normalisers.num_sequences,
        entropy=entropy, off_policy_mask=batch["off"][rows] if PRESETS.get(objective) and
        PRESETS[objective].objective.off_policy_ratio else None, **kw,
    )
    out.loss.backward()
    entropy_grad = torch.zeros_like(entropy) if entropy.grad is None else entropy.grad  # None: bonus off
    return out.loss.detach(), logp.grad, entropy_grad


def accumulate(batch, objective, splits, **kw):
    """Run the batch in micro-batches given by `splits` (lists of row indices) and sum."""
    pieces = [torch.tensor(s) for s in splits]
    norm = None
    for rows in pieces:  # normalisers of the whole optimizer batch, summed over pieces
        n = batch_normalisers(batch["mask"][rows], objective, old_logprobs=batch["old"][rows],
                              infer_logprobs=batch["infer"][rows], **kw)
        norm = n if norm is None else norm + n
    B, T = batch["mask"].shape
    total, grad, egrad = 0.0, torch.zeros(B, T), torch.zeros(B, T)
    for rows in pieces:
        loss, g, eg = loss_and_grad(batch, rows, objective, norm, **kw)
        total = total + loss
        grad[rows] += g
        egrad[rows] += eg
    return total, grad, egrad


SPLITS = [[[0, 1, 2, 3, 4, 5]], [[0, 1, 2], [3, 4, 5]], [[5], [0, 3], [1, 2, 4]]]
GLOBAL_PRESETS = [n for n, p in PRESETS.items() if p.objective.normaliser_scope == "global"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("objective", ["grpo", "gspo", "sapo", "cispo", "grpo_icepop", "luffy"])
def test_micro_batches_with_accumulation_equal_the_whole_batch(objective, aggregation):
    batch = make_batch()
    kw = dict(aggregation=aggregation, beta=0.01, entropy_coef=0.01)
    whole = accumulate(batch, objective, SPLITS[0], **kw)
    for splits in SPLITS[1:]:
        part = accumulate(batch, objective, splits, **kw)
        assert torch.allclose(part[0], whole[0], atol=1e-6)
        assert torch.allclose(part[1], whole[1], atol=1e-7)
        assert torch.allclose(part[2], whole[2], atol=1e-7)
    assert whole[1].abs().sum() > 0  # the gradient is not trivially zero


@pytest.mark.parametrize("objective", GLOBAL_PRESETS)
def test_every_global_preset_is_micro_batch_invariant(objective):
    batch = make_batch(seed=3)
    whole = accumulate(batch, objective, SPLITS[0])
    part = accumulate(batch, objective, SPLITS[2])
    assert torch.allclose(part[0], whole[0], atol=1e-6)
    assert torch.allclose(part[1], whole[1], atol=1e-7)


def test_icepop_dropping_masked_tokens_stays_invariant():
    batch = make_batch(seed=4)
    kw = dict(masked_tokens_in_denominator=False, aggregation="token_mean")
    whole = accumulate(batch, "grpo_icepop", SPLITS[0], **kw)
    part = accumulate(batch, "grpo_icepop", SPLITS[1], **kw)
    assert torch.allclose(part[1], whole[1], atol=1e-7)


def test_bnpo_local_normaliser_is_deliberately_not_invariant():
    # TRL's bnpo divides each micro-batch by its own token count; pin that it differs.
    batch = make_batch(seed=5)
    whole = accumulate(batch, "bnpo", SPLITS[0])
    part = accumulate(batch, "bnpo", SPLITS[1])
    assert not torch.allclose(part[1], whole[1], atol=1e-6)


POISONS = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("objective", list(PRESETS))
@pytest.mark.parametrize("poison", POISONS)
def test_nan_at_masked_positions_never_leaks(objective, poison):
    batch = make_batch(seed=6)
    mask = batch["mask"]
    clean = accumulate(batch, objective, SPLITS[0], beta=0.01, entropy_coef=0.01)
    dirty = dict(batch)
    for key in ("logp", "old", "infer", "ref", "entropy"):
        dirty[key] = torch.where(mask, batch[key], torch.full_like(batch[key], poison))
    dirty["adv"] = batch["adv"][:, None].expand_as(mask).clone()
    dirty["adv"][~mask] = poison
    poisoned = accumulate(dirty, objective, SPLITS[0], beta=0.01, entropy_coef=0.01)
    assert torch.isfinite(poisoned[0]) and torch.isfinite(poisoned[1]).all() and torch.isfinite(poisoned[2]).all()
    assert torch.allclose(poisoned[0], clean[0], atol=1e-7)
    assert torch.equal(poisoned[1], clean[1])
    assert torch.equal(poisoned[1][~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize("objective", ["grpo", "gspo", "sapo", "cispo", "grpo_tis", "sft"])
def test_bfloat16_inputs(objective):
    batch = make_batch(seed=7)
    mask, adv = batch["mask"], batch["adv"]
    kw = dict(old_logprobs=batch["old"].bfloat16(), infer_logprobs=batch["infer"].bfloat16())
    lp16 = batch["logp"].bfloat16().requires_grad_()
    out16 = compute_policy_loss(lp16, mask, adv, objective, **kw)
    out16.loss.backward()
    # the same (bf16-rounded) values in float32 give the same loss: the maths runs in float32
    lp32 = batch["logp"].bfloat16().float().requires_grad_()
    out32 = compute_policy_loss(lp32, mask, adv, objective, old_logprobs=kw["old_logprobs"].float(),
                                infer_logprobs=kw["infer_logprobs"].float())
    out32.loss.backward()
    assert out16.loss.dtype == torch.float32
    assert out16.loss.item() == pytest.approx(out32.loss.item(), abs=1e-6)
    assert lp16.grad.dtype == torch.bfloat16
    assert torch.allclose(lp16.grad.float(), lp32.grad.bfloat16().float())
    assert set(out16.metrics) == set(out32.metrics)
