"""`unigrad presets` and `unigrad tasks`: the objective presets and the built-in tasks."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_presets(sub) -> None:
    """The `unigrad presets` command and its options."""
    p = sub.add_parser("presets", help="list the objective presets (name, parts, defaults, paper)")
    p.add_argument("--markdown", action="store_true", help="print the docs table as Markdown")
    p.add_argument("--update-docs", metavar="FILE", help="rewrite the generated tables inside FILE")
    p.add_argument("--width", type=int, default=160, help="table width in characters")
    p.set_defaults(func=_presets)


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


def add_tasks(sub) -> None:
    """The `unigrad tasks` command and its options."""
    k = sub.add_parser("tasks", help="list the built-in tasks: name, single- or multi-turn, tools, description")
    k.set_defaults(func=_tasks)


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
