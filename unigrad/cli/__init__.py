"""The `unigrad` command line: one module per command (or pair of commands), each with its `add_*` (the
subcommand's options) and its handler.

    train_command.py        unigrad train
    eval_command.py         unigrad eval
    study_commands.py       unigrad study, unigrad tune
    listing_commands.py     unigrad presets, unigrad tasks
    run_tools_commands.py   unigrad report, unigrad sandbox-check, unigrad serve
    arguments.py            argument types they share
"""

from __future__ import annotations

import argparse
import sys

from unigrad.cli.eval_command import add_eval
from unigrad.cli.listing_commands import add_presets, add_tasks
from unigrad.cli.run_tools_commands import add_report, add_sandbox_check, add_serve
from unigrad.cli.study_commands import add_study, add_tune
from unigrad.cli.train_command import add_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unigrad", description="The `unigrad` command line.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_presets, add_train, add_tasks, add_eval, add_study, add_tune, add_sandbox_check, add_report,
                add_serve):
        add(sub)
    return parser


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
