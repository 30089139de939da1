"""`model.device`: how it resolves per process, its errors, and (on a GPU) a step there equals a step on the CPU."""

import dataclasses

import pytest
import torch

from unigrad.config import ConfigError, validate_config
from unigrad.rollout.base import Rollout
from unigrad.train.lifecycle.device import resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def fake_gpus(monkeypatch, count: int) -> None:
    """This machine has no GPU: pretend torch sees `count` of them (only resolve_device's arithmetic is tested)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_takes_this_process_gpu_or_the_cpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto", {"LOCAL_RANK": "1"}) == torch.device("cpu")
    fake_gpus(monkeypatch, 2)
    assert resolve_device("auto", {}) == torch.device("cuda", 0)
    assert resolve_device("auto", {"LOCAL_RANK": "1"}) == torch.device("cuda", 1)
    assert resolve_device("cuda", {"LOCAL_RANK": "1"}) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", {"LOCAL_RANK": "1"}) == torch.device("cuda", 0)  # an explicit index wins
    assert resolve_device("cpu", {"LOCAL_RANK": "1"}) == torch.device("cpu")


def test_unavailable_devices_are_clear_errors(monkeypatch):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match=r"model.device='cuda', but torch sees no CUDA device"):
        resolve_device("cuda", {})
    fake_gpus(monkeypatch, 2)
    with pytest.raises(ValueError, match=r"resolves to cuda:2, but torch sees 2 CUDA device"):
        resolve_device("cuda", {"LOCAL_RANK": "2"})
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0", {})


def test_config_names_the_key_for_a_bad_device():
    assert validate_config({}).model.device == "auto"
    assert validate_config({"model": {"device": "cuda:1"}}).model.device == "cuda:1"
    with pytest.raises(ConfigError, match="model.device"):
        validate_config({"model": {"device": "gpu"}})


def test_rollout_to_moves_every_tensor_and_is_a_no_op_in_place():
    ro = Rollout(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
                 torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4),
                 torch.arange(2), torch.zeros(2, dtype=torch.bool),
                 routing=torch.full((2, 7, 1, 2), -1, dtype=torch.int16))
    assert ro.to("cpu") is ro
    meta = ro.to("meta")
    assert all(t.device.type == "meta" for t in vars(meta).values())
    assert dataclasses.replace(ro, routing=None).to("meta").routing is None  # an optional field stays absent


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hpt", [False, True])
def test_a_learner_on_the_gpu_gets_the_gradient_of_the_cpu(hpt):
    """The same rollouts (sampled on the CPU from the same weights) give the same gradient with the learner on the
    GPU as on the CPU: the step moves each micro-batch, its advantages and masks to the learner's device."""
    from step_helpers import flat_grad, length_rewards, step_context

    from unigrad.rollout.transformers_engine import TransformersEngine
    from unigrad.train.producing.routing import TrainingMode
    from unigrad.train.step import train_step

    grads, metrics = [], []
    for device in ("cpu", "cuda"):
        ctx = step_context(objective="dr_grpo" if hpt else "grpo", mode=TrainingMode("failed" if hpt else "none"))
        ctx.learner.model.to(device)  # parameters move in place: the optimizer keeps them
        tok = ctx.tokenizer
        ctx.engine = TransformersEngine(ctx.learner.model, tok.pad_token_id, tok.eos_token_id, device="cpu")
        length_rewards(ctx)
        seen, clip_and_step = {}, ctx.learner.clip_and_step

        def record(*args, seen=seen, ctx=ctx, clip_and_step=clip_and_step):
            seen["grad"] = flat_grad(ctx.learner.params).cpu().clone()
            return clip_and_step(*args)

        ctx.learner.clip_and_step = record
        m, _ = train_step(ctx, 1)
        grads.append(seen["grad"])
        metrics.append(m)
        assert ctx.learner.device.type == device
    assert metrics[0]["reward/mean"] == metrics[1]["reward/mean"]  # the same rollouts
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
