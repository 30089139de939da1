"""The `unigrad` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _presets(args: argparse.Namespace) -> int:
    from unigrad.preset_table import markdown_table, preset_rows, update_docs

    if args.update_docs:
        path = Path(args.update_docs)
        path.write_text(update_docs(path.read_text()))
        print(f"updated the generated tables (presets, parts, KL estimators, metrics) in {path}")
        return 0
    if args.markdown:
        print(markdown_table())
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="unigrad objective presets", show_lines=True)
    for col in ("name", "ratio", "stabiliser", "correction", "advantage", "aggregation", "paper"):
        table.add_column(col, overflow="fold")
    for row in preset_rows():
        table.add_row(row["name"], row["ratio"], row["stabiliser"], row["correction"], row["advantage"],
                      row["aggregation"], f"{row['paper']}\n{row['url']}")
    Console(width=max(args.width, 80)).print(table)
    return 0


def _tasks(args: argparse.Namespace) -> int:
    """One line per built-in task: its name, single- or multi-turn, its tools, what it asks."""
    from unigrad.tasks import task_listing
    from unigrad.tasks.registry import SPEC_FORMS

    rows = task_listing()
    width = max(len(r["name"]) for r in rows)
    tools = max(len(r["tools"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['turns']:<11}  tools: {r['tools']:<{tools}}  {r['description']}")
    print(f"\nother tasks: {', '.join(SPEC_FORMS)}; tools=[...] turns single-turn tasks into tool-use episodes")
    return 0


def _train(args: argparse.Namespace) -> int:
    from unigrad.config import ConfigError, load_config
    from unigrad.sandbox import JailUnavailable, SandboxError
    from unigrad.train.lifecycle.run import RunInterrupted, RunStopped, train

    try:
        config_path, overrides = _config_and_settings(args.items)
        cfg = load_config(config_path, overrides)
        output_dir = Path(args.output_dir) if args.output_dir else Path("runs") / f"{cfg.objective}-seed{cfg.seed}"
        _check_config_file_kept(config_path, output_dir, args.resume)
        if args.override and not args.resume:
            raise ConfigError("--override is for --resume (a new run takes its settings as key=value)")
        if args.resume:
            cfg = _resumed_config(output_dir, cfg if config_path or overrides else None, args.override or [])
    except ConfigError as err:
        print(f"unigrad train: {err}", file=sys.stderr)
        return 2
    if args.nproc > 1:  # refused before any process starts (train() checks again under torchrun or accelerate)
        from unigrad.train.lifecycle.feasibility import check_processes

        try:
            check_processes(cfg, args.nproc)
        except ConfigError as err:
            print(f"unigrad train: {err}", file=sys.stderr)
            return 2
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # start N processes of this same command
        import subprocess

        argv = ["train", *args.items, "--output-dir", str(output_dir), *(["--resume"] if args.resume else []),
                *[f"--override={item}" for item in args.override or []]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "unigrad.cli", *argv]
        return subprocess.call(cmd)
    try:
        train(cfg, output_dir, resume=args.resume)
    except (FileExistsError, ConfigError, JailUnavailable, SandboxError) as err:
        print(f"unigrad train: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"unigrad train: {err}", file=sys.stderr)
        return 3
    except RunInterrupted as err:  # the conventional 128 + signal
        print(f"unigrad train: {err}", file=sys.stderr)
        return 128 + err.signal
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print(f"unigrad train: interrupted; continue from the last checkpoint with: unigrad train --output-dir "
              f"{output_dir} --resume", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a directory without write permission: the path and what to do
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"unigrad train: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    print(f"run directory: {output_dir}  (trained model in {output_dir / 'final'})")
    return 0


def _config_and_settings(items: list[str]) -> tuple[str | None, list[str]]:
    """`unigrad train`'s words as (config file or None, key=value settings); ConfigError for `key = value` (spaces
    around '=') and for a config file given after the settings."""
    from unigrad.config import ConfigError

    for i, item in enumerate(items):
        spaced = None
        if item == "=" or item.startswith("="):  # `key = value` or `key =value`
            spaced = (items[i - 1] if i else "KEY") + "=" + (item[1:] or (items[i + 1] if i + 1 < len(items) else ""))
        elif item.endswith("=") and i + 1 < len(items) and "=" not in items[i + 1]:  # `key= value`
            spaced = item + items[i + 1]
        if spaced is not None:
            raise ConfigError(f"settings are written without spaces around '=': write {spaced}, not "
                              f"{spaced.replace('=', ' = ', 1)}")
    config_path = items[0] if items and "=" not in items[0] else None
    overrides = items[1:] if config_path is not None else list(items)
    for item in overrides:
        if "=" in item:
            continue
        if config_path is None and (Path(item).suffix in (".yaml", ".yml") or Path(item).is_file()):
            order = " ".join([item, *(o for o in overrides if o != item)])
            raise ConfigError(f"the config file {item} must come first, before the key=value settings: "
                              f"unigrad train {order}")
        raise ConfigError(f"{item!r} is not a key=value setting (one config file may be given, first"
                          + (f"; {config_path} is it)" if config_path else ")"))
    return config_path, overrides


def _check_config_file_kept(config_path: str | None, output_dir: Path, resume: bool) -> None:
    """A new run saves its resolved config as OUTPUT_DIR/config.yaml: refuse when that is the config file given
    (the user's file, comments and all, would be overwritten). A resumed run's config.yaml is its own."""
    from unigrad.config import ConfigError

    saved = output_dir / "config.yaml"
    if config_path is None or resume or not saved.is_file() or not saved.samefile(config_path):
        return
    raise ConfigError(f"the config file {config_path} is where the run would save its resolved config "
                      f"({saved}), overwriting it; choose another --output-dir (e.g. {output_dir / 'run'}), or "
                      "keep the config file outside the run directory")


def _resumed_config(output_dir: Path, given, overrides: list[str]):
    """The config to continue `output_dir` with (unigrad.config.resume_config); a directory without a run is an
    error, not a fresh start."""
    from unigrad.config import ConfigError, load_run_config, resume_config

    if not (output_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {output_dir} holds no run (no config.yaml there); check the path, or start "
                          "a new run without --resume")
    return resume_config(load_run_config(output_dir), given, overrides, output_dir)


def _eval(args: argparse.Namespace) -> int:
    import contextlib
    import json

    # With --json, stdout holds the JSON alone: whatever the tasks' code (a user's reward function) prints while
    # the tasks load and the model is scored goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        res = _evaluate_model(args)
    if isinstance(res, int):  # refused: the reason is printed
        return res
    if args.json:
        print(json.dumps(res))
        return 0
    from rich.console import Console
    from rich.table import Table

    keys = list(res["mean"])
    table = Table(title=f"held-out evaluation of {args.model} ({args.split} split)")
    table.add_column("task")
    for k in keys:
        table.add_column(k, justify="right")
    for name, row in res.items():
        table.add_row(name, *[f"{100 * row[k]:.1f}" for k in keys])
    Console().print(table)
    return 0


def _evaluate_model(args: argparse.Namespace):
    """`unigrad eval`'s results, or its exit code when it refuses (the reason printed)."""
    from unigrad.config import load_run_config
    from unigrad.eval import evaluate
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.tasks import DEFAULT_MIXTURE, load_tasks

    target = Path(args.model)
    tasks, cfg = args.tasks, None
    model_path, max_new_tokens = args.model, args.max_new_tokens
    if (target / "config.yaml").is_file() and (target / "final").is_dir():  # a run directory
        cfg = load_run_config(target)
        model_path = str(target / "final")
        tasks = tasks or cfg.tasks
        max_new_tokens = cfg.rollout.max_new_tokens if max_new_tokens is None else max_new_tokens
    from unigrad.train.lifecycle.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"unigrad eval: {str(err).replace('model.device', '--device')}", file=sys.stderr)
        return 2
    reward = cfg.reward if cfg is not None and not args.tasks else None  # the run's own reward function
    task_objects = load_tasks(tasks or DEFAULT_MIXTURE, reward, cfg.tools if cfg is not None and not args.tasks
                              else args.tools)
    from unigrad.sandbox import JailUnavailable, SandboxError, prepare

    try:  # as the run was configured (a run directory), else the default jail
        prepare(task_objects, **(cfg.sandbox.model_dump() if cfg is not None else {}))
    except (JailUnavailable, SandboxError) as err:
        print(f"unigrad eval: {err}", file=sys.stderr)
        return 2
    model, tokenizer = load_model_and_tokenizer(model_path, device=device)
    engine_name = args.engine or (cfg.rollout.engine if cfg is not None else "transformers")
    if engine_name == "auto":  # a run configured with rollout.engine=auto: the engine the rule picks for it here
        import torch

        from unigrad.train.lifecycle.engine_selection import resolve_engine

        engine_name = resolve_engine(cfg, model, torch.device(device).type)[0].rollout.engine
    engine = None  # evaluate's transformers engine
    if engine_name == "vllm":
        from unigrad.rollout.vllm_engine import VLLMEngine, VLLMUnavailable

        try:
            engine = VLLMEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=args.seed)
        except VLLMUnavailable as err:
            print(f"unigrad eval: --engine vllm: {err}", file=sys.stderr)
            return 2
        print("unigrad eval: sampling with vLLM", file=sys.stderr)
    return evaluate(model, tokenizer, task_objects, args.prompts, pass_k=args.k, per_prompt=args.per_prompt,
                    max_new_tokens=32 if max_new_tokens is None else max_new_tokens, seed=args.seed,
                    max_turns=cfg.rollout.max_turns if cfg is not None else None, split=args.split, engine=engine)


