"""A training run: prepare it from the config (what it is made of: build.py), loop over steps, log, checkpoint,
resume, stop early (interrupts.py).

The step itself is `unigrad.train.step.train_step`; this file is the plumbing around it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from unigrad.config import ConfigError, TrainConfig, config_to_yaml, validate_config
from unigrad.diagnostics.learning_gain import LearningGainTracker
from unigrad.diagnostics.monitors import StabilityMonitor
from unigrad.rollout.async_worker import RolloutWorkerDied
from unigrad.rollout.sampling import NonFiniteLogits
from unigrad.tasks.base import Task
from unigrad.train.lifecycle.build import DTYPES, build_step_context
from unigrad.train.lifecycle.checkpoint import (
    CheckpointParts,
    checkpoint_step,
    list_checkpoints,
    load_latest_checkpoint,
    looks_readable,
    publish,
    remove_stale_temporaries,
    save_checkpoint,
    write_failed,
)
from unigrad.train.lifecycle.device import resolve_device
from unigrad.train.lifecycle.distributed import (
    Distributed,
    accelerate_launch_settings,
    init_distributed,
)
from unigrad.train.lifecycle.engine_selection import resolve_engine
from unigrad.train.lifecycle.feasibility import check_installed, check_processes, load_tasks_checked
from unigrad.train.lifecycle.interrupts import RunInterrupted, RunStopped, _Interrupts
from unigrad.train.lifecycle.logger import RunLogger, truncate_jsonl
from unigrad.train.lifecycle.run_lock import RunDirectoryLock
from unigrad.train.lifecycle.trackers import check_credentials, open_trackers
from unigrad.train.producing.dynamic_sampling import AllGroupsUniform
from unigrad.train.producing.pipeline import thread_split
from unigrad.train.step import StepContext, train_step


@dataclass
class RunResult:
    output_dir: Path
    final_step: int
    eval_before: dict[str, Any] | None
    eval_after: dict[str, Any] | None


def prepare_output_dir(output_dir: Path, resume: bool, lock: RunDirectoryLock | None = None) -> None:
    """Make the run directory and hold its lock (`lock`); refuse a file in its place and a finished run there."""
    for place in (output_dir, *output_dir.parents):
        if place.exists() and not place.is_dir():
            raise FileExistsError(f"--output-dir {output_dir}: {place} is a file, not a directory; choose another "
                                  "--output-dir (or move the file)")
    output_dir.mkdir(parents=True, exist_ok=True)
    if lock is not None:  # before looking at what is there: a run still going is named as such
        lock.acquire()
    if (output_dir / "metrics.jsonl").exists() and not resume:
        raise FileExistsError(f"{output_dir} already holds a run; pass --resume to continue it or choose another "
                              "--output-dir")


def train(cfg: TrainConfig, output_dir: Path, *, resume: bool = False, console=None) -> RunResult:
    """Train as `cfg` says into `output_dir` (continuing its last checkpoint with `resume`): evaluate before, loop
    over steps with checkpoints, save final/, evaluate after. The run holds the directory's lock throughout
    (`unigrad.train.lifecycle.run_lock`): a second run into it is refused."""
    lock = RunDirectoryLock(Path(output_dir))
    try:
        return _train(cfg, Path(output_dir), resume, console, lock)
    finally:
        lock.release()


def _train(cfg: TrainConfig, output_dir: Path, resume: bool, console, lock: RunDirectoryLock) -> RunResult:
    from unigrad.models.loading import LoraSettings, load_model_and_tokenizer

    cfg, dist, device, tasks, console = _prepare(cfg, output_dir, resume, console, lock)
    lora = LoraSettings(r=cfg.model.lora_r, alpha=cfg.model.lora_alpha) if cfg.model.lora_r else None
    model, tokenizer = load_model_and_tokenizer(cfg.model.name, dtype=DTYPES[cfg.model.dtype], lora=lora,
                                                device=device)
    cfg, engine_choice = resolve_engine(cfg, model, torch.device(device).type, dist.world)  # rollout.engine=auto
    if engine_choice is not None and dist.is_main:
        _print(console, escape(f"rollout.engine=auto: {engine_choice.engine} ({engine_choice.reason})"))
    ctx, gain, dropped = build_step_context(cfg, model, tokenizer, tasks, dist=dist)
    mon = cfg.monitors
    monitor = StabilityMonitor(mismatch_kl_max=mon.mismatch_kl_max, grad_spike_factor=mon.grad_spike_factor,
                               grad_spike_window=mon.grad_spike_window, entropy_min_ratio=mon.entropy_min_ratio,
                               clip_fraction_max=mon.clip_fraction_max)
    run = Run(cfg, ctx, output_dir, console, tokenizer, tasks, dropped, gain, monitor)
    start = _restore(run, resume)
    try:
        if ctx.pipeline is not None:  # the engine's worker starts sampling while the evaluation runs
            ctx.pipeline.start(start)
        before = _evaluation_before(run)
        if dist.is_main:
            trackers = open_trackers(cfg.report_to, output_dir, cfg.model_dump(mode="json"))
            run.logger = RunLogger(output_dir, tensorboard=cfg.tensorboard, trackers=trackers)
        try:
            with _Interrupts() as run.interrupts:
                last = _loop(run, start)
        finally:
            if run.logger is not None:
                run.logger.close()
        after = _finish(run, last)
    except RolloutWorkerDied as err:
        done = list_checkpoints(output_dir)
        raise RunStopped(f"run stopped: {err}. " + (f"The latest checkpoint is {done[-1]}; " if done else "")
                         + f"continue with: unigrad train --output-dir {output_dir} --resume") from err
    finally:
        if ctx.pipeline is not None:
            ctx.pipeline.close()
    if before is not None and after is not None:
        _print(console, before_after_table(before, after))
    return RunResult(output_dir, last, before, after)


@dataclass
class Run:
    """What a run holds while it trains: the step's context and everything around the steps."""

    cfg: TrainConfig
    ctx: StepContext
    output_dir: Path
    console: Any
    tokenizer: Any
    tasks: list[Task]
    dropped: dict[str, int]  # training prompts dropped per task (longer than the context)
    gain: LearningGainTracker
    monitor: StabilityMonitor
    logger: RunLogger | None = None
    unscorable: dict[str, int] = field(default_factory=dict)  # steps in a row with no scorable reward, per task
    interrupts: _Interrupts | None = None  # SIGINT / SIGTERM received while training

    def extras(self) -> dict[str, Any]:
        """The state checkpointed beside model, optimizer and sampler."""
        out = {"learning_gain": self.gain, "monitor": self.monitor}
        if self.ctx.pipeline is not None:  # batches the engine's worker sampled ahead
            out["rollout_pipeline"] = self.ctx.pipeline
        if self.ctx.learner.weight_average is not None:
            out["weight_average"] = self.ctx.learner.weight_average
        return out

    def evaluate(self, name: str) -> dict[str, Any] | None:
        """Held-out evaluation of the current weights, written to `name`.json (rank 0; None on the others)."""
        from unigrad.eval import evaluate

        dist, cfg = self.ctx.dist, self.cfg
        whole = self.ctx.learner.whole_model()  # sharded: gathered on every process
        if not dist.is_main:  # rank 0 evaluates; the others wait for it
            dist.barrier()
            return None
        from unigrad.rollout.vllm_engine import VLLMEngine

        engine = None  # evaluate's own transformers engine, unless this process holds a vLLM engine
        if isinstance(self.ctx.engine, VLLMEngine):
            engine = self.ctx.engine
            engine.load_weights(whole.state_dict())  # the weights evaluated (final/: the moving average if kept)
        res = evaluate(whole, self.tokenizer, self.tasks, cfg.eval.prompts_per_task, pass_k=cfg.eval.pass_k,
                       max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed, per_prompt=True,
                       max_turns=cfg.rollout.max_turns, split=cfg.eval.split, engine=engine)
        (self.output_dir / f"{name}.json").write_text(json.dumps(res, indent=2))
        dist.barrier()
        return res

    def checkpoint(self, step: int) -> None:
        parts = CheckpointParts(self.ctx.learner, self.ctx.sampler, self.extras())
        save_checkpoint(self.output_dir, step, parts, keep=self.cfg.keep_checkpoints, write=self.ctx.dist.is_main)


