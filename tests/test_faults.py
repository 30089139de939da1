"""Faults and bad input met through the real CLI: configs that cannot train are refused before anything loads, what a
killed write leaves is cleaned up, final/ appears whole or not at all, a full disk is reported with its path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from unigrad.config import ConfigError, load_config


def cli(*args, cwd, **kw):
    env = {**os.environ, "UNIGRAD_CACHE": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unigrad.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600, **kw)


def tiny_run(model) -> list[str]:
    return [f"model.name={model}", "tasks=[arithmetic]", "max_steps=2", "prompts_per_step=2",
            "rollout.num_generations=2", "rollout.max_new_tokens=4", "train_pool_size=20", "eval.before_after=false",
            "threads=1", "save_every=1"]


@pytest.mark.parametrize("override, message", [
    ("max_steps=true", "max_steps: expected a number, got the boolean True"),
    ("rollout.temperature=false", "rollout.temperature: expected a number"),
    ("rollout.num_generations=1", "a group of one gets advantage 0"),
    ("rollout.temperature=0", "so the 8 completions of a prompt's group are identical"),
    ("tasks=[arithmetc]", "unknown task 'arithmetc'"),
    ("tasks=[/nonexistent/data.jsonl]", "/nonexistent/data.jsonl: no such file"),
    ("reward=/nonexistent/reward.py:score", "no such file /nonexistent/reward.py"),
])
def test_configs_that_cannot_train_are_refused_before_anything_is_made(override, message, tmp_path):
    res = cli("train", override, "--output-dir", tmp_path / "run", cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 3\nseed: 1\nmax_steps: 30\n")
    with pytest.raises(ConfigError, match="the key 'max_steps' is given twice"):
        load_config(path)
    assert load_config(None, ["rollout.num_generations=1", "objective_args.advantage=reinforce"]).max_steps == 680


@pytest.mark.slow  # 11 s (timed at load average 5-6 on 2 cores)
def test_unfinished_writes_of_a_killed_run_are_removed_when_it_resumes(small_model, tmp_path):
    out = tmp_path / "run"
    assert cli("train", *tiny_run(small_model), "--output-dir", out, cwd=tmp_path).returncode == 0
    stale = [out / "checkpoints" / ".tmp-step_000003-999", out / ".tmp-final-999"]
    for folder in stale:
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x" * 4096)
    res = cli("train", "--output-dir", out, "--resume", "--override", "max_steps=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "removed 2 unfinished write(s)" in res.stdout
    assert not any(p.exists() for p in stale)
    assert (out / "final" / "config.json").is_file() and not list(out.glob(".*"))


def test_final_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from unigrad.train.lifecycle.checkpoint import publish, remove_stale_temporaries

    final = tmp_path / "final"
    final.mkdir()
    (final / "weights").write_text("old")
    new = tmp_path / ".tmp-final-1"
    new.mkdir()
    (new / "weights").write_text("new")
    publish(new, final)
    assert (final / "weights").read_text() == "new" and not new.exists() and len(list(tmp_path.iterdir())) == 1
    # A kill between publish's two renames leaves no final/ but its old copy: the next start puts it back.
    (tmp_path / "final").rename(tmp_path / ".old-final-7")
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "final" / "weights").read_text() == "new"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a small tmpfs (root)")
def test_a_full_disk_is_reported_with_the_path_and_the_free_space(small_model, tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], check=True)
    try:
        res = cli("train", *tiny_run(small_model), "--output-dir", disk / "run", cwd=tmp_path)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "could not write" in res.stderr and str(disk / "run") in res.stderr and "MiB free there" in res.stderr
        assert "no space left on device" in res.stderr and "unexpected pos" not in res.stderr
        assert not list((disk / "run").glob("**/.tmp-*"))  # the failed write left nothing behind
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow  # 21 s (timed at load average 5-6 on 2 cores)
def test_resume_continues_with_the_runs_own_config_or_refuses(small_model, tmp_path):
    out = tmp_path / "run"
    assert cli("train", *tiny_run(small_model), "--output-dir", out, cwd=tmp_path).returncode == 0
    saved = (out / "config.yaml").read_bytes()
    # Settings that change the training: refused, each listed, config.yaml untouched.
    res = cli("train", *tiny_run(small_model), "objective=dapo", "optim.lr=0.01", "--output-dir", out, "--resume",
              cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "optim.lr: 0.0001 in the run, 0.01 given" in res.stderr and "objective: 'grpo' in the run" in res.stderr
    assert (out / "config.yaml").read_bytes() == saved
    # --override only for the keys a resumed run may change.
    res = cli("train", "--output-dir", out, "--resume", "--override", "optim.lr=0.1", cwd=tmp_path)
    assert res.returncode == 2 and "--override optim.lr: a resumed run can only change" in res.stderr
    assert cli("train", "--output-dir", out, "--override", "max_steps=3", cwd=tmp_path).returncode == 2
    # The same settings again, or none: continues; max_steps through --override.
    res = cli("train", *tiny_run(small_model), "--output-dir", out, "--resume", "--override", "max_steps=3",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from step 2" in res.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # A directory without a run is an error, not a fresh start.
    res = cli("train", *tiny_run(small_model), "--output-dir", tmp_path / "typo", "--resume", cwd=tmp_path)
    assert res.returncode == 2 and "holds no run" in res.stderr and not (tmp_path / "typo").exists()


@pytest.mark.parametrize("body, error", [
    ("raise RuntimeError('grader offline')", "RuntimeError: grader offline"),
    ("raise SystemExit(0)", "raised SystemExit"),
    ("return [None] * len(completions)", "rewards were NaN or None"),
    ("return [1e308] * len(completions)", "returned 1e+308, beyond the float32 range"),
    pytest.param("import time\n    time.sleep(30)", "took longer than reward_timeout=1 s",
                 marks=pytest.mark.slow),  # 17 s (timed at load average 5-6 on 2 cores); the others 5-7 s
])
def test_a_reward_that_never_scores_stops_the_run_naming_the_task_and_the_error(body, error, small_model, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(f"def score(prompts, completions, **kw):\n    {body}\n")
    out = tmp_path / "run"
    res = cli("train", *tiny_run(small_model), "max_steps=6", f"reward={reward}:score", "reward_timeout=1",
              "--output-dir", out, cwd=tmp_path)
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "every reward of task 'arithmetic' was unscorable for 3 steps in a row" in res.stderr
    assert error in res.stderr and "--resume" in res.stderr
    rows = [__import__("json").loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards/nan_count/arithmetic"] for r in rows] == [4.0, 4.0, 4.0]  # 2 prompts x 2 completions
    assert (out / "checkpoints" / "step_000003").is_dir()


@pytest.mark.slow  # 11 s (timed at load average 5-6 on 2 cores)
def test_a_reward_function_returning_a_dict_ends_the_run_at_once_saying_what_it_must_return(small_model, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text("def score(prompts, completions, **kw):\n    return {c: 1.0 for c in completions}\n")
    res = cli("train", *tiny_run(small_model), f"reward={reward}:score", "--output-dir", tmp_path / "run", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"unigrad train: reward function {reward}:score returned a dict" in res.stderr
    assert "it must return a list of 4 floats, one per completion in order" in res.stderr


@pytest.mark.slow  # 19 s and 20 s (timed at load average 5-6 on 2 cores)
@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_an_interrupt_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(signum, code, small_model,
                                                                                    tmp_path):
    import json
    import time

    out = tmp_path / "run"
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [a for a in tiny_run(small_model) if not a.startswith(("max_steps", "save_every"))]
    proc = subprocess.Popen([sys.executable, "-m", "unigrad.cli", "train", *args, "max_steps=500", "save_every=0",
                             "--output-dir", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in stderr, stderr[-2000:]
    done = len(metrics.read_text().splitlines())
    assert f"interrupted after step {done}" in stderr and f"--output-dir {out} --resume" in stderr
    assert (out / "checkpoints" / f"step_{done:06d}").is_dir()  # every finished step is kept
    res = cli("train", "--output-dir", out, "--resume", "--override", f"max_steps={done + 1}", cwd=tmp_path)
    assert res.returncode == 0 and f"resumed from step {done}" in res.stdout, res.stderr[-2000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, done + 2))


@pytest.mark.slow  # 18 s (timed at load average 5-6 on 2 cores)
def test_eval_of_a_run_uses_its_own_reward_function(small_model, tmp_path):
    import json

    reward = tmp_path / "reward.py"
    reward.write_text("def always(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    out = tmp_path / "run"
    assert cli("train", *tiny_run(small_model), f"reward={reward}:always", "--output-dir", out,
               cwd=tmp_path).returncode == 0
    res = cli("eval", out, "--prompts", "6", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["arithmetic"]["pass@1"] == 1.0  # not the verifier's 0


def test_eval_takes_each_test_prompt_once_and_leaves_out_what_does_not_fit(small_model):
    from unigrad.eval import evaluate
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.tasks import Example

    class Tiny:
        name = "tiny"

        def examples(self, split, n, seed=0):
            prompts = ["1+1", "2+2", "x" * 300]  # three distinct prompts, the last longer than the context
            return [Example(prompts[i % 3], "2", "2", "tiny") for i in range(n)]

        def verify(self, completions, examples):
            return [0.0] * len(completions)

    model, tokenizer = load_model_and_tokenizer(str(small_model))
    with pytest.warns(UserWarning, match="holds 3 distinct prompts"):
        res = evaluate(model, tokenizer, [Tiny()], 10, max_new_tokens=4)
    assert res["tiny"]["n"] == 2.0 and res["tiny"]["distinct_prompts"] == 3.0 and res["tiny"]["too_long"] == 1.0


@pytest.mark.slow  # 21 s (timed at load average 5-6 on 2 cores)
def test_errors_are_one_message_naming_the_input_and_the_fix_with_the_traceback_behind_debug(small_model, tmp_path):
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("max_steps: 3\n")
    res = cli("eval", run_dir, "--tasks", "arithmetic", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "holds no model" in res.stderr and "run directory without final/" in res.stderr
    assert "sentencepiece" not in res.stderr and "--debug" in res.stderr
    empty = tmp_path / "notamodel"
    empty.mkdir()
    res = cli("eval", empty, "--tasks", "arithmetic", cwd=tmp_path)
    assert res.returncode == 2 and "give a model directory in HF format" in res.stderr
    res = cli("--debug", "eval", empty, "--tasks", "arithmetic", cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" in res.stderr and "ModelNotFoundError" in res.stderr