def _study(args: argparse.Namespace) -> int:
    import time

    from pydantic import ValidationError

    from unigrad.report.seeded_study import Study
    from unigrad.report.study_checks import compact, refuse_other_settings, refuse_page_without_results
    from unigrad.report.study_page import write_study_page
    from unigrad.report.tuning_record import load_tuned_study, refuse_untuned

    try:
        spec, _ = load_tuned_study(args.file)  # with a tuning record: each arm at its value picked on validation
        other_steps = args.steps is not None and args.steps != spec.steps
        smoke = other_steps or (args.seeds is not None and args.seeds != spec.seeds)  # not the study the file pins
        if not (smoke or args.page_only):
            refuse_untuned(spec, args.file)
        out = Path(args.out or Path("runs") / "studies" / (Path(args.file).stem
                                                           + (f"-steps{args.steps}" if other_steps else "")))
        study = Study(spec, out, seeds=args.seeds, steps=args.steps, parallel=args.parallel)
        refuse_other_settings(study)  # runs left there by a smoke run or an edited study file: never reused
        if args.page_only:
            refuse_page_without_results(study)
    except ValidationError as err:  # --seeds, --steps, --parallel out of the study file's bounds
        print(f"unigrad study: {compact(err, Path(args.file))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"unigrad study: {err}", file=sys.stderr)
        return 2
    started = time.time()
    if not args.page_only:
        try:
            study.run()
        except (RuntimeError, ValueError) as err:  # a run that failed, runs left with other settings
            print(f"unigrad study: {err}", file=sys.stderr)
            return 1
    command = " ".join(["unigrad study", args.file, *(f"--seeds {args.seeds}" for _ in [0] if args.seeds),
                        *(f"--steps {args.steps}" for _ in [0] if args.steps)])
    # a smoke-size run never writes the real docs page unless asked to (--doc-root)
    root = Path(args.doc_root) if args.doc_root is not None else out / "page" if smoke else Path(".")
    page = write_study_page(study, command, root, None if args.page_only else (time.time() - started) / 60)
    print(f"study: wrote {page}" + (" (--steps / --seeds differ from the study file's: a smoke run, so not the docs "
                                    "page; --doc-root . writes that)" if smoke and args.doc_root is None else ""))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from unigrad.report.seeded_study import load_study
    from unigrad.report.study_checks import compact
    from unigrad.report.tuning import tune

    try:
        spec = load_study(args.file)
        if args.parallel is not None:
            spec = type(spec).model_validate({**spec.model_dump(), "parallel": args.parallel})
            spec._source = Path(args.file)
        out = Path(args.out or Path("runs") / "studies" / f"{Path(args.file).stem}-tuning")
        table, record = tune(spec, Path(args.file), out, Path(args.doc_root))
    except ValidationError as err:
        print(f"unigrad tune: {compact(err, Path(args.file))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"unigrad tune: {err}", file=sys.stderr)
        return 2 if isinstance(err, (FileNotFoundError, ValueError)) else 1
    print(f"tune: wrote {table} and {record}; `unigrad study {args.file}` now trains with these values")
    return 0


def _report(args: argparse.Namespace) -> int:
    from unigrad.report.run_report import build_report

    try:
        path = build_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as err:
        print(f"unigrad report: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def _sandbox_check(args: argparse.Namespace) -> int:
    from unigrad.sandbox import JailUnavailable, SandboxError, check, configure
    from unigrad.sandbox.attacks import check_attacks

    try:
        configure(args.jail, allow_root_without_jail=args.allow_root_without_jail)
        print(check())
    except (JailUnavailable, SandboxError) as err:
        print(f"unigrad sandbox-check: {err}", file=sys.stderr)
        return 2
    results = check_attacks()
    for r in results:
        layers = "with the audit hook   " if r.audit_hook else "kernel layers alone   "
        print(f"{'contained' if r.contained else 'NOT CONTAINED'}  {layers}{r.name}"
              + (f"  ({r.evidence})" if r.evidence else ""))
    failed = sum(not r.contained for r in results)
    print(f"{len(results) - failed} of {len(results)} attacks contained")
    return 1 if failed else 0


def _at_least(low: int, what: str):
    """An argparse type: an integer >= `low` (argparse names the option in its error, `what` says what it counts)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unigrad", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_presets, _add_train, _add_tasks, _add_eval, _add_study, _add_tune, _add_sandbox_check,
                _add_report, _add_serve):
        add(sub)
    return parser


def _add_presets(sub) -> None:
    """The `unigrad presets` command and its options."""
    p = sub.add_parser("presets", help="list the objective presets (name, parts, defaults, paper)")
    p.add_argument("--markdown", action="store_true", help="print the docs table as Markdown")
    p.add_argument("--update-docs", metavar="FILE", help="rewrite the generated tables inside FILE")
    p.add_argument("--width", type=int, default=160, help="table width in characters")
    p.set_defaults(func=_presets)


def _add_train(sub) -> None:
    """The `unigrad train` command and its options."""
    from unigrad.config import config_help

    t = sub.add_parser("train", help="post-train a model (default: the embedded unigrad-tiny)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (set in the YAML file or as key=value; sections as section.key=value):\n"
                              + config_help())
    t.add_argument("items", nargs="*", metavar="[CONFIG] key=value",
                   help="an optional YAML config, then dotted overrides such as objective=dapo rollout.temperature=0.8")
    t.add_argument("--output-dir", help="run directory (default: runs/<objective>-seed<seed>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint, "
                   "with its own config (settings that differ from it are refused)")
    t.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="with --resume: change max_steps, max_minutes, logging, eval.* or monitors.* of the run")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (torchrun; or launch with torchrun / accelerate)")
    t.set_defaults(func=_train)


def _add_tasks(sub) -> None:
    """The `unigrad tasks` command and its options."""
    k = sub.add_parser("tasks", help="list the built-in tasks: name, single- or multi-turn, tools, description")
    k.set_defaults(func=_tasks)


def _add_eval(sub) -> None:
    """The `unigrad eval` command and its options."""
    e = sub.add_parser("eval", help="held-out pass@1 (greedy) and pass@k per task, on the test or validation split")
    e.add_argument("model", help="'unigrad-tiny', a model directory, or a run directory (uses its final/)")
    e.add_argument("--tasks", nargs="+", help="task specs (default: the run's tasks or the default mixture)")
    e.add_argument("--tools", nargs="+", default=None, help="with --tasks: tools offered to the single-turn tasks "
                   "(calculator, python, path.py:func), which then run as tool-use episodes")
    e.add_argument("--prompts", type=_at_least(1, "the held-out prompts per task"), default=200,
                   help="held-out prompts per task")
    e.add_argument("--split", choices=["test", "validation"], default="test",
                   help="test (what results are reported on) or validation (what choices are tuned on)")
    e.add_argument("--k", type=_at_least(0, "k (0: no pass@k)"), default=0,
                   help="also report pass@k with k samples at temperature 1")
    e.add_argument("--max-new-tokens", type=_at_least(1, "the tokens per completion"), default=None,
                   help="tokens per completion (default: the run's rollout.max_new_tokens, else 32)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--engine", choices=["transformers", "vllm"], default=None,
                   help="what samples: transformers or vllm (vLLM, as rollout.engine=vllm; default: the run's "
                        "rollout.engine, with auto resolved as training resolves it, else transformers)")
    e.add_argument("--device", default="auto", help="auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N "
                                                    "or mps")
    e.add_argument("--json", action="store_true", help='print one JSON object {task: {"pass@1": x}, "mean": ...}')
    e.add_argument("--per-prompt", action="store_true", help='with --json: also {task: {"correct": [0 or 1 per '
                   'prompt, greedy]}}, for paired comparisons of two models on the same prompts')
    e.set_defaults(func=_eval)


def _add_study(sub) -> None:
    """The `unigrad study` command and its options."""
    st = sub.add_parser("study", help="run a study file (arms x seeds at fixed steps, held-out evaluation) and write "
                        "its docs page with intervals over seeds; resumes what a cut-off study left")
    st.add_argument("file", help="the study's YAML file (examples/studies/*.yaml)")
    st.add_argument("--seeds", type=_at_least(1, "the number of seeds"), help="seeds 0..N-1 (default: the file's)")
    st.add_argument("--steps", type=_at_least(1, "the rollout steps per run"),
                    help="rollout steps per run (default: the file's; a smaller number is a smoke test, not the study)")
    st.add_argument("--parallel", type=_at_least(1, "the runs at once"),
                    help="runs at once, one torch thread each (default: the file's)")
    st.add_argument("--out", help="where the runs go (default: runs/studies/<file name>; with --steps N other than "
                    "the file's: runs/studies/<file name>-stepsN)")
    st.add_argument("--doc-root", help="the page is written at DOC_ROOT/<the file's doc> (default: the current "
                    "directory; OUT/page when --steps or --seeds differ from the file's)")
    st.add_argument("--page-only", action="store_true", help="write the page from the runs there, train nothing")
    st.set_defaults(func=_study)


def _add_tune(sub) -> None:
    """The `unigrad tune` command and its options."""
    tu = sub.add_parser("tune", help="choose a study's tuned value (its tuning: section, e.g. optim.lr) on the "
                        "validation split: runs the grid, writes its table and the record `unigrad study` reads")
    tu.add_argument("file", help="the study's YAML file, with a tuning: section")
    tu.add_argument("--out", help="where the tuning runs go (default: runs/studies/<file name>-tuning)")
    tu.add_argument("--doc-root", default=".", help="the table is written at DOC_ROOT/docs/studies/<name>_tuning.md "
                    "(default: the current directory)")
    tu.add_argument("--parallel", type=_at_least(1, "the runs at once"),
                    help="runs at once, one torch thread each (default: the file's)")
    tu.set_defaults(func=_tune)


def _add_sandbox_check(sub) -> None:
    """The `unigrad sandbox-check` command and its options."""
    c = sub.add_parser("sandbox-check", help="prove the code sandbox's jail works here: start it and run the hostile "
                       "snippets of unigrad.sandbox.attacks, with and without the audit hook")
    c.add_argument("--jail", default="bwrap", choices=["bwrap", "none"], help="the containment to check")
    c.add_argument("--allow-root-without-jail", action="store_true", help="with --jail none as root")
    c.set_defaults(func=_sandbox_check)


def _add_report(sub) -> None:
    """The `unigrad report` command and its options."""
    r = sub.add_parser("report", help="plots and an HTML page of a run (works while it is still going)")
    r.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    r.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")
    r.set_defaults(func=_report)


def _add_serve(sub) -> None:
    """The `unigrad serve` command and its options."""
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions) over a rollout engine")
    s.add_argument("model", help="'unigrad-tiny', a model directory, or a run directory (uses its final/)")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    s.add_argument("--port", type=_at_least(1, "the port"), default=8000)
    s.add_argument("--engine", choices=["auto", "transformers", "vllm"], default="auto",
                   help="what samples (auto: as rollout.engine=auto picks it)")
    s.add_argument("--served-model-name", help="the model name requests give (default: MODEL as written)")
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from unigrad.serve.app import build_app
    from unigrad.serve.engines import open_engine
    from unigrad.serve.service import ServeService

    opened = open_engine(args.model, args.engine)
    name = args.served_model_name or args.model
    service = ServeService(opened.engine, opened.tokenizer, name, context_length=opened.context_length)
    print(f"unigrad serve: {name} on http://{args.host}:{args.port}/v1 (engine: {opened.name}, {opened.reason})",
          flush=True)
    uvicorn.run(build_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Every error a user can meet is one or two lines naming the input and the fix (exit code 2 for bad input);
    `--debug` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, LookupError) as err:
        print(f"unigrad {args.command}: {err}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
