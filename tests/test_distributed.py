"""Data-parallel training: `unigrad train --nproc 2` (gloo on CPU) against one process on the same batch.

Every process draws the same prompts and keeps its block with the random streams those prompts have in one
process, so the two runs see identical samples; normalisers and gradients are summed over processes. The loss,
the pre-clip gradient norm, the per-task gradient statistics and every metric of step 1 must therefore match the
single-process run, and so must step 2, which starts from the weights the step-1 gradients produced.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REWARD = '''
def digits(completions, **kwargs):
    """A dense reward (share of even digits) so that a random model's groups have non-zero advantages."""
    return [sum(c.count(d) for d in "02468") / max(1, len(c)) for c in completions]
'''
SKIP = ("time/", "lr")  # wall-clock


@pytest.fixture(scope="module")
def setup(small_model, tmp_path_factory) -> tuple[Path, Path]:
    """The shared random char Llama (conftest.py) and a reward file for it."""
    reward = tmp_path_factory.mktemp("dist") / "reward_digits.py"
    reward.write_text(REWARD)
    return small_model, reward


def train(tmp: Path, out: str, nproc: int, model: Path, reward: Path, objective: str, extra=(), resume=False,
          override=()):
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp), "OMP_NUM_THREADS": "1"}
    args = [f"model.name={model}", f"objective={objective}", "max_steps=2", "tasks=[arithmetic,countdown]",
            f"reward={reward}:digits", "prompts_per_step=4", "rollout.num_generations=4",
            "rollout.max_new_tokens=10", "train_pool_size=40", "micro_batch_size=3", "threads=1", "seed=1",
            "eval.before_after=false", "save_every=0", *extra]
    res = subprocess.run([sys.executable, "-m", "unigrad.cli", "train", *args, "--output-dir", str(tmp / out),
                          "--nproc", str(nproc), *(["--resume"] if resume else []),
                          *[f"--override={item}" for item in override]],
                         capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp / out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(SKIP)} for r in rows]


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    """run(nproc, objective, extra) -> (run directory, metrics): each configuration trained once per module, since
    several tests compare against the same one-process (or two-process) run."""
    done: dict[tuple, tuple[Path, list[dict]]] = {}

    def get(nproc: int, objective: str, extra=()) -> tuple[Path, list[dict]]:
        key = (nproc, objective, tuple(extra))
        if key not in done:
            tmp = tmp_path_factory.mktemp(f"run{nproc}")
            done[key] = (tmp / "run", train(tmp, "run", nproc, *setup, objective, extra))
        return done[key]

    return get


def assert_same_metrics(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], float) and a[key] == a[key]:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
            else:
                assert str(a[key]) == str(b[key]), (a["step"], key)


@pytest.mark.slow  # 67 s to 76 s (timed at load average 5-7 on 2 cores)
@pytest.mark.parametrize("objective,extra", [
    ("grpo", ()),  # seq_mean_token_mean: sequence normaliser summed over processes
    ("dapo", ("rollout.dynamic_sampling=false",)),  # token_mean normaliser summed over processes; overlong shaping
    ("grpo", ("gradients.combine=balanced",)),  # per-task gradients reduced before they are rescaled
])
def test_two_processes_equal_one(run, objective, extra):
    """Replicated and sharded (FSDP) learners over two processes against one process."""
    _, one = run(1, objective, extra)
    assert one[0]["grad_norm"] > 0 and one[0]["advantage_abs/arithmetic"] > 0  # a real gradient to compare
    finals = []
    for sharding in ("none", "fsdp"):
        out, two = run(2, objective, (*extra, f"sharding={sharding}"))
        two = [{k: v for k, v in r.items() if k != "sharding/idle_passes"} for r in two]
        assert [r["step"] for r in two] == [1, 2]
        assert_same_metrics(one, two)
        finals.append(out / "final" / "model.safetensors")
    # The sharded run's final weights are the replicated run's (gathered whole before saving).
    from safetensors.torch import load_file

    a, b = (load_file(f) for f in finals)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow  # 41 s (timed at load average 5-7 on 2 cores)
def test_two_processes_equal_one_with_mini_batches(run):
    """Two mini-batches dealt over the step's global prompt order (each process trains its share of each): every
    optimizer step's normalisers and gradient are summed over both processes, as one process computes them."""
    extra = ("optim.mini_batches=2", "objective_args.epsilon=0.05")  # a narrow clip: the second step's ratios bite
    _, one = run(1, "grpo", extra)
    assert one[0]["optimizer_steps"] == 2.0 and one[1]["rl/ratio/max"] != 1.0
    _, two = run(2, "grpo", extra)
    assert_same_metrics(one, two)


def test_sharded_hpt_pads_the_processes_to_the_same_passes(setup, tmp_path):
    """HPT sends failed prompts to SFT, and per-task accounting groups micro-batches by task, so the processes hold
    different numbers of passes per (task, half, SFT or RL) group; the sharded step pads them with idle passes
    (every FSDP pass is a collective) and still matches one process."""
    model, reward = setup
    # gamma: some prompts to SFT under this reward. 8 samples in micro-batches of 16 rows: one process alone shares
    # each group's prompt pass there (a second decoder call), which a sharded pass must not do on one process only.
    extra = ("hybrid.gamma=0.05", "rollout.num_generations=8", "micro_batch_size=16")
    one = train(tmp_path, "one", 1, model, reward, "hpt", extra)
    fractions = [r["hpt/sft_fraction"] for r in one]
    assert any(0 < f < 1 for f in fractions), fractions  # a mixed step: SFT and RL passes both
    two = train(tmp_path, "two", 2, model, reward, "hpt", (*extra, "sharding=fsdp"))
    assert sum(r.pop("sharding/idle_passes") for r in two) > 0  # the processes did differ
    assert_same_metrics(one, two)


@pytest.mark.slow  # 48 s (timed at load average 5-7 on 2 cores)
def test_sharded_resume_continues_as_an_uninterrupted_run(setup, run, tmp_path):
    """Checkpoint of a sharded learner (model and AdamW state gathered on rank 0), then --resume on two processes."""
    model, reward = setup
    extra = ("gradients.combine=balanced", "sharding=fsdp")
    _, whole = run(2, "grpo", extra)  # also one of test_two_processes_equal_one's runs
    train(tmp_path, "cut", 2, model, reward, "grpo", (*extra, "max_steps=1"))
    resumed = train(tmp_path, "cut", 2, model, reward, "grpo", (*extra, "max_steps=1"), resume=True,
                    override=("max_steps=2",))
    assert [r["step"] for r in resumed] == [1, 2]
    assert_same_metrics(whole, resumed)


def test_prompts_must_split_evenly(setup, tmp_path, monkeypatch):
    """--nproc is checked before the processes start; the same check inside `train` covers torchrun and accelerate."""
    from unigrad.config import ConfigError, validate_config
    from unigrad.train.lifecycle import run as run_module

    model, reward = setup
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "unigrad.cli", "train", f"model.name={model}", "max_steps=1",
                          "tasks=[arithmetic]", "prompts_per_step=3", "rollout.num_generations=2",
                          "--output-dir", str(tmp_path / "odd"), "--nproc", "2"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 2
    assert "prompts_per_step=3 must be a multiple of the number of processes (2)" in res.stderr
    assert not (tmp_path / "odd").exists()

    class TwoProcesses:  # what init_distributed returns under a 2-process launcher, for the check it feeds
        world, active, is_main = 2, True, True

    cfg = validate_config({"model": {"name": str(model)}, "prompts_per_step": 3, "tasks": ["arithmetic"]})
    monkeypatch.setattr(run_module, "init_distributed", lambda device: TwoProcesses())
    with pytest.raises(ConfigError, match=r"prompts_per_step=3 must be a multiple of the number of processes \(2\)"):
        run_module.train(cfg, tmp_path / "odd2")


def test_accelerate_launch_settings_are_read_or_refused():
    from unigrad.config import ConfigError
    from unigrad.train.lifecycle.distributed import accelerate_launch_settings

    assert accelerate_launch_settings({}, "none") == ("none", [])
    sharding, notes = accelerate_launch_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "1",
                                                  "FSDP_OFFLOAD_PARAMS": "false"}, "none")
    assert sharding == "fsdp" and notes == ["accelerate launch asked for FSDP: training with sharding=fsdp "
                                            "(torch FSDP2, full sharding)"]
    sharding, notes = accelerate_launch_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true",
                                                  "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP",
                                                  "ACCELERATE_MIXED_PRECISION": "bf16"}, "fsdp")
    assert sharding == "fsdp" and len(notes) == 2
    assert "FSDP_SHARDING_STRATEGY=SHARD_GRAD_OP, FSDP_OFFLOAD_PARAMS=true" in notes[0]
    assert "mixed_precision=bf16 is not applied" in notes[1]
    with pytest.raises(ConfigError, match="DeepSpeed"):
        accelerate_launch_settings({"ACCELERATE_USE_DEEPSPEED": "true"}, "none")


@pytest.mark.slow  # 20 s (timed at load average 5-7 on 2 cores)
def test_accelerate_launch_with_fsdp_equals_one_process(setup, run, tmp_path):
    """`accelerate launch --use_fsdp` (the FSDP plugin's environment) trains sharded, with one process's metrics."""
    model, reward = setup
    _, one = run(1, "grpo")
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [f"model.name={model}", "objective=grpo", "max_steps=2", "tasks=[arithmetic,countdown]",
            f"reward={reward}:digits", "prompts_per_step=4", "rollout.num_generations=4",
            "rollout.max_new_tokens=10", "train_pool_size=40", "micro_batch_size=3", "threads=1", "seed=1",
            "eval.before_after=false", "save_every=0"]
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--use_fsdp",
                          "-m", "unigrad.cli", "train", *args, "--output-dir", str(tmp_path / "acc")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "training with sharding=fsdp" in res.stdout
    assert "sharding: fsdp" in (tmp_path / "acc" / "config.yaml").read_text()
    rows = [json.loads(line) for line in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    two = [{k: v for k, v in r.items() if not k.startswith(SKIP)} for r in rows]
    assert all("sharding/idle_passes" in r for r in two)  # the sharded step ran
    for r in two:
        r.pop("sharding/idle_passes")
    assert_same_metrics(one, two)
