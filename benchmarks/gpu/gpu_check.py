#!/usr/bin/env python3
"""unigrad's GPU check in one command: `bash benchmarks/gpu/check.sh` runs this (docs/scaling.md, "GPU check").

Stages, in this order; each one's outcome goes into the JSON summary, and a failed stage does not stop the others:

  wheels       the carry folder made by prepare.sh: the archive against its manifest and wheels.txt, each wheel's
               sha256 and RECORD, every requirement carried or in the image (image.txt)
  install      the wheels into a temporary directory (pip --no-deps --no-index --target; unzipped if there is no
               pip), first on PYTHONPATH; then every requirement of the carried wheels checked against the versions
               installed there, and the imports the check needs tried
  environment  Python, torch, CUDA, the GPU, NCCL, glibc and the versions of the libraries the check uses
  gpu_tests    pytest -m gpu: CUDA placement, bf16 engine against the fp32 learner, a one-process NCCL group, FSDP
               on one GPU, resume on the GPU, a step's gradient on the GPU = on the CPU (tests/test_gpu.py,
               tests/test_device.py; the vLLM tests of tests/test_vllm_engine.py skip: no vLLM there)
  train        `unigrad train examples/default.yaml` on the GPU for a fixed number of steps: every step's key metrics
               finite, the training reward higher in the last quarter of the steps than in the first
  trl_step     one GRPO step of unigrad and one of TRL's GRPOTrainer, interleaved, on the GPU, on Qwen2.5-0.5B's shape
               with random weights, 8 prompts x 8 samples x 256 new tokens (benchmarks/step_vs_trl.py)
  vllm_rollout rollout tokens per second of vLLM against the transformers engine on the GPU
               (benchmarks/vllm_rollout_speed.py --device cuda) where vLLM's CUDA build is installed; the kit cannot
               carry it (VLLM_NOT_CARRIED), so without it the stage is skipped and says why

The last line printed is `gpu_step_ratio_vs_trl=<unigrad step / TRL step>` (`nan` when the stage did not
produce one). Each stage gets a time limit within `--budget` (default 450 s), leaving every later stage its
minimum; a stage that would not get its minimum is skipped, and says so.

`--dry-run` runs whatever needs no GPU, so that the script is known to start before GPU time is spent on it: the
arguments, wheels.txt and image.txt, the carry folder when prepared (archive, hashes, closure; nothing installed),
the environment probe, the collection of the GPU tests, the training command's config (validated, not run), the
benchmark's settings and TRL config (no model built), and the summary itself.

This file imports only the standard library at the top (it runs before the carried wheels are installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import wheelkit  # noqa: E402  (this folder's helper; stdlib only)

REPO = HERE.parent.parent
SCHEMA = "unigrad-gpu-check/1"
STATUSES = ("passed", "failed", "timeout", "skipped")
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_device.py", "tests/test_vllm_engine.py")
TRAIN_CONFIG = "examples/default.yaml"
# The code task runs model-written snippets. The check machine is a throwaway with no network, the snippets are the
# tiny model's, and it most likely has no bubblewrap for the jail (docs/sandbox.md): the code task stays in the
# mixture, under the older containment (rlimits and the audit hook), opted into explicitly. Anywhere else, keep
# the jail.
TRAIN_SANDBOX = ("sandbox.jail=none", "sandbox.allow_root_without_jail=true")
# Metrics that must be finite at every step.
KEY_METRICS = ("loss", "grad_norm", "reward/mean", "rl/entropy", "response_length/mean", "mismatch/kl_k3")


@dataclass
class Stage:
    name: str
    cap_s: float  # the most this stage may take
    min_s: float  # below this much time it is skipped; later stages' minimums are kept in reserve
    gpu: bool  # needs the GPU (its real run); in a dry run it does its CPU part


STAGES = (
    Stage("wheels", 60, 5, False),
    Stage("install", 90, 20, False),
    Stage("environment", 45, 10, False),
    Stage("gpu_tests", 170, 60, True),
    Stage("train", 150, 60, True),
    Stage("trl_step", 200, 120, True),
    Stage("vllm_rollout", 150, 5, True),
)

# Why the kit does not carry vLLM (docs/scaling.md, "GPU check"): said by the vllm_rollout stage when it skips.
VLLM_NOT_CARRIED = (
    "vLLM is not installed in this environment, and the kit cannot carry it: the CUDA vllm wheel (0.34.0) pins "
    "torch==2.14.0 while the image has torch 2.11 for CUDA 13, so it would travel with a CUDA build of torch and "
    "its libraries, some GiB against the 64 MiB that may travel with the working tree. Run this stage where "
    "`pip install \"unigrad[vllm]\"` works: bash benchmarks/gpu/check.sh --only environment,gpu_tests,vllm_rollout")


@dataclass
class Outcome:
    status: str = "skipped"
    seconds: float = 0.0
    reason: str | None = None
    command: list[str] | None = None
    log: str | None = None
    result: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        out = os.environ.get("OUT")
        self.summary_path = args.summary or (Path(out) / "gpu_check.json" if out else HERE / "out" / "gpu_check.json")
        self.summary_path = self.summary_path.resolve()
        self.log_dir = self.summary_path.parent / "gpu_check_logs"
        self.work = Path(tempfile.mkdtemp(prefix="unigrad-gpu-check-"))
        self.site = self.work / "site"
        self.outcomes: dict[str, Outcome] = {}
        self.selected = [s.name for s in STAGES if (not args.only or s.name in args.only)
                         and s.name not in (args.skip or [])]
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # ------------------------------------------------------------------------------------------- plumbing
    def env(self) -> dict[str, str]:
        """The environment of every stage's commands: the carried wheels first (when installed), then the repo,
        offline everything, output unbuffered."""
        env = dict(os.environ)
        paths = ([str(self.site)] if self.site.is_dir() else []) + [str(REPO)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
                   TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg", HF_HUB_DISABLE_TELEMETRY="1")
        cache = self.work / "cache"
        if cache.is_dir():
            env["UNIGRAD_CACHE"] = str(cache)
        return env

    def run(self, stage: str, cmd: list[str], timeout: float, outcome: Outcome, shown: list[str] | None = None,
            cwd: Path = REPO) -> tuple[int, str]:
        """Run `cmd`, echoing its output as it comes (prefixed) and keeping it in the stage's log; kill its whole
        process group at `timeout`. `shown`: the command as printed and recorded (default `cmd`). Returns (exit
        code, output); code 124 after a timeout."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{stage}.log"
        outcome.command, outcome.log = [str(c) for c in shown or cmd], str(log_path)
        say(f"  $ {' '.join(outcome.command)}")
        lines: list[str] = []
        with open(log_path, "a") as log:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=self.env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)

            def pump():
                buffer = b""
                while chunk := proc.stdout.read1(1 << 16):
                    buffer += chunk
                    *done, buffer = buffer.replace(b"\r\n", b"\n").split(b"\n")
                    for raw in done:
                        text = raw.decode("utf-8", "replace").rsplit("\r", 1)[-1]  # last state of a progress bar
                        lines.append(text)
                        log.write(text + "\n")
                        print(f"  | {text}", flush=True)
                if buffer:
                    lines.append(buffer.decode("utf-8", "replace"))
                    log.write(lines[-1] + "\n")
                    print(f"  | {lines[-1]}", flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                code = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                with_ignored(os.killpg, proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with_ignored(os.killpg, proc.pid, signal.SIGKILL)
                    proc.wait()
                code = 124
                outcome.status = "timeout"
                outcome.reason = f"killed after {timeout:.0f} s (its time limit)"
            reader.join(timeout=10)
        return code, "\n".join(lines)

    def python(self, code: str, name: str, stage: str, timeout: float, outcome: Outcome) -> tuple[int, str]:
        """Run one of the probes below (`name`, as shown) in the stages' environment."""
        return self.run(stage, [sys.executable, "-c", code], timeout, outcome,
                        shown=[sys.executable, "-c", f"<gpu_check.py {name}>"])

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write_summary(self) -> dict:
        ratio = self.outcomes.get("trl_step", Outcome()).result.get("ratio")
        bad = [n for n, o in self.outcomes.items() if o.status in ("failed", "timeout")]
        budget_skips = [n for n, o in self.outcomes.items() if o.status == "skipped" and "budget" in (o.reason or "")]
        summary = {
            "schema": SCHEMA,
            "dry_run": self.dry,
            "ok": not bad and not budget_skips,
            "failed": bad,
            "started_at": self.started_at,
            "seconds": round(time.monotonic() - self.started, 1),
            "budget_s": self.args.budget,
            "argv": sys.argv[1:],
            "python": sys.version.split()[0],
            "repo": str(REPO),
            "stage_order": [s.name for s in STAGES],
            "stages": {name: vars(o) for name, o in self.outcomes.items()},
            "gpu_step_ratio_vs_trl": ratio,
        }
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        os.replace(tmp, self.summary_path)
        return summary

    # ------------------------------------------------------------------------------------------- stages
    def stage_wheels(self, o: Outcome, timeout: float) -> None:
        pins, image = wheelkit.read_pins(), wheelkit.read_names()
        o.result = {"pins": [f"{n}=={v}" for n, v in pins], "image_names": len(image)}
        carry = self.args.carry
        if not (carry / wheelkit.MANIFEST).is_file():
            o.status = "skipped" if self.dry else "failed"
            o.reason = f"{carry} is not prepared (run benchmarks/gpu/prepare.sh where the package index is reachable)"
            return
        manifest, files, problems = wheelkit.unpack(carry, self.work / "wheels")
        o.result.update(archive_size=manifest.get("archive_size"),
                        wheels_size=sum(e["size"] for e in manifest["wheels"]),
                        glibc_needed=max((tuple(e["glibc_needed"]) for e in manifest["wheels"] if e["glibc_needed"]),
                                         default=None))
        if not problems:
            report = wheelkit.check_wheels(files, pins, image)
            problems, o.warnings = report["problems"], report["notes"]
        if problems:
            o.status, o.reason = "failed", "; ".join(problems[:5])
            o.result["problems"] = problems
            return
        o.status = "passed"
        say(f"  {len(files)} wheels ({wheelkit.mib(o.result['wheels_size'])}) from "
            f"{wheelkit.mib(o.result['archive_size'])} of xz: hashes, RECORDs and requirements check out")

    def stage_install(self, o: Outcome, timeout: float) -> None:
        wheels = sorted((self.work / "wheels").glob("*.whl"))
        if self.dry:
            o.status, o.reason = "skipped", "dry run: the wheels are CPython 3.12 builds, installed on the GPU machine"
            o.command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", "<tmp>/site",
                         "<the wheels>"]
            return
        if not wheels:
            o.status, o.reason = "failed", "no wheels unpacked (see the wheels stage)"
            return
        if sys.version_info[:2] != wheelkit.PYTHON:
            o.status = "failed"
            o.reason = f"Python {sys.version.split()[0]} here; the carried wheels are for CPython 3.12"
            return
        glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
        o.result["glibc"] = glibc
        needed = self.outcomes["wheels"].result.get("glibc_needed")
        if glibc and needed and tuple(int(x) for x in glibc.split()[-1].split(".")[:2]) < tuple(needed):
            o.warnings.append(f"{glibc} is older than the {needed[0]}.{needed[1]} a carried wheel needs")
        self.site.mkdir(parents=True, exist_ok=True)
        installer = "pip"
        if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
            installer, note = "unzip", "no pip on this Python"
        else:
            code, _ = self.run("install", [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                                           "--no-compile", "--disable-pip-version-check", "--quiet", "--target",
                                           str(self.site), *wheels], timeout, o,
                               shown=[sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                                      "--target", str(self.site), f"<the {len(wheels)} carried wheels>"])
            if o.status == "timeout":
                return
            if code:
                installer, note = "unzip", f"pip install exited with {code}"
                shutil.rmtree(self.site, ignore_errors=True)
                self.site.mkdir()
        if installer == "unzip":  # a wheel is a zip: unpacked, its .data/{purelib,platlib} merged in (no scripts)
            o.warnings.append(f"{note}: the wheels were unzipped into the target instead")
            for wheel in wheels:
                unzip_wheel(wheel, self.site)
        o.result["installer"] = installer
        code, text = self.python(REQUIREMENTS_PROBE % {"names": [n for n, _ in wheelkit.read_pins()],
                                                        "site": str(self.site)}, "REQUIREMENTS_PROBE", "install",
                                 max(10.0, timeout - (time.monotonic() - self.stage_start)), o)
        probe = last_json(text)
        o.result["requirements"] = probe
        if code or probe is None:
            o.status, o.reason = "failed", "the requirement probe failed (see the log)"
            return
        o.warnings += probe["conflicts"]
        if probe["import_errors"]:
            o.status = "failed"
            o.reason = "; ".join(f"{k}: {v}" for k, v in probe["import_errors"].items())
            return
        o.status = "passed"

    def stage_environment(self, o: Outcome, timeout: float) -> None:
        code, text = self.python(ENVIRONMENT_PROBE, "ENVIRONMENT_PROBE", "environment", timeout, o)
        probe = last_json(text)
        if code or probe is None:
            o.status = o.status if o.status == "timeout" else "failed"
            o.reason = o.reason or "the environment probe failed (see the log)"
            return
        o.result = probe
        if not probe.get("cuda_available") and not self.dry:
            o.status, o.reason = "failed", "torch sees no CUDA device: the GPU stages cannot pass"
            return
        o.status = "passed"

    def stage_gpu_tests(self, o: Outcome, timeout: float) -> None:
        xml = self.log_dir / "gpu_tests.xml"
        base = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES]
        if self.dry:
            code, text = self.run("gpu_tests", [*base, "--collect-only", "-q"], timeout, o)
            collected = [line for line in text.splitlines() if "::" in line]
            o.result = {"collected": len(collected), "tests": collected}
            if o.status == "timeout":
                return
            o.status = "passed" if code == 0 and collected else "failed"
            o.reason = None if o.status == "passed" else f"collection exited with {code}, {len(collected)} tests"
            return
        with_ignored(xml.unlink)
        code, _ = self.run("gpu_tests", [*base, "-q", "-rs", "--durations=0", f"--junitxml={xml}"], timeout, o)
        o.result = junit_counts(xml) if xml.is_file() else {}
        if o.status == "timeout":
            return
        counts = o.result
        if code == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("errors"):
            o.status = "passed"
        else:
            o.status = "failed"
            o.reason = (f"pytest exited with {code}: {counts.get('passed', 0)} passed, {counts.get('failed', 0)} "
                        f"failed, {counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped")

    def train_command(self, minutes: float) -> list[str]:
        return [sys.executable, "-m", "unigrad.cli", "train", TRAIN_CONFIG, f"max_steps={self.args.train_steps}",
                f"max_minutes={minutes:.2f}", "eval.before_after=false", "model.device=auto", *TRAIN_SANDBOX,
                "--output-dir", str(self.work / "train")]

    def stage_train(self, o: Outcome, timeout: float) -> None:
        # The run stops itself (max_minutes, then final/ is written) before the stage's time limit kills it.
        minutes = max(0.5, (timeout - 50) / 60)
        cmd = self.train_command(minutes)
        if self.dry:
            overrides = cmd[cmd.index(TRAIN_CONFIG) + 1: cmd.index("--output-dir")]
            code, text = self.python(CONFIG_PROBE % {"config": TRAIN_CONFIG, "overrides": overrides}, "CONFIG_PROBE",
                                     "train", timeout, o)
            o.result = last_json(text) or {}
            o.result["command"] = cmd
            if o.status != "timeout":
                o.status = "passed" if code == 0 and o.result.get("valid") else "failed"
                o.reason = None if o.status == "passed" else "the training config does not validate (see the log)"
            return
        # The carried unigrad-tiny model, copied where UNIGRAD_CACHE will point (ensure_tiny writes a lock next to it).
        manifest = self.args.carry / wheelkit.MANIFEST
        tiny = self.args.carry / json.loads(manifest.read_text())["tiny_model"] if manifest.is_file() else None
        if tiny is not None and tiny.is_dir():
            shutil.copytree(tiny, self.work / "cache" / "models" / tiny.name, dirs_exist_ok=True)
        else:
            o.warnings.append("no carried unigrad-tiny model: the run uses this machine's cache, or builds it first "
                              "(a few minutes on the CPU)")
        code, text = self.run("train", cmd, timeout, o)
        metrics_path = self.work / "train" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
        o.result = analyse_training(rows)
        o.result["tiny_model_built_here"] = "building the default model" in text
        o.result["final_written"] = (self.work / "train" / "final" / "config.json").is_file()
        if o.status == "timeout":
            return
        problems = [] if code == 0 else [f"unigrad train exited with {code}"]
        problems += o.result.pop("problems")
        if not o.result["final_written"]:
            problems.append("no final/ model written")
        o.status = "failed" if problems else "passed"
        o.reason = "; ".join(problems) or None

    def stage_trl_step(self, o: Outcome, timeout: float) -> None:
        out = self.log_dir / "trl_step.json"
        cmd = [sys.executable, "benchmarks/step_vs_trl.py", "--shape", self.args.trl_shape, "--device",
               self.args.trl_device]
        if self.args.trl_steps:
            cmd += ["--steps", str(self.args.trl_steps)]
        with_ignored(out.unlink)
        if self.dry:
            code, _ = self.run("trl_step", [*cmd, "--dry-run", "--json", str(out)], timeout, o)
            o.result = json.loads(out.read_text()) if out.is_file() else {}
            if o.status != "timeout":
                o.status = "passed" if code == 0 and o.result.get("params") else "failed"
                o.reason = None if o.status == "passed" else "the benchmark's dry run failed (see the log)"
            return
        # Timing stops once the pair of steps in progress passes this point, leaving time to print and exit.
        code, _ = self.run("trl_step", [*cmd, "--json", str(out), "--max-seconds", f"{max(30.0, timeout - 45):.0f}"],
                           timeout, o)
        if out.is_file():
            o.result = json.loads(out.read_text())  # every timed step is kept in it, for the record
        if o.status == "timeout":
            return
        ratio = o.result.get("ratio")
        if code == 0 and isinstance(ratio, float) and math.isfinite(ratio):
            o.status = "passed"
        else:
            o.status, o.reason = "failed", f"step_vs_trl.py exited with {code}" + ("" if ratio else ", no ratio")

    def stage_vllm_rollout(self, o: Outcome, timeout: float) -> None:
        code, text = self.python(VLLM_PROBE, "VLLM_PROBE", "vllm_rollout", min(timeout, 60.0), o)
        probe = last_json(text)
        if code or probe is None:
            o.status = o.status if o.status == "timeout" else "failed"
            o.reason = o.reason or "the vLLM probe failed (see the log)"
            return
        o.result = {"probe": probe}
        if not probe["vllm"] or probe.get("cpu_build"):
            built = "vLLM's CPU build is installed here, not its CUDA build. " if probe.get("cpu_build") else ""
            o.status, o.reason = "skipped", built + VLLM_NOT_CARRIED
            return
        out = self.log_dir / "vllm_rollout.json"
        cmd = [sys.executable, "benchmarks/vllm_rollout_speed.py", "--device", "cuda", "--repeats", "3",
               "--json", str(out)]
        if self.dry:
            o.command = [str(c) for c in cmd]
            o.status, o.reason = "skipped", "dry run: vLLM's CUDA build is installed; its benchmark needs the GPU"
            return
        with_ignored(out.unlink)
        code, _ = self.run("vllm_rollout", cmd, max(10.0, timeout - (time.monotonic() - self.stage_start)), o)
        if out.is_file():
            o.result["benchmark"] = json.loads(out.read_text())
        if o.status == "timeout":
            return
        ratios = {name: shape.get("ratio") for name, shape in o.result.get("benchmark", {}).get("shapes", {}).items()}
        o.result["ratios"] = ratios
        good = code == 0 and ratios and all(isinstance(r, float) and math.isfinite(r) for r in ratios.values())
        o.status = "passed" if good else "failed"
        o.reason = None if good else f"vllm_rollout_speed.py exited with {code}, ratios {ratios}"

    # ------------------------------------------------------------------------------------------- main loop
    def main(self) -> int:
        say(f"unigrad GPU check{' (dry run)' if self.dry else ''}: stages {', '.join(self.selected)}; budget "
            f"{self.args.budget:.0f} s; summary {self.summary_path}")
        for i, stage in enumerate(STAGES):
            o = self.outcomes[stage.name] = Outcome()
            if stage.name not in self.selected:
                o.reason = "not selected (--only / --skip)"
                continue
            reserve = sum(s.min_s for s in STAGES[i + 1:] if s.name in self.selected)
            timeout = min(stage.cap_s, self.remaining() - reserve)
            if timeout < stage.min_s:
                o.reason = (f"budget: {self.remaining():.0f} s left, {reserve:.0f} s kept for later stages, "
                            f"{stage.min_s:.0f} s needed")
                say(f"\n== {stage.name}: skipped ({o.reason})")
                self.write_summary()
                continue
            say(f"\n== {stage.name} (time limit {timeout:.0f} s; {self.remaining():.0f} s of the budget left)")
            self.stage_start = time.monotonic()
            try:
                getattr(self, f"stage_{stage.name}")(o, timeout)
            except Exception as exc:  # recorded; the next stage still runs
                o.status, o.reason = "failed", f"{type(exc).__name__}: {exc}"
            o.seconds = round(time.monotonic() - self.stage_start, 1)
            for w in o.warnings:
                say(f"  warning: {w}")
            say(f"== {stage.name}: {o.status} in {o.seconds:.0f} s" + (f" ({o.reason})" if o.reason else ""))
            self.write_summary()
        summary = self.write_summary()
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        say("\nstage        status    seconds  note")
        for name, o in self.outcomes.items():
            say(f"{name:<12} {o.status:<9} {o.seconds:>7.0f}  {(o.reason or '')[:150]}")
        say(f"summary: {self.summary_path}; {'ok' if summary['ok'] else 'NOT ok: ' + ', '.join(summary['failed'])}")
        ratio = summary["gpu_step_ratio_vs_trl"]
        say(f"gpu_step_ratio_vs_trl={ratio:.3f}" if isinstance(ratio, float) else "gpu_step_ratio_vs_trl=nan")
        return 0 if summary["ok"] else 1


