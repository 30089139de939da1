"""The `unigrad` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _presets(args: argparse.Namespace) -> int:
    from unigrad.preset_table import markdown_table, preset_rows, update_docs

    if args.update_docs:
        path = Path(args.update_docs)
        path.write_text(update_docs(path.read_text()))
        print(f"updated the presets table in {path}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unigrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list the objective presets (name, parts, defaults, paper)")
    p.add_argument("--markdown", action="store_true", help="print the docs table as Markdown")
    p.add_argument("--update-docs", metavar="FILE", help="rewrite the generated table inside FILE")
    p.add_argument("--width", type=int, default=160, help="table width in characters")
    p.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
