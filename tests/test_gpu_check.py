"""The GPU check kit (benchmarks/gpu) without a GPU: `check.sh --dry-run` starts, runs every stage's CPU part and
writes its summary; the wheel list is consistent with the image's; the training stage's verdict is computed right.
Known to start here, so no GPU time is spent on a script that does not (docs/scaling.md, "GPU check")."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))
import gpu_check  # noqa: E402
import wheelkit  # noqa: E402


def check_sh(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(GPU / "check.sh"), *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def test_the_dry_run_starts_runs_every_cpu_part_and_writes_the_summary(tmp_path):
    summary_path = tmp_path / "out" / "gpu_check.json"
    res = check_sh("--dry-run", "--summary", str(summary_path))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "gpu_step_ratio_vs_trl=nan"  # always the last line
    summary = json.loads(summary_path.read_text())
    assert summary["schema"] == gpu_check.SCHEMA and summary["dry_run"] and summary["ok"] and not summary["failed"]
    assert summary["stage_order"] == [s.name for s in gpu_check.STAGES] == list(summary["stages"])
    stages = summary["stages"]
    assert all(s["status"] in gpu_check.STATUSES for s in stages.values())
    # The carry folder is there where prepare.sh ran (then checked in full), absent in a fresh clone (CI).
    wheels = stages["wheels"]
    assert wheels["result"]["pins"] == [f"{n}=={v}" for n, v in wheelkit.read_pins()]
    assert wheels["status"] == "passed" or (wheels["status"] == "skipped" and "not prepared" in wheels["reason"])
    assert stages["install"]["status"] == "skipped" and "dry run" in stages["install"]["reason"]
    assert stages["environment"]["status"] == "passed" and "cuda_available" in stages["environment"]["result"]
    tests = stages["gpu_tests"]
    assert tests["status"] == "passed" and tests["result"]["collected"] >= 7
    assert any("test_gpu.py::test_the_fsdp_learner" in t for t in tests["result"]["tests"])
    train = stages["train"]["result"]
    assert stages["train"]["status"] == "passed" and train["valid"] and "code" in train["tasks"]
    assert train["jail"] == "none" and train["device"] == "auto" and "examples/default.yaml" in train["command"]
    trl = stages["trl_step"]
    assert trl["status"] == "passed" and 0.45e9 < trl["result"]["params"] < 0.55e9  # Qwen2.5-0.5B's shape
    assert trl["result"]["settings"] == {"shape": "qwen2-0.5b", "device": "cuda", "prompts": 8, "samples": 8,
                                         "new_tokens": 256, "micro_batch": 16}
    vllm = stages["vllm_rollout"]  # no vLLM in this environment: skipped, saying why the kit cannot carry it
    if not vllm["result"]["probe"]["vllm"]:
        assert vllm["status"] == "skipped" and vllm["reason"] == gpu_check.VLLM_NOT_CARRIED
        assert "pins torch" in vllm["reason"] and "== vllm_rollout: skipped in" in res.stdout  # said in the output
        assert "the kit cannot carry it" in res.stdout
    assert all(Path(s["log"]).is_file() for s in stages.values() if s["log"])


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    res = check_sh("--no-such-flag")
    assert res.returncode == 2 and "usage: check.sh" in res.stderr
    res = check_sh("--dry-run", "--only", "wheels,bogus")
    assert res.returncode == 2 and "unknown stage(s) ['bogus']" in res.stderr
    res = check_sh("--dry-run", "--only", "train", "--summary", str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stdout[-3000:]
    stages = json.loads((tmp_path / "s.json").read_text())["stages"]
    assert stages["train"]["status"] == "passed"
    assert {n for n, s in stages.items() if s["reason"] == "not selected (--only / --skip)"} == \
        {s.name for s in gpu_check.STAGES} - {"train"}


def test_the_wheel_list_carries_what_the_image_lacks_and_nothing_it_has():
    pins = {wheelkit.normalize(n) for n, _ in wheelkit.read_pins()}
    image = wheelkit.read_names()
    assert {"pydantic", "pytest", "trl", "datasets", "pyarrow", "pandas", "pyseccomp"} <= pins
    assert pins & image == {"typing-extensions"}  # the one deliberate shadow (pydantic needs a newer one)
    assert {"torch", "transformers", "accelerate", "peft", "numpy"} <= image
    problems, notes = wheelkit.closure_problems({"demo": ["numpy>=1", "left-out", "pytest; python_version < '3'",
                                                          "fsspec[http]>=2023"]}, image)
    assert problems == ["demo requires 'left-out': neither carried (wheels.txt) nor in the image (image.txt)"]
    assert notes == ["demo requires 'fsspec[http]>=2023': the [http] extra is not carried"]
    assert wheelkit.wheel_problem("pandas-3.1.1-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert wheelkit.wheel_problem("xxhash-4.1.0-cp312-cp312-macosx_11_0_arm64.whl")
    assert wheelkit.wheel_problem("pyarrow-26.0.1-cp312-cp312-manylinux_2_28_x86_64.whl") is None
    assert wheelkit.glibc_needed("x-1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl") == (2, 17)


def rows(rewards, **extra):
    return [{"step": i + 1, "loss": 0.1, "grad_norm": 1.0, "reward/mean": r, "rl/entropy": 1.0,
             "response_length/mean": 10.0, "mismatch/kl_k3": 0.0, "time/step": 0.5, **extra}
            for i, r in enumerate(rewards)]


def test_the_training_verdict_wants_finite_metrics_and_a_rising_reward():
    rising = gpu_check.analyse_training(rows([0.1 + 0.001 * i + 0.02 * (i % 3) for i in range(80)]))
    assert rising["problems"] == [] and rising["steps"] == 80 and rising["reward_rise_z"] > 2
    assert rising["reward_last_quarter"] > rising["reward_first_quarter"]
    falling = gpu_check.analyse_training(rows([0.3 - 0.001 * i for i in range(80)]))
    assert any("did not rise" in p for p in falling["problems"])
    broken = rows([0.1 + 0.01 * i for i in range(20)])
    broken[5]["grad_norm"] = math.nan
    assert any("non-finite key metrics: ['grad_norm']" in p for p in gpu_check.analyse_training(broken)["problems"])
    assert gpu_check.analyse_training(rows([0.1] * 3))["problems"] == ["only 3 steps logged"]