def _prepare(cfg: TrainConfig, output_dir: Path, resume: bool, console, lock: RunDirectoryLock | None = None):
    """Everything before the model loads: device, processes, the checks that refuse a run early
    (`unigrad.train.lifecycle.feasibility`), the run directory, seeds, config.yaml. Returns (cfg, dist, device, tasks,
    console)."""
    try:
        device = resolve_device(cfg.model.device)  # this process's GPU (LOCAL_RANK) with model.device=auto
    except ValueError as err:
        raise ConfigError(str(err)) from err
    dist = init_distributed(device)  # one process unless launched by --nproc, torchrun or accelerate
    if resume:  # refused before anything is written: nothing to continue, or steps to go back on
        if dist.is_main and lock is not None and output_dir.is_dir():
            lock.acquire()
        _check_resume(cfg, output_dir)
    check_processes(cfg, dist.world)
    launched_sharding, launcher_notes = accelerate_launch_settings(dict(os.environ), cfg.sharding)
    if launched_sharding != cfg.sharding:
        cfg = validate_config({**cfg.model_dump(), "sharding": launched_sharding})
    check_installed(cfg)
    if not dist.is_main:
        console = False  # rank 0 prints and writes the run directory; the others train
    tasks = load_tasks_checked(cfg)
    _start_jail(cfg, tasks, console)
    _open_run_directory(cfg, output_dir, resume, dist, lock)
    _seed(cfg)
    if dist.is_main:
        (output_dir / "config.yaml").write_text(config_to_yaml(cfg))
    _print(console, "[bold]resolved config[/bold]\n" + escape(config_to_yaml(cfg))
           + (f"\n{dist.world} data-parallel processes" if dist.active else "")
           + "".join(f"\n{note}" for note in launcher_notes)
           + ("\nsharding=fsdp needs more than one process (--nproc N): training unsharded"
              if cfg.sharding == "fsdp" and not dist.active else ""))
    return cfg, dist, device, tasks, console