# --------------------------------------------------------------------------------------------------- helpers
def say(msg: str) -> None:
    print(msg, flush=True)


def with_ignored(fn, *args) -> None:
    try:
        fn(*args)
    except (OSError, ProcessLookupError):
        pass


def last_json(text: str):
    """The last line of `text` that is a JSON object, parsed (None if there is none)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def unzip_wheel(wheel: Path, site: Path) -> None:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            if info.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            if info.external_attr >> 16 & 0o111:
                target.chmod(0o755)


def junit_counts(xml: Path) -> dict:
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    cases = []
    for suite in suites:
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            state, message = "passed", None
            for tag, label in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                node = case.find(tag)
                if node is not None:
                    state, message = label, (node.get("message") or "")[:300]
                    break
            counts["tests"] += 1
            if state != "passed":
                counts[state] += 1
            cases.append({"test": name, "state": state, "seconds": float(case.get("time") or 0), "message": message})
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "cases": cases}


def analyse_training(rows: list[dict]) -> dict:
    """Steps run, non-finite metrics, and whether the training reward rose: the mean of `reward/mean` over the last
    quarter of the steps against the first quarter (with a z-score from the steps' scatter around a line)."""
    problems = []
    if len(rows) < 8:
        return {"steps": len(rows), "problems": [f"only {len(rows)} steps logged"]}
    nonfinite: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                nonfinite[key] = nonfinite.get(key, 0) + 1
    missing = [k for k in KEY_METRICS if k not in rows[0]]
    bad_keys = sorted(k for k in nonfinite if k in KEY_METRICS)
    if missing:
        problems.append(f"metrics missing: {missing}")
    if bad_keys:
        problems.append(f"non-finite key metrics: {bad_keys}")
    reward = [float(r["reward/mean"]) for r in rows]
    q = len(reward) // 4
    first, last = sum(reward[:q]) / q, sum(reward[-q:]) / q
    n = len(reward)
    mean_x, mean_y = (n - 1) / 2, sum(reward) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(reward)) / sxx
    residual = [y - mean_y - slope * (i - mean_x) for i, y in enumerate(reward)]
    scatter = math.sqrt(sum(e * e for e in residual) / (n - 2))
    z = (last - first) / (scatter * math.sqrt(2 / q)) if scatter > 0 else float("inf")
    if not last > first:
        problems.append(f"the reward did not rise: {first:.3f} over the first {q} steps, {last:.3f} over the last {q}")
    step_times = sorted(r["time/step"] for r in rows if isinstance(r.get("time/step"), float))
    return {
        "steps": n, "reward_first_quarter": first, "reward_last_quarter": last, "reward_rise_z": z,
        "reward_slope_per_100_steps": 100 * slope, "nonfinite_metrics": nonfinite,
        "last": {k: rows[-1].get(k) for k in KEY_METRICS},
        "median_step_s": step_times[len(step_times) // 2] if step_times else None,
        "problems": problems,
    }


# Run in the stages' environment (the carried wheels first on PYTHONPATH); print one JSON line.
REQUIREMENTS_PROBE = r"""
import importlib, importlib.metadata as md, json
from packaging.requirements import Requirement
names, site = %(names)r, %(site)r
env_conflicts, import_errors, versions = [], {}, {}


def check_requires(name, dist, missing_is_conflict):
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            if missing_is_conflict:
                env_conflicts.append(f"{name} requires {line!r}: not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            env_conflicts.append(f"{name} requires {line!r}: {have} installed")


for name in names:  # the carried packages: each must be the carried copy, with its requirements met
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        env_conflicts.append(f"{name}: not installed"); continue
    versions[name] = dist.version
    where = str(dist.locate_file(""))
    if not where.startswith(site):
        env_conflicts.append(f"{name} {dist.version} is the image's ({where}), not the carried one")
    check_requires(name, dist, True)
for name in ("torch", "transformers", "accelerate", "peft", "tokenizers", "huggingface-hub", "numpy"):  # the image's
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    versions[name] = dist.version
    check_requires(name, dist, False)
for module in ("pydantic", "pytest", "datasets", "trl", "unigrad.config", "unigrad.cli"):
    try:
        importlib.import_module(module)
    except Exception as exc:
        import_errors[module] = f"{type(exc).__name__}: {exc}"
if "trl" not in import_errors:
    try:
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as exc:
        import_errors["trl.GRPOTrainer"] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"versions": versions, "conflicts": env_conflicts, "import_errors": import_errors}))
"""

ENVIRONMENT_PROBE = r"""
import importlib.metadata as md, json, os, platform, shutil, subprocess, sys
out = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
       "glibc": os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None,
       "bwrap": shutil.which("bwrap"), "euid": os.geteuid()}
versions = {}
for name in ("torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors", "huggingface-hub", "numpy",
             "pydantic", "trl", "datasets", "pyarrow", "pandas", "pytest", "vllm"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
out["versions"] = versions
import torch
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if out["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    out.update(device_count=torch.cuda.device_count(), device=props.name,
               memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
               bf16=torch.cuda.is_bf16_supported())
    try:
        v = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as exc:
        out["nccl"] = f"unavailable: {exc}"
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,mig.mode.current",
                          "--format=csv,noheader"], capture_output=True, text=True)
    out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
print(json.dumps(out))
"""

VLLM_PROBE = r"""
import importlib.util, json
out = {"vllm": importlib.util.find_spec("vllm") is not None}
if out["vllm"]:
    import vllm
    from vllm.platforms import current_platform
    out.update(version=vllm.__version__, cpu_build=bool(current_platform.is_cpu()))
print(json.dumps(out))
"""

CONFIG_PROBE = r"""
import json
from unigrad.config import load_config
cfg = load_config(%(config)r, %(overrides)r)
print(json.dumps({"valid": True, "tasks": cfg.tasks, "max_steps": cfg.max_steps, "max_minutes": cfg.max_minutes,
                  "device": cfg.model.device, "jail": cfg.sandbox.jail, "prompts_per_step": cfg.prompts_per_step,
                  "num_generations": cfg.rollout.num_generations}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [s.name for s in STAGES]

    def stage_list(text: str) -> list[str]:
        chosen = [t for t in text.split(",") if t]
        unknown = [t for t in chosen if t not in names]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; stages: {','.join(names)}")
        return chosen

    ap = argparse.ArgumentParser(prog="check.sh", description="unigrad's GPU check in one command "
                                 "(docs/scaling.md, 'GPU check').")
    ap.add_argument("--dry-run", action="store_true", help="everything that needs no GPU; installs nothing")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all stages together (default 450)")
    ap.add_argument("--summary", type=Path, default=None,
                    help="JSON summary path (default $OUT/gpu_check.json, else benchmarks/gpu/out/gpu_check.json)")
    ap.add_argument("--carry", type=Path, default=wheelkit.CARRY, help="the folder prepare.sh made")
    ap.add_argument("--only", type=stage_list, default=None, help=f"comma-separated subset of {','.join(names)}")
    ap.add_argument("--skip", type=stage_list, default=None, help="comma-separated stages to leave out")
    ap.add_argument("--train-steps", type=int, default=300, help="training steps (max_steps; default 300)")
    ap.add_argument("--trl-steps", type=int, default=0, help="timed step pairs (default: the benchmark's, 5)")
    ap.add_argument("--trl-shape", default="qwen2-0.5b",
                    help="the benchmark's model shape (qwen2-0.5b; qwen2-smoke rehearses the stage on a CPU)")
    ap.add_argument("--trl-device", default="cuda", help="the benchmark's device (cuda; cpu to rehearse)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary folder (wheels, site, run)")
    args = ap.parse_args(argv)
    if args.budget <= 0 or args.train_steps < 8 or args.trl_steps < 0:
        ap.error("--budget must be positive, --train-steps at least 8, --trl-steps not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    return Check(parse_args(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
