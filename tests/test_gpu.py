"""unigrad's GPU paths, on a CUDA GPU: `pytest -m gpu` (benchmarks/gpu/check.sh runs them; docs/scaling.md).

Skipped wherever torch sees no CUDA device. What runs there: the learner and the colocated transformers engine on
the GPU for real steps; a bfloat16 engine against the float32 learner (a real train-inference mismatch, small and
finite); a one-process NCCL group through every collective the data-parallel step uses; the FSDP-sharded learner on
one GPU against the replicated one; and `--resume` on the GPU against an uninterrupted run. The learner's gradient on
the GPU against the CPU's is in tests/test_device.py.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here; "
                                 "benchmarks/gpu/check.sh runs these where there is one)")]

TASKS = ("arithmetic", "countdown")
FINITE = ("loss", "grad_norm", "reward/mean", "rl/entropy", "mismatch/kl_k3", "mismatch/abs_logp_diff_mean")
REWARD = '''
def digits(completions, **kwargs):
    """A dense reward (share of even digits) so that a random model's groups have non-zero advantages."""
    return [sum(c.count(d) for d in "02468") / max(1, len(c)) for c in completions]
'''


def digits(completions, **kwargs):
    return [sum(c.count(d) for d in "02468") / max(1, len(c)) for c in completions]


def gpu_context(model_path: Path, *overrides: str, dist=None):
    """The step context `unigrad train` builds, for the random small char Llama on cuda:0 (two tasks scored by the
    dense `digits` reward, so every group has a gradient)."""
    from unigrad.config import load_config
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.tasks import get_tasks
    from unigrad.train.lifecycle.build import build_step_context
    from unigrad.train.lifecycle.distributed import SINGLE

    cfg = load_config(None, [f"model.name={model_path}", f"tasks=[{','.join(TASKS)}]", "prompts_per_step=4",
                             "rollout.num_generations=4", "rollout.max_new_tokens=12", "micro_batch_size=8",
                             "train_pool_size=40", "seed=1", "model.device=cuda:0", "optim.lr=1e-3", *overrides])
    model, tok = load_model_and_tokenizer(str(model_path), device="cuda:0")
    tasks = [t for spec in TASKS for t in get_tasks(spec, reward=digits)]
    ctx, _, _ = build_step_context(cfg, model, tok, tasks, dist=dist or SINGLE)
    return ctx


def assert_finite(metrics: dict) -> None:
    for key in FINITE:
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics.get(key))


def test_learner_and_engine_train_on_the_gpu(small_model):
    """`model.device=cuda`: the learner's parameters and optimizer state, and the engine sharing its module, are on the
    GPU; real steps there give finite metrics, change the weights, and the float32 engine's log-probs are the
    learner's (static decoder against the full forward, same weights and dtype)."""
    from unigrad.train.step import train_step

    ctx = gpu_context(small_model)
    assert ctx.learner.device == torch.device("cuda", 0)
    assert ctx.engine.device.type == "cuda" and ctx.engine.shares_learner_module and ctx.engine.decoder == "static"
    before = [p.detach().clone() for p in ctx.learner.params]
    for step in (1, 2):
        metrics, samples = train_step(ctx, step)
        assert_finite(metrics)
        assert metrics["grad_norm"] > 0 and samples
        assert metrics["mismatch/kl_k3"] < 1e-6 and metrics["mismatch/abs_logp_diff_max"] < 1e-3, metrics
    assert all(s["exp_avg"].is_cuda for s in ctx.learner.optimizer.state.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, ctx.learner.params, strict=True))


def test_a_bfloat16_engine_against_the_float32_learner_is_a_real_small_mismatch(small_model):
    """`rollout.dtype=bfloat16` on the GPU: the engine holds its own bfloat16 copy there, the mismatch it causes is
    real (non-zero) but small and finite, and after each optimizer step the copy carries the learner's new weights
    (rounded to bfloat16)."""
    from unigrad.train.step import train_step

    ctx = gpu_context(small_model, "rollout.dtype=bfloat16")
    engine_params = list(ctx.engine.model.parameters())
    assert not ctx.engine.shares_learner_module
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in engine_params)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in ctx.learner.params)
    for step in (1, 2):
        metrics, _ = train_step(ctx, step)
        assert_finite(metrics)
        assert 0 < metrics["mismatch/kl_k3"] < 0.05, metrics["mismatch/kl_k3"]  # 0.05: the monitors' alarm
        assert metrics["mismatch/abs_logp_diff_mean"] > 1e-5
    learner = dict(ctx.learner.model.named_parameters())
    for name, param in ctx.engine.model.named_parameters():
        assert torch.equal(param, learner[name].detach().to(torch.bfloat16)), name


@pytest.fixture(scope="module")
def nccl_group():
    """A one-process NCCL group on cuda:0 (NCCL refuses two ranks on one GPU, so one process is what one GPU
    allows); destroyed after the module."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield dist
    dist.destroy_process_group()


def one_process_collectives():
    """unigrad's Distributed with its collectives switched on: with one process they are skipped (world 1 is not
    `active`); here they run, through NCCL, so that every one of them is exercised on the GPU."""
    from unigrad.train.lifecycle.distributed import Distributed

    class Collectives(Distributed):
        @property
        def active(self) -> bool:
            return True

    return Collectives(rank=0, world=1, device=torch.device("cuda", 0))


def test_a_one_process_nccl_group_runs_every_collective_of_the_step(nccl_group):
    assert nccl_group.get_backend() == "nccl"
    d = one_process_collectives()
    on_gpu = torch.arange(4.0, device="cuda")
    assert d.sum_(on_gpu) is on_gpu and on_gpu.tolist() == [0.0, 1.0, 2.0, 3.0]
    on_cpu = torch.tensor([1.5, -2.0], dtype=torch.float64)  # reduced through a copy on the GPU, back in place
    assert d.sum_(on_cpu) is on_cpu and on_cpu.device.type == "cpu" and on_cpu.tolist() == [1.5, -2.0]
    assert d.sum_float(2.5) == 2.5
    assert d.gather({"rank": 0, "rows": [1, 2]}) == [{"rank": 0, "rows": [1, 2]}]
    wide = torch.ones(2, 3, dtype=torch.bool)
    assert torch.equal(d.cat(wide), wide)
    params = [torch.nn.Parameter(torch.ones(3, device="cuda")), torch.nn.Parameter(torch.ones(2, 2, device="cuda"))]
    params[0].grad = torch.full((3,), 0.5, device="cuda")  # the second has no gradient: summed as zeros
    d.sum_gradients(params)
    assert params[0].grad.tolist() == [0.5] * 3 and params[1].grad.abs().sum() == 0 and params[1].grad.is_cuda
    d.barrier()


def test_the_fsdp_learner_on_one_gpu_matches_the_replicated_learner(small_model, nccl_group):
    """`sharding=fsdp` over the one-process NCCL group: the step's whole data-parallel path (gathered rewards,
    summed normalisers, reduced per-task gradients, FSDP passes and reduce-scatters) gives the metrics of the plain
    replicated learner at steps 1 and 2, and the same weights, gathered whole, after them."""
    from torch.distributed.tensor import DTensor

    from unigrad.train.step import train_step

    plain = gpu_context(small_model)
    sharded = gpu_context(small_model, "sharding=fsdp", dist=one_process_collectives())
    assert sharded.learner.sharded and all(isinstance(p, DTensor) for p in sharded.learner.params)
    for step in (1, 2):
        a, _ = train_step(plain, step)
        b, _ = train_step(sharded, step)
        assert b.pop("sharding/idle_passes") == 0
        assert_finite(b)
        assert set(a) == set(b)
        for key, value in a.items():
            if key.startswith("time/") or not isinstance(value, float) or value != value:
                continue
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    model_state, optimizer_state = sharded.learner.checkpoint_state()  # gathered whole: what a checkpoint holds
    whole = plain.learner.model.state_dict()
    assert set(model_state) == set(whole) and optimizer_state["state"]
    for key, value in whole.items():
        torch.testing.assert_close(model_state[key].to(value.device), value, rtol=1e-4, atol=1e-5)


def cli_train(tmp: Path, out: str, model: Path, reward: Path, steps: int, resume: bool = False):
    """`unigrad train` on the GPU (`model.device=cuda` is an error without one), deterministic kernels where torch
    has them (a warning elsewhere)."""
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    launcher = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                "from unigrad.cli import main; sys.exit(main(sys.argv[1:]))")
    args = [f"model.name={model}", f"max_steps={steps}", f"tasks=[{','.join(TASKS)}]", f"reward={reward}:digits",
            "prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=10", "train_pool_size=40",
            "micro_batch_size=8", "seed=3", "save_every=2", "eval.before_after=false", "model.device=cuda",
            "optim.lr=1e-3"]
    # Resumed: the run's own config, with a longer max_steps (the one setting a resumed run changes here).
    given = ["--resume", f"--override=max_steps={steps}"] if resume else args
    res = subprocess.run([sys.executable, "-c", launcher, "train", *given, "--output-dir", str(tmp / out)],
                         capture_output=True, text=True, cwd=tmp, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp / out / "metrics.jsonl").read_text().splitlines()]
    return res.stdout, [{k: v for k, v in r.items() if not k.startswith(("time/", "lr"))} for r in rows]


def test_resume_on_the_gpu_continues_as_an_uninterrupted_run(small_model, tmp_path):
    """A GPU run cut after its step-2 checkpoint and resumed gives the uninterrupted run's steps 3 and 4 and final
    weights (within float tolerance: the GPU's reductions are not bitwise reproducible everywhere)."""
    from safetensors.torch import load_file

    reward = tmp_path / "reward_digits.py"
    reward.write_text(REWARD)
    _, whole = cli_train(tmp_path, "whole", small_model, reward, 4)
    cli_train(tmp_path, "cut", small_model, reward, 2)
    out, resumed = cli_train(tmp_path, "cut", small_model, reward, 4, resume=True)
    assert "resumed from step" in out
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] == [r["step"] for r in whole]
    for a, b in zip(whole, resumed, strict=True):
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, float) and value == value:
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)
            else:
                assert str(b[key]) == str(value), (a["step"], key)
    x, y = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("whole", "cut"))
    assert set(x) == set(y) and all(torch.allclose(x[k], y[k], rtol=1e-4, atol=1e-5) for k in x)
