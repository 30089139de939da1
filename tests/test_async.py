"""Asynchronous rollouts: the engine's worker samples ahead of the learner by at most k weight versions.

The steps run through `train_step` with a real worker process (a spawned copy of the small char Llama). Staleness
is fixed when a batch is asked for, not when it arrives, so a slow learner or a slow engine changes the waiting,
never the rows: the metrics of a run do not depend on the timing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from step_helpers import length_rewards, step_context

import unigrad.train.step as step_module
from unigrad.rollout.async_worker import EngineWorker, RolloutWorkerDied
from unigrad.train.producing.pipeline import RolloutPipeline, thread_split
from unigrad.train.step import train_step


def run_async(k: int, steps: int, learner_delay: float = 0.0, engine_delay: float = 0.0, monkeypatch=None):
    """`steps` steps with rollouts k versions ahead; metrics per step, timings dropped. The delays make the learner
    slower (before each update) or the engine's results later (before each arrives)."""
    ctx = step_context()
    length_rewards(ctx)
    tok = ctx.tokenizer
    ctx.pipeline = RolloutPipeline(ctx, k, make_worker=lambda: EngineWorker(
        ctx.learner.model, tok.pad_token_id, tok.eos_token_id, threads=1, timeout=120))
    if learner_delay:
        learn = step_module.learn

        def slow_learn(*args, **kwargs):
            time.sleep(learner_delay)
            return learn(*args, **kwargs)

        monkeypatch.setattr(step_module, "learn", slow_learn)
    if engine_delay:
        result = EngineWorker.result

        def late_result(self, future):
            time.sleep(engine_delay)
            return result(self, future)

        monkeypatch.setattr(EngineWorker, "result", late_result)
    ctx.pipeline.start(0)
    try:
        rows = [train_step(ctx, step)[0] for step in range(1, steps + 1)]
    finally:
        ctx.pipeline.close()
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows], ctx


@pytest.mark.slow  # 34 s and 46 s (timed at load average 5-9 on 2 cores)
@pytest.mark.parametrize("k", [1, 2])
def test_staleness_is_bounded_by_k_and_the_rows_do_not_depend_on_timing(k, monkeypatch):
    steps = 5
    fast, _ = run_async(k, steps)
    slow_learner, _ = run_async(k, steps, learner_delay=0.3, monkeypatch=monkeypatch)
    monkeypatch.undo()
    slow_engine, _ = run_async(k, steps, engine_delay=0.3, monkeypatch=monkeypatch)
    for rows in (fast, slow_learner, slow_engine):
        assert [r["staleness/max"] for r in rows] == [min(step - 1, k) for step in range(1, steps + 1)]
        assert all(r["staleness/regenerated"] == 0 for r in rows)
    assert slow_learner == fast and slow_engine == fast


@pytest.mark.slow  # 11 s (timed at load average 5-9 on 2 cores)
def test_k_ahead_samples_with_the_weights_of_k_versions_ago():
    """Step 3 at k=1 is sampled by version 1: the weights after step 1, not the initial ones (version 0)."""
    rows, ctx = run_async(1, 3)
    assert rows[2]["staleness/max"] == 1.0
    synchronous = step_context()
    length_rewards(synchronous)
    sync_rows = [train_step(synchronous, step)[0] for step in range(1, 4)]
    # Step 1 is on-policy in both; later steps differ (the asynchronous rows come from older weights).
    assert rows[0]["reward/mean"] == sync_rows[0]["reward/mean"]
    assert any(rows[s]["rl/entropy"] != sync_rows[s]["rl/entropy"] for s in (1, 2))


def test_a_worker_that_dies_is_a_clear_error_not_a_hang():
    ctx = step_context()
    tok = ctx.tokenizer
    worker = EngineWorker(ctx.learner.model, tok.pad_token_id, tok.eos_token_id, threads=1, timeout=60)
    try:
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RolloutWorkerDied, match="died"):
            worker.result(worker.submit_generate([[3, 4, 5]], 2, ctx.sampling))
        assert time.monotonic() - started < 30
    finally:
        worker.close()


@pytest.mark.slow  # 11 s (timed at load average 5-9 on 2 cores)
def test_a_worker_that_stops_answering_times_out_and_closing_it_ends_its_process():
    import psutil

    ctx = step_context()
    tok = ctx.tokenizer
    worker = EngineWorker(ctx.learner.model, tok.pad_token_id, tok.eos_token_id, threads=1, timeout=60)
    process = psutil.Process(worker.pid)
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # alive, but silent
        worker.timeout = 2
        with pytest.raises(RolloutWorkerDied, match="no result within 2 s"):
            worker.result(worker.submit_generate([[3, 4, 5]], 2, ctx.sampling))
    finally:
        worker.close()  # a pool's own shutdown would wait for the stopped job; the process must go now
    gone, alive = psutil.wait_procs([process], timeout=10)
    assert not alive


