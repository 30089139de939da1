"""`unigrad report` (a run's plots and page), `unigrad sandbox-check` (the code jail proven on this machine) and
`unigrad serve` (an OpenAI-compatible server over a model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unigrad.cli.arguments import at_least


def add_report(sub) -> None:
    """The `unigrad report` command and its options."""
    r = sub.add_parser("report", help="plots and an HTML page of a run (works while it is still going)")
    r.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    r.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")
    r.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from unigrad.report.run_report import build_report

    try:
        path = build_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as err:
        print(f"unigrad report: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def add_sandbox_check(sub) -> None:
    """The `unigrad sandbox-check` command and its options."""
    c = sub.add_parser("sandbox-check", help="prove the code sandbox's jail works here: start it and run the hostile "
                       "snippets of unigrad.sandbox.attacks, with and without the audit hook")
    c.add_argument("--jail", default="bwrap", choices=["bwrap", "none"], help="the containment to check")
    c.add_argument("--allow-root-without-jail", action="store_true", help="with --jail none as root")
    c.set_defaults(func=_sandbox_check)


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


def add_serve(sub) -> None:
    """The `unigrad serve` command and its options."""
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions) over a rollout engine")
    s.add_argument("model", help="'unigrad-tiny', a model directory, or a run directory (uses its final/)")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    s.add_argument("--port", type=at_least(1, "the port"), default=8000)
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
