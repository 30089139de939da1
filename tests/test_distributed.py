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


def train(tmp: Path, out: str, nproc: int, model: Path, reward: Path, objective: str, extra=()):
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp), "OMP_NUM_THREADS": "1"}
    args = [f"model.name={model}", f"objective={objective}", "max_steps=2", "tasks=[arithmetic,countdown]",
            f"reward={reward}:digits", "prompts_per_step=4", "rollout.num_generations=4",
            "rollout.max_new_tokens=10", "train_pool_size=40", "micro_batch_size=3", "threads=1", "seed=1",
            "eval.before_after=false", "save_every=0", *extra]
    res = subprocess.run([sys.executable, "-m", "unigrad.cli", "train", *args, "--output-dir", str(tmp / out),
                          "--nproc", str(nproc)], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp / out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(SKIP)} for r in rows]


@pytest.mark.parametrize("objective,extra", [
    ("grpo", ()),  # seq_mean_token_mean: sequence normaliser summed over processes
    ("dapo", ()),  # token_mean: token normaliser summed over processes
    ("grpo", ("sampler.name=balanced",)),  # per-task gradients reduced before they are rescaled
])
def test_two_processes_equal_one(setup, tmp_path, objective, extra):
    model, reward = setup
    one = train(tmp_path, "one", 1, model, reward, objective, extra)
    two = train(tmp_path, "two", 2, model, reward, objective, extra)
    assert [r["step"] for r in two] == [1, 2]
    assert one[0]["grad_norm"] > 0 and one[0]["advantage_abs/arithmetic"] > 0  # a real gradient to compare
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], float) and a[key] == a[key]:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
            else:
                assert str(a[key]) == str(b[key]), (a["step"], key)
    assert (tmp_path / "two" / "final" / "config.json").is_file()


def test_prompts_must_split_evenly(setup, tmp_path):
    model, reward = setup
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "unigrad.cli", "train", f"model.name={model}", "max_steps=1",
                          "tasks=[arithmetic]", "prompts_per_step=3", "rollout.num_generations=2",
                          "rollout.max_new_tokens=4", "train_pool_size=20", "eval.before_after=false",
                          "--output-dir", str(tmp_path / "odd"), "--nproc", "2"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode != 0
    assert "prompts_per_step=3 must be a multiple of the number of processes (2)" in res.stderr
