"""The verl adapter: unigrad presets behind verl's policy-loss signature, and metrics from a verl batch.

The first tests need no verl: they call the adapter's loss as verl would, including the data-parallel case. The
others call verl's own entry points (registry, its built-in losses, DataProto) and run where verl is installed
(`pip install "unigrad[verl]"`; verl 0.9 pins transformers<5.11, so it is not in the test extra)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from unigrad.integrations.verl import make_policy_loss, verl_compatible_presets
from unigrad.objective import compute_policy_loss


def tensors(seed=0, b=4, t=6):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 2 - 0.1
    new = (old + 0.3 * torch.randn(b, t, generator=gen)).requires_grad_(True)
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, t - i:] = False  # lengths 6, 5, 4, 3
    adv = torch.randn(b, generator=gen)[:, None].expand(b, t).clone()
    return old, new, adv, mask


def config(**info):
    return SimpleNamespace(global_batch_info=info)


def test_compatible_presets_exclude_what_verl_cannot_feed():
    names = verl_compatible_presets()
    assert {"grpo", "dr_grpo", "dapo", "gspo", "sapo", "cispo", "ppo"} <= set(names)
    assert not {"grpo_tis", "grpo_icepop", "luffy", "sft"} & set(names)


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_two_ranks_with_global_normalisers_average_to_the_full_batch_gradient(preset):
    """verl's FSDP averages the ranks' gradients; each rank's loss x dp_size with global counts must give the
    gradient of the whole batch in one process."""
    old, new, adv, mask = tensors()
    fn = make_policy_loss(preset)
    full, _ = fn(old, new, adv, mask, config=config(loss_scale_factor=6))
    (g_full,) = torch.autograd.grad(full, new)
    info = dict(dp_size=2, batch_num_tokens=mask.sum(), global_batch_size=4, loss_scale_factor=6)
    grads = []
    for rows in (slice(0, 2), slice(2, 4)):
        part = new[rows].detach().requires_grad_(True)
        loss, metrics = fn(old[rows], part, adv[rows], mask[rows], config=config(**info))
        grads.append(torch.autograd.grad(loss, part)[0])
    torch.testing.assert_close(torch.cat(grads) / 2, g_full)  # the average over ranks
    assert "actor/unigrad/loss" in metrics
    with pytest.raises(ValueError, match="global"):
        fn(old, new, adv, mask, config=config(dp_size=2))


def test_rollout_weights_multiply_each_tokens_term():
    old, new, adv, mask = tensors(1)
    w = torch.rand(old.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    loss, metrics = make_policy_loss("grpo")(old, new, adv, mask, config=config(), rollout_is_weights=w)
    plain = compute_policy_loss(new, mask, adv, "grpo", old_logprobs=old, token_weights=w)
    torch.testing.assert_close(loss, plain.loss)
    # by hand at ratio 1 (old = new): the gradient of token t is -A_t w_t / (|y_i| B) (seq_mean_token_mean)
    at_one = new.detach().clone().requires_grad_(True)
    out = compute_policy_loss(at_one, mask, adv, "grpo", old_logprobs=at_one.detach(), token_weights=w)
    (g,) = torch.autograd.grad(out.loss, at_one)
    lengths = mask.sum(-1, keepdim=True).float()
    torch.testing.assert_close(g, torch.where(mask, -adv * w / (lengths * 4), torch.zeros_like(g)))
    assert metrics["actor/unigrad/token_weights_mean"] == pytest.approx(w[mask].mean().item(), rel=1e-6)


needs_verl = pytest.mark.skipif(
    importlib.util.find_spec("verl") is None,
    reason="verl is not installed (pip install 'unigrad[verl]'; verl 0.9 pins transformers<5.11)")


def actor_config(loss_mode: str, low: float, high: float, agg: str):
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=low,
                       clip_ratio_low=low, clip_ratio_high=high, loss_agg_mode=agg,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode))


@needs_verl
def test_import_verl_registers_the_unigrad_losses_through_the_plugin():
    import verl  # noqa: F401 - the import loads the verl.plugins entry point
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn

    assert {f"unigrad_{p}" for p in verl_compatible_presets()} <= set(POLICY_LOSS_REGISTRY)
    assert get_policy_loss_fn("unigrad_gspo").__name__ == "unigrad_gspo"


@needs_verl
@pytest.mark.parametrize(("preset", "verl_loss", "low", "high", "agg"), [
    ("dapo", "vanilla", 0.2, 0.28, "token-mean"),
    ("gspo", "gspo", 3e-4, 4e-4, "seq-mean-token-mean"),
])
def test_unigrad_loss_equals_verls_own_loss_for_the_same_method(preset, verl_loss, low, high, agg):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, new, adv, mask = tensors(3)
    cfg = actor_config(f"unigrad_{preset}", low, high, agg)
    cfg.global_batch_info.update(dp_size=2, batch_num_tokens=int(mask.sum()) * 2, global_batch_size=8)
    ours, _ = get_policy_loss_fn(f"unigrad_{preset}")(old, new, adv, mask.float(), agg, cfg, None)
    theirs, _ = get_policy_loss_fn(verl_loss)(old, new, adv, mask.float(), agg, cfg, None)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    g_ours, g_theirs = (torch.autograd.grad(x, new)[0] for x in (ours, theirs))
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-5)


@needs_verl
def test_batch_metrics_from_a_dataproto():
    import numpy as np
    from verl import DataProto

    from unigrad.integrations.verl import batch_metrics

    old, _, adv, mask = tensors(4)
    rollout = old + 0.01
    scores = torch.zeros(4, 6)
    scores[:, 0] = torch.tensor([1.0, 0.0, 1.0, 0.5])
    attention = torch.cat([torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]]), mask.long()], dim=1)
    batch = DataProto.from_dict(
        tensors={"responses": torch.zeros(4, 6, dtype=torch.long), "response_mask": mask.long(),
                 "attention_mask": attention, "token_level_scores": scores, "advantages": adv,
                 "old_log_probs": old, "rollout_log_probs": rollout},
        non_tensors={"data_source": np.array(["math", "code", "math", "code"], dtype=object)})
    m = batch_metrics(batch)
    assert m["unigrad/reward/math"] == pytest.approx(1.0) and m["unigrad/reward/code"] == pytest.approx(0.25)
    assert m["unigrad/accuracy/code"] == pytest.approx(0.0)
    assert m["unigrad/response_length/math"] == pytest.approx((6 + 4) / 2)
    assert m["unigrad/prompt_length/code"] == pytest.approx(3.0)
    assert m["unigrad/mismatch/kl_k3"] == pytest.approx(0.0, abs=1e-4) and m["unigrad/mismatch/kl_k3"] > 0