def _start_jail(cfg: TrainConfig, tasks: list[Task], console) -> None:
    """The code task's jail started, or the run stops here, before anything is written."""
    from unigrad import sandbox

    if (jail_note := sandbox.prepare(tasks, cfg.sandbox.jail, cfg.sandbox.allow_root_without_jail)) is not None:
        _print(console, jail_note)


def _open_run_directory(cfg: TrainConfig, output_dir: Path, resume: bool, dist: Distributed,
                        lock: RunDirectoryLock | None) -> None:
    """The trackers' credentials checked, then the run directory made (rank 0)."""
    if dist.is_main:
        check_credentials(cfg.report_to)  # a tracker that cannot log in: refused before the directory is made
        prepare_output_dir(output_dir, resume, lock)
    dist.barrier()


def _seed(cfg: TrainConfig) -> None:
    """torch's threads for the learner, and the seeds of torch and random."""
    learner_threads = thread_split(cfg.threads, cfg.rollout.engine_threads, os.cpu_count() or 1)[0] \
        if cfg.rollout.max_staleness else cfg.threads
    if learner_threads:
        torch.set_num_threads(learner_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)


def _check_resume(cfg: TrainConfig, output_dir: Path) -> None:
    """Refuse a resume that would start over (no checkpoint) or go back (max_steps below the steps done)."""
    done = list_checkpoints(output_dir)
    if not any(looks_readable(path) for path in done):
        raise ConfigError(f"--resume: {output_dir} has no checkpoint to continue from (the run ended before its "
                          "first one, checkpoints/ was removed, or every checkpoint is damaged); nothing was changed. "
                          "Start the run again without --resume into a fresh --output-dir")
    step = checkpoint_step(done[-1])
    if cfg.max_steps < step:
        raise ConfigError(f"--resume: max_steps={cfg.max_steps} is below the {step} steps {output_dir} has done "
                          f"(latest checkpoint: {done[-1].name}); nothing was changed. Give max_steps >= {step} "
                          "(--override max_steps=N), or train fewer steps as a new run in another --output-dir")


def _restore(run: Run, resume: bool) -> int:
    """The step to continue from (0 for a new run): the last checkpoint's state restored, logs cut back to it."""
    ctx, dist, out = run.ctx, run.ctx.dist, run.output_dir
    if dist.is_main and (stale := remove_stale_temporaries(out)):
        _print(run.console, f"removed {len(stale)} unfinished write(s) a killed run left: "
                            + ", ".join(p.name for p in stale))
    start = 0
    if resume:
        start = load_latest_checkpoint(out, ctx.learner, ctx.sampler, extra=run.extras())
        if start == 0:  # every checkpoint unreadable: starting over would rewrite the run's logs and final/
            raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'} could be read (see the warnings "
                              "above); nothing was changed. Start the run again without --resume into a fresh "
                              "--output-dir")
        ctx.engine.load_weights(ctx.learner.full_state_dict())
        _print(run.console, f"resumed from step {start}")
    if dist.is_main:
        for name in ("metrics.jsonl", "samples.jsonl", "alarms.jsonl"):
            truncate_jsonl(out / name, start)
    if start == 0 and dist.is_main:
        for alarm in StabilityMonitor.start_alarms(ctx.objective.beta, run.cfg.max_steps,
                                                   run.cfg.monitors.beta_zero_steps):
            _record_alarm(out, alarm, run.console)
    return start


