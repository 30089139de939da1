"""Argument types shared by the commands."""

from __future__ import annotations

import argparse


def at_least(low: int, what: str):
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
