"""A careless user's mistakes with `unigrad train`, through the real CLI: each ends in one clear line naming the
cause and the fix (most before any model loads or the run directory is made), or in the right behaviour; never in
exit 0 with a wrong result or lost data."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unigrad.cli import main


def cli(*args, cwd, env=None):
    env = {**os.environ, "UNIGRAD_CACHE": str(cwd), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "unigrad.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def tiny(model, steps: int = 2) -> list[str]:
    return [f"model.name={model}", "tasks=[arithmetic]", f"max_steps={steps}", "prompts_per_step=2",
            "rollout.num_generations=2", "rollout.max_new_tokens=4", "train_pool_size=20",
            "eval.before_after=false", "threads=1", "save_every=1"]


def refused(capsys, *argv) -> str:
    """`unigrad train ARGV` in this process: exit 2, one message, no traceback; returns stderr."""
    assert main(["train", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("unigrad train: "), err
    return err


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Refused before any model loads and before the run directory is made.

def test_spaces_around_equals_are_named_with_the_spelling_that_works(capsys, tmp_path):
    for words in (["max_steps", "=", "3"], ["max_steps", "=3"], ["max_steps=", "3"]):
        err = refused(capsys, *words, "--output-dir", tmp_path / "run")
        assert "write max_steps=3" in err and "does not exist" not in err
    assert not (tmp_path / "run").exists()


def test_a_config_file_after_the_settings_is_told_to_come_first(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("max_steps: 3\n")
    err = refused(capsys, "max_steps=3", cfg, "--output-dir", tmp_path / "run")
    assert f"the config file {cfg} must come first" in err and f"unigrad train {cfg} max_steps=3" in err
    assert not (tmp_path / "run").exists()


def test_the_input_config_file_is_never_overwritten_by_the_resolved_one(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = run / "config.yaml"
    cfg.write_text("# my notes: why three steps\nmax_steps: 3\n")
    before = cfg.read_bytes()
    err = refused(capsys, cfg, "--output-dir", run)
    assert "would save its resolved config" in err and "choose another --output-dir" in err
    assert cfg.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_jsonl_file_named_json_is_told_to_be_renamed(capsys, tmp_path):
    data = write_rows(tmp_path / "data.json", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}])
    err = refused(capsys, f"tasks=[{data}]", "--output-dir", tmp_path / "run")
    assert "looks like JSON Lines" in err and "rename it to data.jsonl" in err and "Extra data" not in err
    assert not (tmp_path / "run").exists()


def test_an_output_path_that_is_a_file_is_named_as_such(capsys, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for out in (target, target / "run"):
        err = refused(capsys, "tasks=[arithmetic]", "--output-dir", out)
        assert f"{target} is a file, not a directory" in err and "File exists" not in err
    assert target.read_text() == "keep me"


def test_sft_on_rows_without_a_demonstration_names_the_rows_at_load(capsys, tmp_path):
    rows = [{"prompt": f"{i}+1?", "answer": str(i + 1), "split": "train",
             **({"demonstration": f"Answer: {i + 1}"} if i not in (1, 3) else {})} for i in range(6)]
    data = write_rows(tmp_path / "demos.jsonl", [*rows, {"prompt": "9+1?", "answer": "10", "split": "test"}])
    err = refused(capsys, f"tasks=[{data}]", "objective=sft", "--output-dir", tmp_path / "run")
    assert "objective=sft needs a demonstration for every training row" in err
    assert "task 'demos': row(s) 2, 4 have none" in err
    assert not (tmp_path / "run").exists()


def test_one_distinct_prompt_explains_why_there_is_no_test_split(capsys, tmp_path):
    data = write_rows(tmp_path / "one.jsonl", [{"prompt": "1+1?", "answer": "2"}] * 3)
    err = refused(capsys, f"tasks=[{data}]", "--output-dir", tmp_path / "run")
    assert "task 'one' has no test split: its 3 row(s) hold 1 distinct prompt(s)" in err
    assert "split by distinct prompt" in err and "split='test'" in err and "no examples to draw from" not in err
    assert not (tmp_path / "run").exists()


def test_wandb_without_credentials_is_refused_before_the_run_directory_is_made(capsys, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    err = refused(capsys, "tasks=[arithmetic]", "report_to=[wandb]", "--output-dir", tmp_path / "run")
    assert "no W&B credentials found" in err and "WANDB_MODE=offline" in err
    assert not (tmp_path / "run").exists()


def test_an_unfinished_run_directory_as_the_model_is_refused_before_anything_is_made(capsys, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("max_steps: 3\n")
    err = refused(capsys, f"model.name={unfinished}", "tasks=[arithmetic]", "--output-dir", tmp_path / "run")
    assert "run directory without final/" in err and not (tmp_path / "run").exists()


def test_the_keys_the_stop_messages_advise_are_accepted_by_resume(tmp_path):
    from unigrad.config import load_config, resume_config

    cfg = resume_config(load_config(None, ["max_steps=5"]), None,
                        ["reward_timeout=30", "monitors.grad_norm_cap=2.5"], tmp_path)
    assert cfg.reward_timeout == 30 and cfg.monitors.grad_norm_cap == 2.5


def test_a_builtin_tasks_finite_prompt_space_is_not_warned_about(caplog):
    from unigrad.tasks import load_tasks

    with caplog.at_level(logging.INFO):
        examples = load_tasks(["arithmetic"], None, None)[0].examples("train", 2000, seed=0)
    assert len(examples) == 2000 and len({e.prompt for e in examples}) < 2000  # its space did run out
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], caplog.records


# With a finished run (a 2-step run of a small real model).

@pytest.fixture(scope="module")
def finished(small_model, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("finished")
    res = cli("train", *tiny(small_model), "--output-dir", cwd / "run", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd / "run"


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("damage", ["checkpoints deleted", "every checkpoint unreadable"])
def test_resume_without_a_checkpoint_refuses_and_changes_nothing(damage, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    if damage == "checkpoints deleted":
        shutil.rmtree(run / "checkpoints")
    else:
        for state in run.glob("checkpoints/*/state.pt"):
            state.write_bytes(b"not a checkpoint")
    before = snapshot(run)
    res = cli("train", "--output-dir", run, "--resume", "--override", "max_steps=3", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "Start the run again without --resume into a fresh --output-dir" in res.stderr
    assert snapshot(run) == before  # metrics.jsonl, final/ and config.yaml as they were


def test_resume_with_max_steps_below_the_steps_done_refuses_and_changes_nothing(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    res = cli("train", "--output-dir", run, "--resume", "--override", "max_steps=1", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "max_steps=1 is below the 2 steps" in res.stderr and "nothing was changed" in res.stderr
    assert snapshot(run) == before


def test_a_finished_run_directory_as_the_model_trains_from_its_final_model(finished, tmp_path):
    res = cli("train", f"model.name={finished}", *tiny(finished, steps=1)[1:], "--output-dir", tmp_path / "next",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "next" / "final" / "config.json").is_file()


@pytest.mark.slow  # 22 s (timed at load average 5-7 on 2 cores)
def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_pid(small_model, tmp_path):
    from unigrad.train.lifecycle.run_lock import RunDirectoryLock

    out = tmp_path / "run"
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [a for a in tiny(small_model) if not a.startswith("max_steps")]
    first = subprocess.Popen([sys.executable, "-m", "unigrad.cli", "train", *args, "max_steps=500", "--output-dir",
                              str(out)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():  # training: past the start, holding the directory
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        for extra in ([], ["--resume"]):
            res = cli("train", *args, "max_steps=500", "--output-dir", out, *extra, cwd=tmp_path)
            assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
            assert f"is in use by another unigrad train (pid {first.pid})" in res.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the kernel releases the lock
        first.wait()
    lock = RunDirectoryLock(out)
    lock.acquire()
    lock.release()