def _evaluation_before(run: Run) -> dict[str, Any] | None:
    """The held-out evaluation before training (read back when a resumed run already has it)."""
    if not run.cfg.eval.before_after:
        return None
    dist, path = run.ctx.dist, run.output_dir / "eval_before.json"
    if dist.sum_float(float(dist.is_main and path.exists())) > 0:  # resumed: rank 0 has it
        return json.loads(path.read_text()) if dist.is_main else None
    return run.evaluate("eval_before")


def _finish(run: Run, last: int) -> dict[str, Any] | None:
    """The last checkpoint, final/ (the weights' moving average when kept), and the evaluation after training."""
    from unigrad.models.loading import save_model

    learner, cfg = run.ctx.learner, run.cfg
    run.checkpoint(last)
    if learner.weight_average is not None:  # the checkpoint keeps the live weights (for --resume); final/ the average
        learner.weight_average.copy_to_params()
        _print(run.console, f"final/ holds the moving average of the weights (optim.weight_ema_decay="
                            f"{cfg.optim.weight_ema_decay}, {learner.weight_average.steps} steps)")
    whole = learner.whole_model()
    if run.ctx.dist.is_main:  # written aside, then renamed: a kill never leaves half a final/
        tmp = run.output_dir / f".tmp-final-{os.getpid()}"
        try:
            save_model(whole, run.tokenizer, tmp)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failed(run.output_dir / "final", err) from err
        publish(tmp, run.output_dir / "final")
    run.ctx.dist.barrier()
    return run.evaluate("eval_after") if cfg.eval.before_after else None