@pytest.mark.slow  # 20 s (timed at load average 5-9 on 2 cores)
def test_an_idle_worker_ends_when_the_training_process_is_killed(tmp_path):
    """SIGKILL leaves the training process no chance to close its worker; an idle worker, waiting on a job queue
    it holds both ends of, would wait forever unless it watches its parent."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from model_helpers import tiny_model\n"
        "from unigrad.rollout.async_worker import EngineWorker\n"
        "if __name__ == '__main__':\n"
        "    model = tiny_model(16, hidden_size=8, num_hidden_layers=1)\n"
        "    worker = EngineWorker(model, 0, 1, threads=1, timeout=120)\n"
        "    print(worker.pid, flush=True)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        worker = psutil.Process(int(parent.stdout.readline()))  # started and answered: idle from here on
        assert worker.ppid() == parent.pid
        parent.kill()
        parent.wait()
        gone, alive = psutil.wait_procs([worker], timeout=20)
        for process in alive:
            process.kill()
        assert not alive, "the idle worker outlived the killed training process"
    finally:
        parent.kill()


def test_thread_split_gives_each_side_a_core_on_two():
    assert thread_split(0, 0, 2) == (1, 1)
    assert thread_split(0, 0, 16) == (8, 8)
    assert thread_split(0, 3, 16) == (13, 3)
    assert thread_split(4, 0, 16) == (4, 8)
    assert thread_split(0, 0, 1) == (1, 1)


@pytest.mark.slow  # 11 s (timed at load average 5-9 on 2 cores)
def test_the_pipeline_state_holds_the_batches_in_flight():
    ctx = step_context()
    length_rewards(ctx)
    tok = ctx.tokenizer
    ctx.pipeline = RolloutPipeline(ctx, 1, make_worker=lambda: EngineWorker(
        ctx.learner.model, tok.pad_token_id, tok.eos_token_id, threads=1, timeout=120))
    ctx.pipeline.start(0)
    try:
        for step in (1, 2):
            train_step(ctx, step)
        state = ctx.pipeline.state_dict()  # waits for what is in flight
    finally:
        ctx.pipeline.close()
    # After step 2 the pipeline holds steps 3 and 4 (k + 1 batches), sampled by versions 1 and 2.
    assert sorted((j["step"], j["version"]) for j in state["pending"]) == [(3, 1), (4, 2)]
    assert all(isinstance(j["rollout"]["completion_ids"], torch.Tensor) for j in state["pending"])


def shift(model, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


@pytest.mark.slow  # 20 s (timed at load average 5-9 on 2 cores)
def test_weights_sent_to_the_worker_are_a_snapshot_the_learner_cannot_change_afterwards():
    """The executor pickles a job's arguments in its own thread, later: changing the weights in place right after
    sending them (the learner's next optimizer step) must not reach the engine."""
    from unigrad.rollout.transformers_engine import TransformersEngine

    ctx = step_context()
    tok, model = ctx.tokenizer, ctx.learner.model
    sampling = type(ctx.sampling)(temperature=1.0, max_new_tokens=6, seed=3)
    prompts = [[3, 4, 5, 6], [7, 8, 9]]
    want = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id).generate(prompts, 4, sampling)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    shift(model, 1.0)  # the worker's copy starts from other weights, then is sent the ones `want` used
    worker = EngineWorker(model, tok.pad_token_id, tok.eos_token_id, threads=1, timeout=120)
    model.load_state_dict(original)
    try:
        worker.submit_weights(model.state_dict())
        shift(model, 5.0)  # the learner moves on at once
        got = worker.result(worker.submit_generate(prompts, 4, sampling)).rollout
    finally:
        worker.close()
    assert torch.equal(got.completion_ids, want.completion_ids)
    torch.testing.assert_close(got.infer_logprobs, want.infer_logprobs)


@pytest.mark.slow  # 24 s (timed at load average 5-9 on 2 cores)
def test_each_batch_is_sampled_by_the_weights_of_its_version():
    """k = 1, three steps: the batches taken (steps 1-3, versions 0, 0, 1) and those in flight after step 3 (steps 4
    and 5, versions 2 and 3) are generated again here, in this process, with a copy of the learner's weights as they
    were after step `version`; the worker's rows must be exactly those (a batch submitted before the newest weights
    reached the engine would be sampled by the version before)."""
    from step_helpers import small_char_llama

    from unigrad.rollout.transformers_engine import TransformersEngine
    from unigrad.train.producing.produce import generation_request

    ctx = step_context()
    length_rewards(ctx)
    tok, model = ctx.tokenizer, ctx.learner.model
    ctx.pipeline = RolloutPipeline(ctx, 1, make_worker=lambda: EngineWorker(
        model, tok.pad_token_id, tok.eos_token_id, threads=1, timeout=120))
    taken, take = [], ctx.pipeline.take

    def recording_take(step):
        job, waited = take(step)
        taken.append((job.step, job.version, job.picks, job.job.rollout))
        return job, waited

    ctx.pipeline.take = recording_take
    weights = [{k: v.detach().clone() for k, v in model.state_dict().items()}]  # version 0
    ctx.pipeline.start(0)
    try:
        for step in (1, 2, 3):
            train_step(ctx, step)
            weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})  # version `step`
        pending = ctx.pipeline.state_dict()["pending"]
    finally:
        ctx.pipeline.close()
    batches = taken + [(j["step"], j["version"], j["picks"], j["rollout"]) for j in pending]
    assert [(s, v) for s, v, _, _ in batches] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    copy = small_char_llama(tok)
    engine = TransformersEngine(copy, tok.pad_token_id, tok.eos_token_id)
    for step, version, picks, rollout in batches:
        copy.load_state_dict(weights[version])
        want = engine.generate(*generation_request(ctx, step, picks, stream_offset=0))
        completion_ids = rollout["completion_ids"] if isinstance(rollout, dict) else rollout.completion_ids
        infer = rollout["infer_logprobs"] if isinstance(rollout, dict) else rollout.infer_logprobs
        same_rows = torch.equal(completion_ids, want.completion_ids)
        assert same_rows, f"step {step}: not the rows that the weights of version {version} sample"
        torch.testing.assert_close(infer, want.infer_logprobs, msg=f"step {step}, version {version}")
