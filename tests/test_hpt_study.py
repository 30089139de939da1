"""The HPT study script end to end on a very small model: stages chain, the budget splits, the doc is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 44 s (timed at load average 5-6 on 2 cores)
def test_study_runs_chains_stages_and_writes_the_doc(small_model, tmp_path):
    out, doc = tmp_path / "study", tmp_path / "hpt.md"
    cmd = [sys.executable, str(ROOT / "examples" / "hpt_study" / "run.py"), "--steps", "2", "--points", "2",
           "--seeds", "0", "--methods", "sft_then_grpo", "hpt_gamma_1/8", "--prompts", "4", "--k", "2",
           "--parallel", "1", "--out", str(out), "--doc", str(doc), f"model.name={small_model}", "prompts_per_step=4",
           "rollout.num_generations=4", "rollout.max_new_tokens=8", "train_pool_size=30", "micro_batch_size=16"]
    env = {**os.environ, "UNIGRAD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    chain = out / "sft_then_grpo" / "seed0"
    first = yaml.safe_load((chain / "stage0" / "config.yaml").read_text())
    second = yaml.safe_load((chain / "stage1" / "config.yaml").read_text())
    assert (first["objective"], first["max_steps"]) == ("sft", 1)
    assert (second["objective"], second["max_steps"]) == ("grpo", 1)
    assert second["model"]["name"] == str(chain / "stage0" / "final")  # GRPO continues from the SFT half
    hpt = yaml.safe_load((out / "hpt_gamma_1_8" / "seed0" / "stage0" / "config.yaml").read_text())
    assert (hpt["objective"], hpt["hybrid"]["gamma"], hpt["max_steps"]) == ("hpt", 0.125, 2)

    final = json.loads((chain / "final_eval.json").read_text())
    assert set(final) >= {"arithmetic", "countdown", "word_problems", "code", "table_qa"}  # table_qa: OOD
    assert "pass@2" in final["table_qa"]
    records = json.loads((out / "records.json").read_text())
    assert [p[0] for p in records[0]["curve"]] == [0, 1, 2]  # start, the hand-over point, the end
    text = doc.read_text()
    for expected in ("| `sft_then_grpo` | 1 |", "| `hpt_gamma_1/8` | 1 |", "table_qa pass@2",
                     "hpt_accuracy_vs_budget.png", "| `hpt_gamma_1/8` | arithmetic |"):
        assert expected in text
    assert (tmp_path / "hpt_accuracy_vs_budget.png").is_file()