def _loop(run: Run, start: int) -> int:
    """Train from step `start` + 1; returns the last step done. Raises RunStopped (after a checkpoint) when
    an alarm in monitors.stop_on fires or too many steps were skipped for non-finite values."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cfg, ctx, console = run.cfg, run.ctx, run.console
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}")]
    started = time.monotonic()
    with Progress(*columns, console=console, transient=False, disable=console is False) as progress:
        bar = progress.add_task("train", total=cfg.max_steps, completed=start, status="")
        for step in range(start + 1, cfg.max_steps + 1):
            over = bool(cfg.max_minutes) and time.monotonic() - started > 60 * cfg.max_minutes
            if ctx.dist.sum_float(float(over)) > 0:  # every process stops at the same step
                _print(console, f"time budget of {cfg.max_minutes} min reached after step {step - 1}")
                return step - 1
            metrics, samples = _step(run, step)
            alarms = run.monitor.check(step, metrics)
            for alarm in alarms:
                metrics[f"alarm/{alarm.name}"] = 1.0
                if ctx.dist.is_main:
                    _record_alarm(run.output_dir, alarm, progress.console if console is not False else False)
            if run.logger is not None:
                run.logger.log(step, metrics, samples)
            status = (f"reward {metrics['reward/mean']:.3f} acc {metrics['accuracy/mean']:.3f} "
                      if "reward/mean" in metrics else "") + f"loss {metrics['loss']:+.4f}"
            if alarms:
                status += " [red]alarm: " + ", ".join(a.name for a in alarms) + "[/red]"
            progress.update(bar, advance=1, status=status)
            stop = [a.message for a in alarms if a.name in cfg.monitors.stop_on]
            stop += _unscorable(run, metrics)
            if run.monitor.nonfinite_steps >= cfg.monitors.max_nonfinite_steps:
                stop.append(f"{run.monitor.nonfinite_steps} steps were skipped for non-finite losses or "
                            f"gradients (monitors.max_nonfinite_steps={cfg.monitors.max_nonfinite_steps})")
            if stop or (cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps):  # rank 0 writes
                run.checkpoint(step)
            received = run.interrupts.received if run.interrupts is not None else None
            if ctx.dist.sum_float(float(received or 0)) > 0 and not stop:  # any process interrupted: all stop here
                run.checkpoint(step)
                raise RunInterrupted(f"interrupted after step {step}; a checkpoint of it is in "
                                     f"{run.output_dir}/checkpoints. Continue with: unigrad train --output-dir "
                                     f"{run.output_dir} --resume", received or 2)
            if stop:
                raise RunStopped(f"run stopped at step {step}: " + "; ".join(stop)
                                 + f". A checkpoint of step {step} is in {run.output_dir}/checkpoints; "
                                   f"fix the cause and continue with: unigrad train --output-dir {run.output_dir} "
                                   "--resume (a reward timeout: add --override reward_timeout=SECONDS; an alarm: "
                                   "--override monitors.KEY=VALUE)")
    return cfg.max_steps


def _unscorable(run: Run, metrics: dict[str, float]) -> list[str]:
    """Why the run must stop: tasks whose rewards have been all unscorable for monitors.max_unscorable_steps steps
    in a row (a reward function that fails every time trains nothing, silently)."""
    limit, reasons = run.cfg.monitors.max_unscorable_steps, []
    for task in run.tasks:
        flag = metrics.get(f"rewards/unscorable/{task.name}")
        if flag is None:
            continue
        run.unscorable[task.name] = run.unscorable.get(task.name, 0) + 1 if flag else 0
        if run.unscorable[task.name] >= limit:
            error = run.ctx.reward_errors.get(task.name, "its rewards were NaN or None")
            reasons.append(f"every reward of task {task.name!r} was unscorable for {limit} steps in a row "
                           f"(monitors.max_unscorable_steps); last error: {error}")
    return reasons


def _step(run: Run, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One training step and what the run adds to its metrics (learning gain, the sampler's update, the first
    step's dropped prompts, a scheduled evaluation)."""
    cfg = run.cfg
    try:
        metrics, samples = train_step(run.ctx, step)
    except AllGroupsUniform as err:
        done = list_checkpoints(run.output_dir)
        raise RunStopped(f"run stopped at step {step}: {err} (in a new run: --resume continues with the same "
                         "settings)" + (f"; the latest checkpoint is {done[-1]}" if done else "")) from err
    except NonFiniteLogits as err:
        done = list_checkpoints(run.output_dir)
        raise RunStopped(f"run stopped at step {step}: {err} (after the optimizer step of step {step - 1}). "
                         + (f"The latest checkpoint is {done[-1]}; " if done else "There is no checkpoint; ")
                         + f"Cap the gradient and continue: unigrad train --output-dir {run.output_dir} --resume "
                           "--override monitors.grad_norm_cap=N (steps with a gradient norm above N are skipped); or "
                           "start a new run (another --output-dir) with a lower optim.lr or optim.max_grad_norm."
                         ) from err
    metrics.update(run.gain.update(step, metrics))  # gain/<task> of step - s
    run.ctx.sampler.update(metrics)
    if step == 1:
        metrics.update({f"prompts/too_long/{k}": float(v) for k, v in run.dropped.items()})
    if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.max_steps:
        res = run.evaluate(f"eval_step_{step:06d}") or {}
        metrics.update({f"eval/{t}/{k}": v for t, r in res.items() for k, v in r.items() if k.startswith("pass@")})
    return metrics, samples


def _record_alarm(output_dir: Path, alarm, console) -> None:
    with open(output_dir / "alarms.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": alarm.step, "alarm": alarm.name, "message": alarm.message}) + "\n")
    _print(console, f"[yellow]alarm[/yellow] ({alarm.name}, step {alarm.step}): {escape(alarm.message)}")


def before_after_table(before: dict[str, Any], after: dict[str, Any]):
    from rich.table import Table

    keys = [k for k in before["mean"]]
    table = Table(title="held-out accuracy (greedy pass@1" + (", sampled pass@k" if len(keys) > 1 else "") + ")")
    table.add_column("task")
    for k in keys:
        table.add_column(f"{k} before", justify="right")
        table.add_column(f"{k} after", justify="right")
        table.add_column("change", justify="right")
    for task in before:
        row = [task]
        for k in keys:
            b, a = before[task][k], after[task][k]
            row += [f"{100 * b:.1f}", f"{100 * a:.1f}", f"{100 * (a - b):+.1f}"]
        table.add_row(*row)
    return table


def _print(console, message) -> None:
    if console is False:
        return
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(message)
