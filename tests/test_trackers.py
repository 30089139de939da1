"""Optional trackers: real trackio (local SQLite) and real W&B (offline mode), fed by the run logger."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from unigrad.config import ConfigError, load_config

SCRIPT = textwrap.dedent("""
    import json, math, sys
    from pathlib import Path
    from unigrad.train.lifecycle.logger import RunLogger
    from unigrad.train.lifecycle.trackers import open_trackers

    run_dir = Path(sys.argv[1]); run_dir.mkdir()
    trackers = open_trackers([sys.argv[2]], run_dir, {"objective": "grpo", "optim": {"lr": 1e-4}}, project="utest")
    logger = RunLogger(run_dir, tensorboard=False, trackers=trackers)
    summary = None
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": 0.25 * step, "loss": float("nan"), "grad_norm": 2.0}, [])
    logger.close()
    if sys.argv[2] == "trackio":
        from trackio.sqlite_storage import SQLiteStorage
        logs = SQLiteStorage.get_logs("utest", run_dir.name)
        summary = [{k: row.get(k) for k in ("step", "reward/mean", "loss")} for row in logs]
    print("RESULT" + json.dumps(summary))
""")


def _run(tracker: str, tmp_path) -> object:
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), tracker], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_trackio_receives_every_step_and_drops_non_finite_values(tmp_path):
    pytest.importorskip("trackio")
    rows = _run("trackio", tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["reward/mean"] for r in rows] == [0.25, 0.5, 0.75]
    assert all(r["loss"] is None for r in rows)  # NaN never reaches the tracker


def _wandb_history_values(record_file, key: str) -> list[float]:
    """Values logged for `key`, read from the offline run's record file: each history item is a
    protobuf message with the key (field 2) followed by its JSON value (field 16, tag 0x82 0x01)."""
    data = record_file.read_bytes()
    pattern = re.escape(bytes([0x12, len(key)]) + key.encode() + b"\x82\x01")
    return [float(data[m.end() + 1:m.end() + 1 + data[m.end()]]) for m in re.finditer(pattern, data)]


def test_wandb_offline_run_receives_every_step(tmp_path):
    pytest.importorskip("wandb")
    _run("wandb", tmp_path)
    (record,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert sorted(set(_wandb_history_values(record, "reward/mean"))) == [0.25, 0.5, 0.75]
    assert _wandb_history_values(record, "loss") == []  # NaN never reaches the tracker
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip()  # a resumed run reuses this id


def test_unknown_or_missing_tracker_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="report_to: unknown tracker 'neptune'"):
        load_config(None, ["report_to=[neptune]"])
